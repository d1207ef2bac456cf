"""The console's API-key page, for admins: list, create (the plaintext shown once), revoke.

GET  /console/keys                 the keys (prefix, role, name, created, revoked)
POST /console/keys                 create one (CSRF); the answer page shows its plaintext, once
GET  /console/keys/{id}/revoke     asks first: the key, what revoking does, Revoke / Cancel
POST /console/keys/{id}/revoke     revoke one (CSRF, and the confirmation page's `confirm=yes`:
                                   without it the browser is sent to that page); a refusal (e.g.
                                   the last active admin key, service/records/keys.py) is shown

Other roles are answered 403. The plaintext is never logged and never rendered again; the
page is `Cache-Control: no-store` like every console page.
"""
from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from service.console import routes
from service.errors import ApiError
from service.records import keys

log = logging.getLogger("idverify.console")
router = APIRouter(prefix="/console", include_in_schema=False)
NAME_MAX = 200


def _page(request: Request, principal, status: int = 200, **ctx) -> Response:
    """Blocking (database)."""
    items = [keys.public(k) for k in keys.list_keys(request.app.state.engine)]
    return routes._render(request, "keys.html", principal, status=status, title="API keys", items=items,
                          roles=keys.ROLES, **ctx)


def _refused(request: Request, principal) -> Response | None:
    if keys.allowed(principal.role, "keys"):
        return None
    return routes._message(request, principal, 403, "Forbidden",
                           f"{keys.a_role_key(principal.role).capitalize()} cannot manage API keys; "
                           "sign in with an admin key.")


@router.get("/keys")
def key_list(request: Request) -> Response:
    principal = routes._principal(request)
    if principal is None:
        return routes._to_login(request)
    return _refused(request, principal) or _page(request, principal)


@router.post("/keys")
async def key_create(request: Request) -> Response:
    principal, form, error = await routes._post_guard(request)
    if error is not None:
        return error
    if (refused := _refused(request, principal)) is not None:
        return refused
    role, name = form.get("role"), (form.get("name") or "").strip()
    if role not in keys.ROLES or not 0 < len(name) <= NAME_MAX or not name.isprintable():
        return await run_in_threadpool(_page, request, principal, 400,
                                       error=f"Choose a role ({', '.join(keys.ROLES)}) and a name of 1 to "
                                             f"{NAME_MAX} printable characters.")
    key, plaintext = await run_in_threadpool(keys.create_key, request.app.state.engine, role, name,
                                             pepper=request.app.state.settings.key_pepper)
    log.info("console: key %d (%s) created by key %d", key.id, key.role, principal.key_id)
    return await run_in_threadpool(_page, request, principal, 200,
                                   created={"id": key.id, "role": key.role, "name": key.name, "key": plaintext})


def _key_id(key_id: str) -> int | None:
    return int(key_id) if key_id.isdigit() and len(key_id) < 12 else None


@router.get("/keys/{key_id}/revoke")
def key_revoke_confirm(key_id: str, request: Request) -> Response:
    """The confirmation step: a page of its own, so it works without JavaScript."""
    principal = routes._principal(request)
    if principal is None:
        return routes._to_login(request)
    if (refused := _refused(request, principal)) is not None:
        return refused
    key = keys.get_key(request.app.state.engine, _key_id(key_id) or 0)
    if key is None:
        return _page(request, principal, 404, error=f"There is no key {key_id[:12]}.")
    if key.revoked_at is not None:
        return _page(request, principal, 409, error=f"Key {key.id} ({key.name}) is already revoked.")
    return routes._render(request, "keys_confirm.html", principal, title="Revoke key", k=keys.public(key),
                          own=key.id == principal.key_id)


@router.post("/keys/{key_id}/revoke")
async def key_revoke(key_id: str, request: Request) -> Response:
    principal, form, error = await routes._post_guard(request)
    if error is not None:
        return error
    if (refused := _refused(request, principal)) is not None:
        return refused
    number = _key_id(key_id)
    if number is not None and form.get("confirm") != "yes":   # not from the confirmation page: ask first
        return routes._harden(RedirectResponse(f"{routes._base(request)}/keys/{number}/revoke", status_code=303))
    try:
        key = await run_in_threadpool(keys.revoke_key, request.app.state.engine, number, True) \
            if number is not None else None
    except (ValueError, ApiError) as exc:  # a rule of keys.revoke_key (e.g. the last active admin key)
        return await run_in_threadpool(_page, request, principal, 409, error=f"Not revoked: {exc}")
    if key is None:
        return await run_in_threadpool(_page, request, principal, 404, error=f"There is no key {key_id[:12]}.")
    log.info("console: key %d (%s) revoked by key %d", key.id, key.role, principal.key_id)
    return routes._harden(RedirectResponse(f"{routes._base(request)}/keys", status_code=303))
