"""What the routes share: the app's state, and authentication by X-API-Key with roles."""
from __future__ import annotations

import json

from fastapi import Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from sqlalchemy import Engine

from service.api.verify_input import unique_keys
from service.middleware import remember_caller
from service.records import keys
from service.records.tables import ApiKey
from service.errors import FORBIDDEN, RATE_LIMITED, UNAUTHORIZED, ApiError

API_KEY_HEADER = "X-API-Key"
# For the OpenAPI document only (auto_error off: authenticate() answers 401 in the envelope);
# each route lists the roles that may call it as the requirement's "scopes" (OpenAPI 3.1 allows
# role names there for non-OAuth schemes).
API_KEY_SCHEME = APIKeyHeader(name=API_KEY_HEADER, scheme_name="ApiKey", auto_error=False,
                              description="An API key; its role (kiosk, operator, admin) decides what it may call.")


def documented(permission: str):
    """The X-API-Key security requirement of a route, with the roles that have `permission`."""
    return Security(API_KEY_SCHEME, scopes=[role for role in keys.ROLES if keys.allowed(role, permission)])


def engine(request: Request) -> Engine:
    return request.app.state.engine


def models(request: Request):
    """The loaded models (service.face.loader.Models); 503 `not_ready` while they are not."""
    m = request.app.state.models
    if m is None:
        raise ApiError("not_ready", "the models are not loaded", None, status=503)
    return m


def throttled(wait: float) -> ApiError:
    err = ApiError(RATE_LIMITED, f"too many failed attempts; retry in {wait:.0f} s", None, status=429)
    err.headers = {"Retry-After": str(max(1, round(wait + 0.5)))}
    return err


def authenticate(request: Request) -> ApiKey:
    """The caller's active key. 401 `unauthorized` when the header is missing or the key is
    unknown or revoked; 429 `rate_limited` once this address or key prefix has failed too often
    (service.ratelimit.FailureThrottle). (Blocking: a database lookup.)"""
    state = request.app.state
    presented = request.headers.get(API_KEY_HEADER)
    idents = state.auth_throttle.idents(request.client.host if request.client else None, presented)
    wait = state.auth_throttle.wait(idents)
    if wait:
        raise throttled(wait)
    key = keys.lookup(engine(request), presented, state.settings.key_pepper)
    if key is None:
        if presented:
            state.auth_throttle.failed(idents)
        raise ApiError(UNAUTHORIZED, f"a valid {API_KEY_HEADER} header is required", None, status=401)
    remember_caller(request, key)
    return key


def authorize(key: ApiKey, permission: str) -> None:
    """403 `forbidden` when the key's role may not do this."""
    if not keys.allowed(key.role, permission):
        raise ApiError(FORBIDDEN, keys.refusal(key.role, permission), None, status=403)


def require(permission: str):
    """Route dependency: an authenticated key whose role has `permission`."""

    def dependency(request: Request, _header: str | None = documented(permission)) -> ApiKey:
        key = authenticate(request)
        authorize(key, permission)
        return key

    return dependency


class StrictJsonRoute(APIRoute):
    """A route whose JSON body may not name a key twice (400 `duplicate_json_key`): FastAPI's
    own parsing would keep the last value. Bodies that are not JSON are left to FastAPI."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            raw = await request.body()   # kept on the request: FastAPI reads the same bytes
            if raw:
                try:
                    json.loads(raw, object_pairs_hook=unique_keys)
                except (ValueError, RecursionError):
                    pass   # not JSON: answered by FastAPI's parsing
            return await handler(request)

        return strict
