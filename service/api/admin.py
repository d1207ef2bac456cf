"""Key management for admins: POST/GET /admin/keys, DELETE /admin/keys/{id}."""
from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field, field_validator

from service.records import keys
from service.api import deps
from service.api.schemas import AUTH_ERRORS, KeyAnswer, KeyCreated, KeyList, errors
from service.errors import INVALID_REQUEST, ApiError
from service.middleware import CALLER

log = logging.getLogger("idverify.admin")
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(deps.require("keys"))],
                   responses=errors(*AUTH_ERRORS), route_class=deps.StrictJsonRoute)


class KeyCreate(BaseModel):
    role: Literal["kiosk", "operator", "admin"]
    name: str = Field(min_length=1, max_length=200)
    device_id: str | None = Field(None, min_length=1, max_length=keys.DEVICE_ID_MAX,
                                  description="kiosk keys only: bind the key to this device_id")

    @field_validator("name", "device_id")
    @classmethod
    def printable(cls, value: str | None) -> str | None:
        if value is not None and not value.isprintable():   # NUL bytes among them: PostgreSQL refuses them
            raise ValueError("must not contain control characters")
        return value


@router.post("/keys", status_code=201, response_model=KeyCreated, responses=errors(400))
def create_key(body: KeyCreate, request: Request) -> dict:
    """The plaintext key is in this answer only; it is stored hashed."""
    if body.device_id is not None and body.role != "kiosk":
        raise ApiError(INVALID_REQUEST, "only a kiosk key can be bound to a device_id", "device_id")
    key, plaintext = keys.create_key(deps.engine(request), body.role, body.name,
                                     pepper=request.app.state.settings.key_pepper, device_id=body.device_id)
    log.info("admin: key %d (%s) created by key %s", key.id, key.role, _caller(request))
    return {"id": key.id, "key": plaintext, "role": key.role, "name": key.name, "prefix": key.prefix,
            "device_id": key.device_id}


@router.get("/keys", response_model=KeyList)
def list_keys(request: Request) -> dict:
    return {"items": [keys.public(k) for k in keys.list_keys(deps.engine(request))]}


@router.delete("/keys/{key_id}", response_model=KeyAnswer, responses=errors(400, 404, 409))
def revoke_key(request: Request, key_id: int = Path(ge=1, le=keys.MAX_KEY_ID)) -> dict:
    try:
        key = keys.revoke_key(deps.engine(request), key_id, keep_last_admin=True)
    except keys.LastAdminKey as exc:
        raise ApiError("last_admin_key", str(exc), "id", status=409) from exc
    if key is None:
        raise ApiError("not_found", f"no key {key_id}", "id", status=404)
    log.info("admin: key %d (%s) revoked by key %s", key.id, key.role, _caller(request))
    return keys.public(key)


def _caller(request: Request):
    return getattr(request.state, CALLER, {}).get("key_id")
