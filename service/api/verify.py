"""POST /verify: is the person on the ID-chip photo the person in the live photo?

Top to bottom: authenticate -> authorise -> rate-limit -> read the request -> liveness rule ->
the guards (device binding, the same bytes, replays) -> analyse(id_photo) and analyse(live_photo),
each followed by its photo's policy rules -> the same pixels -> compare -> decide -> audit write
-> answer (service/face/policy.py holds the rules, service/api/guards.py the guards), all within
the answer deadline (service/api/deadline.py). A `VerifyAttempt` collects what each stage saw;
the audit record and the answer are both built from it. Every call made with a valid key writes
exactly one audit record (match, no_match or rejected), committed before the answer leaves; a
call answered 503 at its deadline gets its record when the database lets it, as rejected
(deadline_exceeded), never with a decision. The key is checked before the body is read, so
anonymous callers never get their uploads read or parsed.
"""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api import deps, guards
from service.api.attempt import FIELDS, INTERNAL, VerifyAttempt
from service.api.schemas import AUTH_ERRORS, VerifyAnswer, errors
from service.api.verify_input import read_verify_input
from service.api.deadline import AnswerDeadline, within
from service.errors import BUSY, DEADLINE_EXCEEDED, RATE_LIMITED, ApiError, database_unavailable
from service.face.pipeline import Side
from service.records import audit, retention
from service.records.engine import is_outage

log = logging.getLogger("idverify.verify")
router = APIRouter()

_photo = {"type": "string", "format": "binary"}
_b64 = {"type": "string", "format": "byte"}
_text = {"device_id": {"type": "string", "maxLength": 128}, "reference": {"type": "string", "maxLength": 256}}
_liveness = {"type": "object", "required": ["vendor", "passed"], "additionalProperties": False,
             "description": "the kiosk's own presentation-attack (liveness) check; audited",
             "properties": {"vendor": {"type": "string", "minLength": 1, "maxLength": 64},
                            "score": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                            "passed": {"type": "boolean"}}}
_liveness_text = {"type": "string", "description": "the liveness object as JSON text"}
OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["id_photo", "live_photo"],
                                       "properties": {"id_photo": _photo, "live_photo": _photo, **_text,
                                                      "liveness": _liveness_text}}},
    "application/json": {"schema": {"type": "object", "required": ["id_photo", "live_photo"],
                                    "properties": {"id_photo": _b64, "live_photo": _b64, **_text,
                                                   "liveness": _liveness}}},
}}}


@router.post("/verify", openapi_extra=OPENAPI_BODY, tags=["verify"], response_model=VerifyAnswer,
             responses=errors(400, 409, 413, 415, 422, 429, 503, *AUTH_ERRORS), dependencies=[deps.documented("verify")])
async def verify(request: Request) -> JSONResponse:
    """The call's work runs as a task the route waits for until IDV_REQUEST_DEADLINE_SECONDS;
    past it the caller gets 503 deadline_exceeded and the work finishes on its own, its record
    saying it was not answered (service/api/deadline.py)."""
    state = request.app.state
    attempt = VerifyAttempt()
    if state.unanswered.full():
        err = ApiError(BUSY, "too many calls are still waiting on the database; retry shortly", None, status=503)
        err.headers = {"Retry-After": "2", "X-Request-ID": attempt.request_id}
        raise err
    deadline = AnswerDeadline(state.settings.request_deadline_seconds, attempt.request_id)
    held: dict = {}
    task = asyncio.ensure_future(_work(request, attempt, deadline, held))
    if await within(deadline, task):
        return task.result()
    state.unanswered.keep(task)
    if deadline.abandon() == "committed":   # its record is in: the caller gets it
        return _answer(request, attempt, held.get("models"))
    log.warning("verify %s not answered within %g s", attempt.request_id, deadline.seconds)
    request.state.outcome = DEADLINE_EXCEEDED
    err = deadline.error()
    return JSONResponse(err.to_dict(), status_code=err.status, headers={**err.headers, "X-Request-ID": attempt.request_id})


async def _work(request: Request, attempt: VerifyAttempt, deadline: AnswerDeadline, held: dict) -> JSONResponse:
    state = request.app.state
    key = await run_in_threadpool(deps.authenticate, request)  # 401: no caller to audit
    attempt.key_id = key.id
    models = held["models"] = state.models
    try:
        deadline.check()
        deps.authorize(key, "verify")
        try:
            await run_in_threadpool(_rate_limit, state.limiter, key.id)
        except ApiError as limited:
            await _read_for_record(request, attempt, state.settings.max_request_bytes)
            raise limited
        attempt.received(await read_verify_input(request, state.settings.max_request_bytes))
        state.policy.check_liveness(attempt.input.liveness)
        deadline.check()
        models = held["models"] = deps.models(request)
        await guards.before_analysis(state, key, attempt)   # device binding, same bytes, replays
        await _analyse_sides(models.pipeline, state.policy, attempt)
        await guards.after_analysis(state.settings, attempt)   # same pixels
        deadline.check()
        t0 = time.perf_counter()
        attempt.decided(models.decide(attempt.sides["id_photo"], attempt.sides["live_photo"]),
                        (time.perf_counter() - t0) * 1000.0)
    except ApiError as exc:
        attempt.failed(deadline.error() if deadline.passed() else exc)
    except Exception:  # noqa: BLE001 - answered as internal_error, logged, and audited
        if deadline.passed():
            attempt.failed(deadline.error())
        else:
            log.exception("verify %s failed", attempt.request_id)
            attempt.failed(ApiError(INTERNAL, "internal error; quote the request id to support", None, status=500))
    state.metrics.observe_stages(attempt.stage_totals())
    attempt.finished()

    try:
        await run_in_threadpool(write_audit, state.engine, state.image_cipher, state.settings, attempt, models, deadline)
    except Exception as exc:  # noqa: BLE001 - without its audit record, no answer may be given
        if is_outage(exc):
            log.warning("audit write for %s failed: database unavailable (%s)", attempt.request_id,
                        (str(exc).splitlines() or [exc.__class__.__name__])[0][:200])
            attempt.failed(database_unavailable())
        else:
            log.exception("audit write for %s failed", attempt.request_id)
            attempt.failed(ApiError(INTERNAL, "the audit record could not be written", None, status=500))
    return _answer(request, attempt, models)


def _answer(request: Request, attempt: VerifyAttempt, models) -> JSONResponse:
    if attempt.error is None:
        request.app.state.metrics.observe_scores(attempt.scores, attempt.scoring, attempt.score)
    request.state.outcome = attempt.outcome
    status, body, headers = attempt.answer(models)
    return JSONResponse(body, status_code=status, headers=headers)


def _analyse_photo(pipeline, policy, data: bytes, field: str, timings: dict, side: Side) -> Side:
    """One photo: the pipeline, then its policy rules (faces, quality)."""
    side = pipeline.analyse(data, field, timings, side)
    policy.check_photo(side)
    return side


async def _analyse_sides(pipeline, policy, attempt: VerifyAttempt) -> None:
    """Both photos at once, in two worker threads: a lone request on 2+ cores takes the longer
    side's time, not the sum (docs/benchmarks.md, "Threads and workers"); each photo's stage
    times are kept under its own name. The id photo's error wins, and leaves the live side as if
    it had not been analysed (as when the id photo went first)."""
    timings = {f: {} for f in FIELDS}
    results = await asyncio.gather(*(run_in_threadpool(_analyse_photo, pipeline, policy, getattr(attempt.input, f),
                                                       f, timings[f], attempt.sides[f]) for f in FIELDS),
                                   return_exceptions=True)
    for f, per_side in timings.items():
        attempt.side_timings(f, per_side)
    id_result, live_result = results
    if isinstance(id_result, BaseException):
        attempt.sides["live_photo"] = Side.of("live_photo", attempt.input.live_photo)
        raise id_result
    if isinstance(live_result, BaseException):
        raise live_result


async def _read_for_record(request: Request, attempt: VerifyAttempt, cap: int) -> None:
    """A rate-limited call's body is still read (same caps and deadline), never analysed, so
    that its audit record names the device, the reference and the photos' hashes."""
    try:
        attempt.received(await read_verify_input(request, cap))
    except ApiError:
        pass   # what the body lacks does not change the answer: 429


def _rate_limit(limiter, key_id: int) -> None:
    wait = limiter.check(key_id)
    if wait:
        err = ApiError(RATE_LIMITED, f"rate limit of {limiter.per_minute} calls per minute exceeded; "
                       f"retry in {wait:.1f} s", None, status=429)
        err.headers = {"Retry-After": str(max(1, round(wait)))}
        raise err


def write_audit(engine, cipher, settings, attempt: VerifyAttempt, models, deadline: AnswerDeadline | None = None) -> None:
    """The call's audit record (committed), then, when IDV_RETAIN_IMAGES is on, its images that
    passed decoding (detection ran on them): refused uploads are never stored. With a
    `deadline`, a record that cannot commit before it is written as not answered instead
    (rejected, deadline_exceeded), as its caller is answered."""
    try:
        audit.append(engine, guard=deadline, **attempt.audit_columns(models))
    except audit.AnswerLate:
        attempt.failed(deadline.error())
        audit.append(engine, **attempt.audit_columns(models))
    decoded = {f for f, side in attempt.sides.items() if side is not None and side.faces_seen is not None}
    retention.retain_request(engine, cipher, settings, attempt.request_id, attempt.input, decoded)
