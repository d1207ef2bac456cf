"""GET /healthz (the process answers), /readyz (database reachable, models loaded and warm),
/metrics (Prometheus text)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.records.engine import ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    pipeline = state.pipeline
    checks = {
        "database": ping(state.engine),
        "models": pipeline is not None,
        "warm": bool(pipeline is not None and getattr(pipeline, "warm", True)),
    }
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks,
            "model_version": getattr(pipeline, "model_version", None)}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    data, content_type = request.app.state.metrics.render()
    return Response(data, media_type=content_type)
