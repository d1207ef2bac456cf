"""The answers of every JSON route as pydantic models, so /openapi.json shows their schemas.
Field names and shapes are the wire format (README "API"); change them only with the clients."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    rule: str | None = None   # POST /verify: the decision-policy rule that refused (present only then)


class ErrorAnswer(BaseModel):
    """Every 4xx/5xx answer."""
    error: ErrorDetail


# --- /verify --------------------------------------------------------------------------------

class FaceAnswer(BaseModel):
    box: list[float] | None            # [x1, y1, x2, y2] in image pixels
    landmarks: list[list[float]] | None  # 5 x [x, y]
    detection_score: float | None
    face_px: float
    faces_seen: int | None
    quality: dict


class VerifyFaces(BaseModel):
    id_photo: FaceAnswer
    live_photo: FaceAnswer


class VerifyAnswer(BaseModel):
    request_id: str
    decision: Literal["match", "no_match"]
    score: float
    threshold: float
    far_target: float | None
    scores: dict[str, float | None]    # each family's score of the pair (null: that family had none)
    scoring: str                       # what scored: a family, "fused", or "fallback:<family>"
    rule: str                          # the decision-policy rule that decided: "score_threshold"
    model_version: str
    faces: VerifyFaces
    timings_ms: dict[str, float]
    live_photo_seen_before: bool | None   # decided on within IDV_REPLAY_WINDOW_SECONDS (null: not checked)


# --- /audit ---------------------------------------------------------------------------------

class AuditFace(BaseModel):
    faces_seen: int | None
    box: list[float] | None
    quality: dict | None
    sha256: str | None


class AuditFaces(BaseModel):
    id_photo: AuditFace
    live_photo: AuditFace


class AuditLiveness(BaseModel):
    vendor: str
    score: float | None
    passed: bool


class AuditRecordAnswer(BaseModel):
    id: str
    seq: int
    time: str
    key_id: int | None
    device_id: str | None
    reference: str | None
    decision: Literal["match", "no_match", "rejected"]
    score: float | None
    scores: dict[str, float | None] | None
    scoring: str | None
    rule: str | None                   # the decision-policy rule that decided (null: refused before one applied)
    liveness: AuditLiveness | None     # the kiosk's liveness result, as sent
    threshold: float | None
    far_target: float | None
    model_version: str | None
    faces: AuditFaces
    error_code: str | None
    error_field: str | None
    latency_ms: float
    timings_ms: dict[str, float] | None
    live_photo_seen_before: bool | None   # null: not checked (or a record from before the check)
    images_retained: bool
    prev_hash: str
    record_hash: str


class AuditPage(BaseModel):
    items: list[AuditRecordAnswer]
    next_cursor: str | None


# --- /admin/keys ----------------------------------------------------------------------------

Role = Literal["kiosk", "operator", "admin"]


class KeyAnswer(BaseModel):
    id: int
    role: Role
    name: str
    prefix: str
    created_at: str | None
    revoked_at: str | None
    device_id: str | None   # the device a kiosk key is bound to


class KeyCreated(BaseModel):
    """The plaintext key is in this answer only."""
    id: int
    key: str
    role: Role
    name: str
    prefix: str
    device_id: str | None


class KeyList(BaseModel):
    items: list[KeyAnswer]


# --- health ---------------------------------------------------------------------------------

class HealthAnswer(BaseModel):
    status: Literal["ok"]


class ReadyChecks(BaseModel):
    database: bool
    models: bool
    warm: bool


class ReadyAnswer(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: ReadyChecks
    model_version: str | None


ERROR_STATUSES = {
    400: "invalid_request, missing_field, duplicate_json_key or image_undecodable",
    401: "unauthorized: no X-API-Key, or an unknown or revoked one",
    403: "forbidden: the key's role may not call this; device_mismatch: the device_id is bound to another key",
    404: "not_found",
    409: "conflict: e.g. revoking the last active admin key, live_photo_replayed",
    413: "image_too_large: the body or an image is over its cap",
    415: "unsupported_media_type",
    422: "no_face, face_too_small or same_image",
    429: "rate_limited (Retry-After says when to retry)",
    500: "internal_error",
    503: "not_ready: the models are not loaded",
}
AUTH_ERRORS = (401, 403, 500)  # what every keyed route can answer


def errors(*statuses: int) -> dict:
    """`responses=` for a route: the error envelope (ErrorAnswer) under each status it can answer."""
    return {s: {"model": ErrorAnswer, "description": ERROR_STATUSES[s]} for s in sorted(set(statuses))}
