"""GET /healthz (the process answers), /readyz (database answering in time, models loaded and warm),
/metrics (Prometheus text)."""
from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from service.api.schemas import HealthAnswer, ReadyAnswer
from service.errors import UNAUTHORIZED, ApiError
from service.records.engine import ping

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthAnswer)
def healthz() -> dict:
    return {"status": "ok"}


# what /readyz asks the database: the audit chain's head, the read every /verify record starts
# with (so a lock held on the audit table is noticed, not only a server that does not answer)
READY_QUERY = "SELECT max(seq) FROM audit_records"


async def database_answers(state) -> bool:
    """Did a database round trip finish within IDV_READYZ_TIMEOUT_SECONDS? One at a time: while
    an earlier one still hangs (a stopped server), later checks wait on it instead of starting
    more threads that would hang too."""
    pending = getattr(state, "ready_ping", None)
    if pending is None or pending.done():
        pending = state.ready_ping = asyncio.ensure_future(run_in_threadpool(ping, state.engine, READY_QUERY))
    done, _ = await asyncio.wait({pending}, timeout=state.settings.readyz_timeout_seconds)
    return bool(done) and pending.result()


@router.get("/readyz", response_model=ReadyAnswer, responses={503: {"model": ReadyAnswer}})
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    models = state.models
    checks = {
        "database": await database_answers(state),
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
