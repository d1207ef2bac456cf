"""Errors a caller can act on: a stable code, a message, the field, an HTTP status."""
from __future__ import annotations


class ApiError(Exception):
    status = 400

    def __init__(self, code: str, message: str, field: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = {}

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


# Stable codes used across the pipeline (the HTTP layer adds auth/rate codes).
MISSING_FIELD = "missing_field"
INVALID_REQUEST = "invalid_request"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
IMAGE_UNDECODABLE = "image_undecodable"
IMAGE_TOO_LARGE = "image_too_large"
NO_FACE = "no_face"
FACE_TOO_SMALL = "face_too_small"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"
INTERNAL_ERROR = "internal_error"
NOT_READY = "not_ready"
BUSY = "busy"
DATABASE_UNAVAILABLE = "database_unavailable"
# decision policy refusals (service/face/policy.py), 422
MULTIPLE_FACES = "multiple_faces"
QUALITY_BLURRY = "quality_blurry"
QUALITY_UNDEREXPOSED = "quality_underexposed"
QUALITY_OVEREXPOSED = "quality_overexposed"
QUALITY_OFF_FRONTAL = "quality_off_frontal"
QUALITY_SMALL_FACE = "quality_small_face"
LIVENESS_REQUIRED = "liveness_required"
LIVENESS_FAILED = "liveness_failed"
REQUEST_TIMEOUT = "request_timeout"
# replays, the same image, device binding, strict JSON
SAME_IMAGE = "same_image"                      # 422: the live photo is the chip photo (bytes or pixels)
LIVE_PHOTO_REPLAYED = "live_photo_replayed"    # 409: seen before, IDV_REFUSE_REPLAYED_LIVE on
DEVICE_MISMATCH = "device_mismatch"            # 403: the device_id is bound to another key
DUPLICATE_JSON_KEY = "duplicate_json_key"      # 400: a JSON object names a key twice


def database_unavailable() -> ApiError:
    """503 database_unavailable with Retry-After: the audit store cannot be reached."""
    err = ApiError(DATABASE_UNAVAILABLE, "the database is unavailable; retry shortly", None, status=503)
    err.headers = {"Retry-After": "2"}
    return err


# --- bounded waits ---------------------------------------------------------------------------
DEADLINE_EXCEEDED = "deadline_exceeded"


def deadline_exceeded(seconds: float) -> ApiError:
    """503 deadline_exceeded with Retry-After: the call was not answered with a decision in time."""
    err = ApiError(DEADLINE_EXCEEDED, f"no answer within {seconds:g} s (the database or the service is slow); "
                   "retry shortly", None, status=503)
    err.headers = {"Retry-After": "2"}
    return err
