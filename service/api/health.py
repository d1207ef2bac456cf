"""GET /healthz (the process answers), /readyz (database reachable, models loaded and warm),
/metrics (Prometheus text)."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.api.schemas import HealthAnswer, ReadyAnswer
from service.errors import UNAUTHORIZED, ApiError
from service.records.engine import ping

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthAnswer)
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyAnswer, responses={503: {"model": ReadyAnswer}})
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    models = state.models
    checks = {
        "database": ping(state.engine),
        "models": models is not None,
        "warm": bool(models is not None and getattr(models, "warm", True)),
    }
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks,
            "model_version": getattr(models, "model_version", None)}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format"}})
def metrics(request: Request) -> Response:
    """Prometheus text; with IDV_METRICS_TOKEN set, only for `Authorization: Bearer <token>`."""
    token = request.app.state.settings.metrics_token
    if token and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                         f"Bearer {token}".encode()):
        err = ApiError(UNAUTHORIZED, "/metrics needs Authorization: Bearer <IDV_METRICS_TOKEN>", None, status=401)
        err.headers = {"WWW-Authenticate": "Bearer"}
        raise err
    data, content_type = request.app.state.metrics.render()
    return Response(data, media_type=content_type)
