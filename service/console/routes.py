"""Console routes under /console.

GET  /console/login            sign-in form (double-submit CSRF cookie)
POST /console/login            key -> server-side session cookie; kiosk keys are refused
POST /console/logout           ends the session (CSRF)
GET  /console                  records, newest first: filters, counts, keyset paging
GET  /console/export.csv       the filtered list as CSV
GET  /console/records/{id}     one record, and its retained images (record_page.py)
GET  /console/overview         decisions over time, score histograms per scoring mode, errors, latency (SVG)
GET  /console/chain            the chain's state (last full verification, re-run when stale)
POST /console/chain/verify     re-run the verification now (CSRF)

Without a live session a GET is redirected to the sign-in page and a POST answered 401; a POST
without the session's CSRF token is answered 403. The key is only ever read from the sign-in
form body: never from a URL, never logged, never rendered back.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from service.errors import INVALID_REQUEST, ApiError
from service.middleware import remember_caller
from service.records import audit, keys
from service.console import charts, csrf, export, sessions, stats
from service.records.tables import ApiKey

log = logging.getLogger("idverify.console")
HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=str(HERE / "templates"))
CHAIN_REFRESH_SECONDS = 30  # the chain page reloads itself (a meta refresh: no script)


def _number(value, digits: int = 4) -> str:
    """Scores and thresholds to `digits` decimals; '–' for none."""
    return "–" if value is None else f"{value:.{digits}f}"


def _shown(value) -> str:
    """A quality value as a person reads it: yes/no for flags, floats as computed (rounded)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "–" if value is None else str(value)


def _score_mode(r: dict) -> str:
    """The mode a public record's score is on, as the pages show it beside the score."""
    mode = audit.score_mode(r["score"], r["scoring"], r["model_version"])
    return mode or (stats.UNRECORDED if r["score"] is not None else "")


templates.env.filters.update(number=_number, shown=_shown)
templates.env.globals.update(score_mode=_score_mode)
router = APIRouter(prefix="/console", include_in_schema=False)

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --- plumbing -------------------------------------------------------------------------------

def _state(request: Request):
    return request.app.state


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + "/console"


def _secure_cookie(request: Request) -> bool:
    mode = str(_state(request).settings.console_secure_cookie).strip().lower()
    if mode in ("true", "1", "yes", "on"):
        return True
    if mode in ("false", "0", "no", "off"):
        return False
    return request.url.scheme == "https"


def _harden(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _chain_cache(request: Request) -> stats.ChainCache:
    state = _state(request)
    cache = getattr(state, "console_chain", None)
    if cache is None:
        cache = state.console_chain = stats.ChainCache()
    return cache


def _principal(request: Request) -> sessions.Principal | None:
    """Blocking (database): call from sync routes or through run_in_threadpool."""
    state = _state(request)
    principal = sessions.lookup(state.engine, request.cookies.get(sessions.COOKIE), state.settings.console_session_minutes)
    if principal is not None:
        remember_caller(request, principal)
    return principal


def _render(request: Request, name: str, principal: sessions.Principal | None, status: int = 200, **ctx) -> Response:
    ctx.update(principal=principal, base=_base(request), csrf_field=csrf.FIELD, error_codes=stats.ERROR_CODES,
               csrf_token=principal.csrf_token if principal else None,
               is_admin=principal is not None and keys.allowed(principal.role, "keys"))
    return _harden(templates.TemplateResponse(request, name, ctx, status_code=status))


def _to_login(request: Request) -> Response:
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    return _harden(RedirectResponse(f"{_base(request)}/login?{urlencode({'next': target})}", status_code=303))


def _message(request: Request, principal, status: int, title: str, text: str) -> Response:
    return _render(request, "message.html", principal, status=status, title=title, text=text)


def _refuse_filters(request: Request, principal, title: str, raw: dict, errors: list, **ctx) -> Response:
    """400 for refused query values (list, overview, export): the error envelope for a client
    that asks for JSON; otherwise the filter form again, filled in, with each refused value
    named and nothing queried."""
    first = errors[0]
    message = "; ".join(map(str, errors))
    accept = request.headers.get("accept", "")
    if "application/json" in accept and "text/html" not in accept:
        body = ApiError(INVALID_REQUEST, message, first.field).to_dict()
        return _harden(JSONResponse(body, status_code=400))
    return _render(request, "refused.html", principal, status=400, title=title, filters=raw, errors=errors,
                   code=INVALID_REQUEST, field=first.field, **ctx)


def _safe_next(request: Request, value: str | None) -> str:
    """Only same-site console paths: no scheme, no host, no '//' tricks."""
    base = _base(request)
    if value and value.startswith(base) and not value.startswith("//") and "\\" not in value and ":" not in value.split("?")[0]:
        return value
    return base


MAX_FORM_BYTES = 16 * 1024


async def _read_form(request: Request) -> dict[str, str] | None:
    """The console's forms are small and urlencoded: read at most MAX_FORM_BYTES (None beyond
    that), whatever Content-Length says; any other content type reads as an empty form."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        return {}
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=20)
    return {k: v[0] for k, v in parsed.items()}


def _too_large(request: Request, principal) -> Response:
    return _message(request, principal, 413, "Too large", "That form submission is too large.")


async def _post_guard(request: Request) -> tuple[sessions.Principal | None, object, Response | None]:
    """For signed-in POSTs: (principal, form, None), or an error response (401 without a
    session, 403 without the session's CSRF token)."""
    principal = await run_in_threadpool(_principal, request)
    if principal is None:
        return None, None, _message(request, None, 401, "Not signed in", "Sign in first.")
    try:
        form = await _read_form(request)
    except ValueError:  # more than max_num_fields
        form = None
    if form is None:
        return principal, None, _too_large(request, principal)
    if not csrf.matches(principal.csrf_token, form.get(csrf.FIELD)):
        return principal, form, _message(request, principal, 403, "Forbidden",
                                         "The form's security token is missing or stale. Reload the page and try again.")
    return principal, form, None


def _qs(raw: dict[str, str], **extra) -> str:
    params = {k: v for k, v in raw.items() if v}
    params.update({k: v for k, v in extra.items() if v not in (None, "")})
    return urlencode(params)


# --- sign-in / sign-out ---------------------------------------------------------------------

def _login_page(request: Request, status: int = 200, error: str | None = None, next_path: str | None = None) -> Response:
    token = request.cookies.get(csrf.LOGIN_COOKIE) or csrf.new_token()
    response = _render(request, "login.html", None, status=status, title="Sign in", error=error, login_token=token,
                       next=_safe_next(request, next_path or request.query_params.get("next")))
    response.set_cookie(csrf.LOGIN_COOKIE, token, max_age=csrf.LOGIN_COOKIE_SECONDS, path=_base(request),
                        httponly=True, samesite="strict", secure=_secure_cookie(request))
    return response


@router.get("/login")
def login_form(request: Request) -> Response:
    if _principal(request) is not None:
        return _harden(RedirectResponse(_base(request), status_code=303))
    return _login_page(request)


@router.post("/login")
async def login(request: Request) -> Response:
    try:
        form = await _read_form(request)
    except ValueError:
        form = None
    if form is None:
        return _too_large(request, None)
    if not csrf.matches(request.cookies.get(csrf.LOGIN_COOKIE), form.get(csrf.FIELD)):
        return _login_page(request, 403, "The sign-in form expired. Please try again.", form.get("next"))
    plaintext = form.get("key")
    state = _state(request)
    key: ApiKey | None = None
    idents = state.auth_throttle.idents(request.client.host if request.client else None,
                                        plaintext.strip() if isinstance(plaintext, str) else None)
    wait = await run_in_threadpool(state.auth_throttle.wait, idents)   # the store may be Redis
    if wait:
        del plaintext
        log.info("console sign-in throttled")
        response = _login_page(request, 429, f"Too many failed sign-ins. Try again in {max(1, round(wait))} s.",
                               form.get("next"))
        response.headers["Retry-After"] = str(max(1, round(wait + 0.5)))
        return response
    if isinstance(plaintext, str) and 0 < len(plaintext) <= 512:
        key = await run_in_threadpool(keys.lookup, state.engine, plaintext.strip(), state.settings.key_pepper)
    del plaintext
    if key is None:
        await run_in_threadpool(state.auth_throttle.failed, idents)
        log.info("console sign-in refused: unknown or revoked key")
        return _login_page(request, 401, "That key is not valid (unknown or revoked).", form.get("next"))
    remember_caller(request, key)
    if not sessions.may_sign_in(key):
        log.info("console sign-in refused for key %d (%s): role may not use the console", key.id, key.role)
        return _login_page(request, 403, f"{keys.a_role_key(key.role).capitalize()} cannot sign in to the console; "
                                         "use an operator or admin key.", form.get("next"))
    value = await run_in_threadpool(sessions.create, state.engine, key, state.settings.console_session_minutes)
    log.info("console sign-in: key %d (%s)", key.id, key.role)
    response = RedirectResponse(_safe_next(request, form.get("next")), status_code=303)
    response.set_cookie(sessions.COOKIE, value, path=_base(request), httponly=True, samesite="strict",
                        secure=_secure_cookie(request))
    response.delete_cookie(csrf.LOGIN_COOKIE, path=_base(request))
    return _harden(response)


@router.post("/logout")
async def logout(request: Request) -> Response:
    principal, _form, error = await _post_guard(request)
    if error is not None:
        return error
    await run_in_threadpool(sessions.end, _state(request).engine, principal.session_hash)
    log.info("console sign-out: key %d", principal.key_id)
    response = RedirectResponse(f"{_base(request)}/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path=_base(request), httponly=True, samesite="strict",
                           secure=_secure_cookie(request))
    return _harden(response)


# --- list and export ------------------------------------------------------------------------

@router.get("")
def records(request: Request) -> Response:
    principal = _principal(request)
    if principal is None:
        return _to_login(request)
    engine = _state(request).engine
    flt, raw, errors = stats.parse_filters(request.query_params)
    limit = stats.page_size(request.query_params)
    cursor = request.query_params.get("cursor") or None
    if cursor is not None:
        try:
            audit.decode_cursor(cursor)
        except ValueError:
            errors.append(stats.FilterError("cursor", "not a paging cursor of this list (follow the Older link)"))
    raw_limit = str(limit) if limit != 50 else ""
    if errors:
        return _refuse_filters(request, principal, "Records", raw, errors, page_sizes=stats.PAGE_SIZES, limit=limit)
    rows, next_cursor = audit.query(engine, flt, limit, cursor)
    return _render(
        request, "list.html", principal, title="Records", filters=raw, errors=errors,
        records=[audit.to_public(r) for r in rows], counts=stats.counts(engine, flt), limit=limit,
        mix=stats.mix(engine, flt), refine=lambda name, value: "?" + _qs({**raw, name: value}),
        page_sizes=stats.PAGE_SIZES, paged=cursor is not None,
        next_url=f"?{_qs(raw, limit=raw_limit, cursor=next_cursor)}" if next_cursor else None,
        first_url=f"?{_qs(raw, limit=raw_limit)}",
        export_url=f"{_base(request)}/export.csv?{_qs(raw)}",
        overview_url=f"{_base(request)}/overview?{_qs(raw)}",
        chain=_chain_cache(request).current(engine, refresh="background"),
        chain_running=_chain_cache(request).running,
        refresh_s=3 if _chain_cache(request).running else None,  # the badge's result is moments away
    )


@router.get("/export.csv")
def export_csv(request: Request) -> Response:
    principal = _principal(request)
    if principal is None:
        return _to_login(request)
    flt, raw, errors = stats.parse_filters(request.query_params)
    if errors:
        return _refuse_filters(request, principal, "Export", raw, errors)
    log.info("console CSV export by key %d", principal.key_id)
    name = f"idverify-audit-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.csv"
    response = StreamingResponse(export.csv_lines(_state(request).engine, flt), media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": f'attachment; filename="{name}"'})
    return _harden(response)


# --- overview and chain ---------------------------------------------------------------------

@router.get("/overview")
def overview(request: Request) -> Response:
    principal = _principal(request)
    if principal is None:
        return _to_login(request)
    now = datetime.now(timezone.utc)
    flt, raw, errors = stats.parse_filters(request.query_params,
                                           default_since=now - timedelta(days=stats.OVERVIEW_DEFAULT_DAYS))
    if errors:
        return _refuse_filters(request, principal, "Overview", raw, errors)
    ov = stats.overview(_state(request).engine, flt, now)
    lat = ov.latency.get("all", {})
    latency_bars = [(name, lat[name]) for name in ("p50", "p90", "p95", "p99", "max") if name in lat]
    return _render(
        request, "overview.html", principal, title="Overview", filters=raw, errors=errors, ov=ov,
        list_url=f"{_base(request)}?{_qs(raw)}",
        decisions_svg=charts.stacked_bars(ov.buckets, f"Decisions per {ov.bucket}"),
        scores_svg=charts.mode_histograms(ov.modes, "Scores of matches and no-matches per scoring mode, "
                                                    "each with its own threshold"),
        errors_svg=charts.horizontal_bars(ov.errors, "Error codes by count"),
        latency_svg=charts.horizontal_bars(latency_bars, "Latency percentiles (all calls)", unit=" ms",
                                           colour="#00838f"),
    )


@router.get("/chain")
def chain(request: Request) -> Response:
    principal = _principal(request)
    if principal is None:
        return _to_login(request)
    run = _chain_cache(request).current(_state(request).engine, refresh="sync")
    return _render(request, "chain.html", principal, title="Audit chain", run=run, refresh_s=CHAIN_REFRESH_SECONDS,
                   max_age_s=_chain_cache(request).max_age_s)


@router.post("/chain/verify")
async def chain_verify(request: Request) -> Response:
    _principal_, _form, error = await _post_guard(request)
    if error is not None:
        return error
    await run_in_threadpool(_chain_cache(request).run, _state(request).engine)
    return _harden(RedirectResponse(f"{_base(request)}/chain", status_code=303))
