"""POST /verify: is the person on the ID-chip photo the person in the live photo?

Top to bottom: authenticate -> authorise -> rate-limit -> read the request -> analyse(id_photo)
-> analyse(live_photo) -> compare -> decide -> audit write -> answer. A `VerifyAttempt`
collects what each stage saw; the audit record and the answer are both built from it. Every
call made with a valid key writes exactly one audit record (match, no_match or rejected),
committed before the answer leaves. The key is checked before the body is read, so anonymous
callers never get their uploads read or parsed.
"""
from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api import deps
from service.api.attempt import INTERNAL, VerifyAttempt
from service.api.schemas import ERRORS, VerifyAnswer
from service.api.verify_input import read_verify_input
from service.errors import RATE_LIMITED, ApiError
from service.records import audit, retention

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


@router.post("/verify", openapi_extra=OPENAPI_BODY, tags=["verify"], response_model=VerifyAnswer, responses=ERRORS)
async def verify(request: Request) -> JSONResponse:
    state = request.app.state
    attempt = VerifyAttempt()
    key = await run_in_threadpool(deps.authenticate, request)  # 401: no caller to audit
    attempt.key_id = key.id
    models = state.models
    try:
        deps.authorize(key, "verify")
        _rate_limit(state.limiter, key.id)
        attempt.received(await read_verify_input(request, state.settings.max_request_bytes))
        models = deps.models(request)
        for field in ("id_photo", "live_photo"):
            await run_in_threadpool(models.pipeline.analyse, getattr(attempt.input, field), field,
                                    attempt.timings, attempt.sides[field])
        t0 = time.perf_counter()
        scores = models.pipeline.scores(attempt.sides["id_photo"], attempt.sides["live_photo"])
        attempt.decided(models.scoring.decide(scores), (time.perf_counter() - t0) * 1000.0)
    except ApiError as exc:
        attempt.failed(exc)
    except Exception:  # noqa: BLE001 - answered as internal_error, logged, and audited
        log.exception("verify %s failed", attempt.request_id)
        attempt.failed(ApiError(INTERNAL, "internal error; quote the request id to support", None, status=500))
    state.metrics.observe_stages(attempt.timings)
    attempt.finished()

    try:
        await run_in_threadpool(write_audit, state.engine, state.image_cipher, state.settings, attempt, models)
    except Exception:  # noqa: BLE001 - without its audit record, no answer may be given
        log.exception("audit write for %s failed", attempt.request_id)
        attempt.failed(ApiError(INTERNAL, "the audit record could not be written", None, status=500))

    request.state.outcome = attempt.outcome
    status, body, headers = attempt.answer(models)
    return JSONResponse(body, status_code=status, headers=headers)


def _rate_limit(limiter, key_id: int) -> None:
    wait = limiter.check(key_id)
    if wait:
        err = ApiError(RATE_LIMITED, f"rate limit of {limiter.per_minute} calls per minute exceeded; "
                       f"retry in {wait:.1f} s", None, status=429)
        err.headers = {"Retry-After": str(max(1, round(wait)))}
        raise err


def write_audit(engine, cipher, settings, attempt: VerifyAttempt, models) -> None:
    """The call's audit record (committed), then its images when IDV_RETAIN_IMAGES is on."""
    audit.append(engine, **attempt.audit_columns(models))
    retention.retain_request(engine, cipher, settings, attempt.request_id, attempt.input)
