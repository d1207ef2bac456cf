"""POST /verify: is the person on the ID-chip photo the person in the live photo?

Top to bottom: authenticate -> authorise -> rate-limit -> parse request -> analyse(id_photo)
-> analyse(live_photo) -> compare -> threshold.decide -> audit write -> answer. Every call
made with a valid key writes exactly one audit record (match, no_match or rejected), committed
before the answer leaves. The key is checked before the body is read, so anonymous callers
never get their uploads read or parsed.
"""
from __future__ import annotations

import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.records import audit, retention
from service.api import deps
from service.api.verify_input import VerifyInput, read_verify_input
from service.errors import RATE_LIMITED, ApiError
from service.face.pipeline import Side

log = logging.getLogger("idverify.verify")
router = APIRouter()

_photo = {"type": "string", "format": "binary"}
_b64 = {"type": "string", "format": "byte"}
_text = {"device_id": {"type": "string", "maxLength": 128}, "reference": {"type": "string", "maxLength": 256}}
OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["id_photo", "live_photo"],
                                       "properties": {"id_photo": _photo, "live_photo": _photo, **_text}}},
    "application/json": {"schema": {"type": "object", "required": ["id_photo", "live_photo"],
                                    "properties": {"id_photo": _b64, "live_photo": _b64, **_text}}},
}}}


@router.post("/verify", openapi_extra=OPENAPI_BODY, tags=["verify"])
async def verify(request: Request) -> JSONResponse:
    state = request.app.state
    started = time.perf_counter()
    request_id = str(uuid.uuid4())
    key = await run_in_threadpool(deps.authenticate, request)  # 401: no caller to audit
    inp: VerifyInput | None = None
    sides: dict = {"id_photo": None, "live_photo": None}
    timings: dict[str, float] = {}
    result: dict | None = None
    error: ApiError | None = None
    try:
        deps.authorize(key, "verify")
        _rate_limit(state.limiter, key.id)
        inp = await read_verify_input(request, state.settings.max_request_bytes)
        pipeline = deps.pipeline(request)
        sides["id_photo"] = await run_in_threadpool(pipeline.analyse, inp.id_photo, "id_photo", timings)
        sides["live_photo"] = await run_in_threadpool(pipeline.analyse, inp.live_photo, "live_photo", timings)
        t0 = time.perf_counter()
        score = float(pipeline.compare(sides["id_photo"], sides["live_photo"]))
        decision = pipeline.threshold.decide(score)
        timings["compare"] = (time.perf_counter() - t0) * 1000.0
        result = {"decision": decision, "score": score, "threshold": pipeline.threshold.score,
                  "far_target": pipeline.threshold.far, "model_version": pipeline.model_version}
    except ApiError as exc:
        error = exc
        if exc.side is not None and exc.field in sides:
            sides[exc.field] = exc.side
    except Exception:  # noqa: BLE001 - answered as internal_error, logged, and audited
        log.exception("verify %s failed", request_id)
        error = ApiError("internal_error", "internal error; quote the request id to support",
                         None, status=500)
    state.metrics.observe_stages(timings)
    latency_ms = (time.perf_counter() - started) * 1000.0

    try:
        await run_in_threadpool(_write_audit, request, request_id, key.id, inp, sides, result, error,
                                timings, latency_ms)
    except Exception:  # noqa: BLE001 - without its audit record, no answer may be given
        log.exception("audit write for %s failed", request_id)
        error, result = ApiError("internal_error", "the audit record could not be written", None, status=500), None

    headers = {"X-Request-ID": request_id}
    if error is not None:
        request.state.outcome = error.code
        headers.update(getattr(error, "headers", None) or {})
        return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)
    request.state.outcome = result["decision"]
    timings["total"] = (time.perf_counter() - started) * 1000.0
    return JSONResponse({
        "request_id": request_id,
        **result,
        "faces": {field: side.to_public() for field, side in sides.items()},
        "timings_ms": {stage: round(ms, 2) for stage, ms in timings.items()},
    }, headers=headers)


def _rate_limit(limiter, key_id: int) -> None:
    wait = limiter.check(key_id)
    if wait:
        err = ApiError(RATE_LIMITED, f"rate limit of {limiter.per_minute} calls per minute exceeded; "
                       f"retry in {wait:.1f} s", None, status=429)
        err.headers = {"Retry-After": str(max(1, round(wait)))}
        raise err


def _write_audit(request: Request, request_id: str, key_id: int, inp: VerifyInput | None, sides: dict,
                 result: dict | None, error: ApiError | None, timings: dict, latency_ms: float) -> None:
    columns: dict = {}
    for field, side in sides.items():
        if side is None and inp is not None:  # never analysed, or failed before the pipeline said what it saw
            side = Side.of(getattr(inp, field))
        columns.update(audit.side_columns(field, side))
    if result is None:
        p = request.app.state.pipeline
        columns.update(decision="rejected", error_code=error.code, error_field=error.field,
                       threshold=p.threshold.score if p else None, far_target=p.threshold.far if p else None,
                       model_version=p.model_version if p else None)
    else:
        columns.update(result)
    audit.append(request.app.state.engine, id=request_id, key_id=key_id,
                 device_id=inp.device_id if inp else None, reference=inp.reference if inp else None,
                 latency_ms=round(latency_ms, 3), timings_ms={k: round(v, 3) for k, v in timings.items()} or None,
                 **columns)
    retention.retain_request(request.app.state, request_id, inp)  # IDV_RETAIN_IMAGES: encrypted uploads
