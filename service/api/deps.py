"""What the routes share: the app's state, and authentication by X-API-Key with roles."""
from __future__ import annotations

from fastapi import Request
from sqlalchemy import Engine

from service.records import keys
from service.records.tables import ApiKey
from service.errors import FORBIDDEN, UNAUTHORIZED, ApiError

API_KEY_HEADER = "X-API-Key"


def engine(request: Request) -> Engine:
    return request.app.state.engine


def models(request: Request):
    """The loaded models (service.face.loader.Models); 503 `not_ready` while they are not."""
    m = request.app.state.models
    if m is None:
        raise ApiError("not_ready", "the models are not loaded", None, status=503)
    return m


def authenticate(request: Request) -> ApiKey:
    """The caller's active key. 401 `unauthorized` when the header is missing or the key is
    unknown or revoked. (Blocking: a database lookup.)"""
    key = keys.lookup(engine(request), request.headers.get(API_KEY_HEADER))
    if key is None:
        raise ApiError(UNAUTHORIZED, f"a valid {API_KEY_HEADER} header is required", None, status=401)
    return key


def authorize(key: ApiKey, permission: str) -> None:
    """403 `forbidden` when the key's role may not do this."""
    if not keys.allowed(key.role, permission):
        raise ApiError(FORBIDDEN, f"a {key.role} key may not {permission}", None, status=403)


def require(permission: str):
    """Route dependency: an authenticated key whose role has `permission`."""

    def dependency(request: Request) -> ApiKey:
        key = authenticate(request)
        authorize(key, permission)
        return key

    return dependency
