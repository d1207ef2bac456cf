"""GET /audit (filters, keyset pagination, newest first) and GET /audit/{id}; operator or admin."""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from service.records import audit
from service.api import deps
from service.api.schemas import AUTH_ERRORS, AuditPage, AuditRecordAnswer, errors
from service.errors import INVALID_REQUEST, ApiError

router = APIRouter(tags=["audit"], dependencies=[Depends(deps.require("audit"))], responses=errors(*AUTH_ERRORS))


@router.get("/audit", response_model=AuditPage, responses=errors(400))
def list_audit(
    request: Request,
    since: datetime | None = Query(None, description="records at or after this time (ISO 8601; UTC if no zone)"),
    until: datetime | None = Query(None, description="records before this time"),
    decision: Literal["match", "no_match", "rejected"] | None = None,
    device_id: str | None = None,
    reference: str | None = None,
    error_code: str | None = None,
    min_score: float | None = Query(None, ge=0.0, le=1.0),
    max_score: float | None = Query(None, ge=0.0, le=1.0),
    model_version: str | None = Query(None, description="exactly this model version, e.g. towers:dual-v2"),
    scoring: str | None = Query(None, description="scores of this mode: a family (towers, sface), fused, or "
                                "fallback:<family>; records written before `scoring` was stored match by "
                                "their model_version's family"),
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, description="next_cursor from the previous page"),
) -> dict:
    flt = audit.AuditFilter(since=since, until=until, decision=decision, device_id=device_id,
                            reference=reference, error_code=error_code, min_score=min_score, max_score=max_score,
                            model_version=model_version, scoring=scoring)
    for name, why in flt.problems():
        raise ApiError(INVALID_REQUEST, f"{name}: {why}", name)
    try:
        records, next_cursor = audit.query(deps.engine(request), flt, limit, cursor)
    except ValueError as exc:
        raise ApiError(INVALID_REQUEST, "cursor is not valid; use next_cursor from a previous page", "cursor") from exc
    return {"items": [audit.to_public(r) for r in records], "next_cursor": next_cursor}


@router.get("/audit/{record_id}", response_model=AuditRecordAnswer, responses=errors(404))
def get_audit(record_id: str, request: Request) -> dict:
    if "\x00" in record_id:
        raise ApiError(INVALID_REQUEST, "id contains a NUL byte", "id")
    record = audit.get(deps.engine(request), record_id)
    if record is None:
        raise ApiError("not_found", f"no audit record {record_id}", "id", status=404)
    return audit.to_public(record)
