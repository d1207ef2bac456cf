"""Reading a /verify request: multipart/form-data (files id_photo, live_photo) or JSON (base64
strings), optional device_id, reference and liveness (the kiosk's own presentation-attack check:
a JSON object, sent as a text field in multipart). The body is capped at settings.max_request_bytes
while it streams in: a declared Content-Length over the cap is refused before reading, and an
undeclared (chunked) body is refused as soon as it passes the cap. Anything malformed becomes
an ApiError with a stable code, never an exception the caller sees as a 5xx."""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.errors import (DUPLICATE_JSON_KEY, IMAGE_TOO_LARGE, INVALID_REQUEST, MISSING_FIELD, UNSUPPORTED_MEDIA_TYPE,
                            ApiError)

PHOTO_FIELDS = ("id_photo", "live_photo")
TEXT_FIELDS = {"device_id": 128, "reference": 256}  # name -> max length
LIVENESS = "liveness"
LIVENESS_KEYS = ("vendor", "score", "passed")
LIVENESS_VENDOR_MAX = 64
JSON_TYPES = ("application/json",)
MULTIPART_TYPES = ("multipart/form-data",)


@dataclass(frozen=True)
class Liveness:
    """The kiosk's own liveness (presentation-attack) check of the live photo, as it reported it."""
    vendor: str
    passed: bool
    score: float | None = None   # the vendor's score, in [0, 1]

    def to_record(self) -> dict:
        return {"vendor": self.vendor, "score": self.score, "passed": self.passed}


@dataclass
class VerifyInput:
    id_photo: bytes
    live_photo: bytes
    device_id: str | None = None
    reference: str | None = None
    liveness: Liveness | None = None


async def read_verify_input(request: Request, max_bytes: int) -> VerifyInput:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in JSON_TYPES + MULTIPART_TYPES:
        raise ApiError(UNSUPPORTED_MEDIA_TYPE, "send multipart/form-data (files id_photo, live_photo) "
                       "or application/json (base64 strings)", None, status=415)
    _check_declared_length(request, max_bytes)
    body = capped_stream(request, max_bytes)
    try:
        if content_type in MULTIPART_TYPES:
            fields = await _read_multipart(request, body)
        else:
            fields = _parse_json(b"".join([chunk async for chunk in body]))
    except ClientDisconnect as exc:
        raise ApiError(INVALID_REQUEST, "the client disconnected before the body was complete") from exc
    return VerifyInput(
        id_photo=fields["id_photo"],
        live_photo=fields["live_photo"],
        device_id=_text(fields, "device_id"),
        reference=_text(fields, "reference"),
        liveness=_liveness(fields.get(LIVENESS)),
    )


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(IMAGE_TOO_LARGE, f"the request body exceeds {max_bytes} bytes", None, status=413)


def _check_declared_length(request: Request, max_bytes: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError as exc:
        raise ApiError(INVALID_REQUEST, "Content-Length is not a number") from exc
    if length > max_bytes:
        raise _too_large(max_bytes)


async def capped_stream(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body, chunk by chunk, stopping with 413 once more than max_bytes have arrived."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(max_bytes)
        yield chunk


class _Utf8MultiPartParser(MultiPartParser):
    """Text fields must be UTF-8 (Starlette would fall back to Latin-1 and store garbage)."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError:
                name = part.field_name if part.field_name in (*TEXT_FIELDS, LIVENESS) else None
                raise ApiError(INVALID_REQUEST, f"the form field {part.field_name[:64]!r} is not valid UTF-8",
                               name) from None
        super().on_part_end()


async def _read_multipart(request: Request, body: AsyncIterator[bytes]) -> dict:
    parser = _Utf8MultiPartParser(request.headers, body, max_files=len(PHOTO_FIELDS), max_fields=16,
                             max_part_size=16 * 1024)
    try:
        form = await parser.parse()
    except ApiError:
        raise
    except MultiPartException as exc:
        raise ApiError(INVALID_REQUEST, f"malformed multipart body: {exc.message}") from exc
    except ClientDisconnect:
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart raises assorted errors on garbage
        raise ApiError(INVALID_REQUEST, "malformed multipart body") from exc
    try:
        fields: dict = {}
        for name in PHOTO_FIELDS:
            value = form.get(name)
            if value is None:
                raise ApiError(MISSING_FIELD, f"{name} is required (a file part)", name)
            if isinstance(value, str):
                raise ApiError(INVALID_REQUEST, f"{name} must be sent as a file part", name)
            fields[name] = await value.read()
        for name in TEXT_FIELDS:
            fields[name] = form.get(name)
        liveness = form.get(LIVENESS)
        if liveness is not None and not isinstance(liveness, str):
            raise ApiError(INVALID_REQUEST, "liveness must be a text field holding a JSON object", LIVENESS)
        fields[LIVENESS] = None if liveness is None else _liveness_json(liveness)
        return fields
    finally:
        await form.close()


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object_pairs_hook: an object naming a key twice is 400 `duplicate_json_key`
    (json.loads would silently keep the last value)."""
    out: dict = {}
    for name, value in pairs:
        if name in out:
            raise ApiError(DUPLICATE_JSON_KEY, f"the JSON body names {name[:64]!r} more than once", name[:64])
        out[name] = value
    return out


def _parse_json(raw: bytes) -> dict:
    try:
        doc = json.loads(raw, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(INVALID_REQUEST, "the body is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise ApiError(INVALID_REQUEST, "the body must be a JSON object")
    fields = {name: doc.get(name) for name in (*TEXT_FIELDS, LIVENESS)}
    for name in PHOTO_FIELDS:
        value = doc.get(name)
        if value is None:
            raise ApiError(MISSING_FIELD, f"{name} is required (a base64 string)", name)
        if not isinstance(value, str):
            raise ApiError(INVALID_REQUEST, f"{name} must be a base64 string", name)
        fields[name] = _b64decode(value, name)
    return fields


def _b64decode(value: str, field: str) -> bytes:
    if value.startswith("data:") and "," in value:  # data URL: data:image/jpeg;base64,....
        value = value.split(",", 1)[1]
    value = "".join(value.split())  # line breaks from wrapping encoders
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(INVALID_REQUEST, f"{field} is not valid base64", field) from exc


def _text(fields: dict, name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(INVALID_REQUEST, f"{name} must be a string", name)
    value = value.strip()
    if len(value) > TEXT_FIELDS[name]:
        raise ApiError(INVALID_REQUEST, f"{name} is longer than {TEXT_FIELDS[name]} characters", name)
    if any(not ch.isprintable() for ch in value):
        raise ApiError(INVALID_REQUEST, f"{name} contains control characters", name)
    return value or None


def _liveness_json(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ApiError(INVALID_REQUEST, "liveness is not valid JSON (send an object: vendor, score, passed)",
                       LIVENESS) from exc


def _liveness(value) -> Liveness | None:
    """{"vendor": str, "score": number in [0, 1] or null (optional), "passed": bool} or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(INVALID_REQUEST, "liveness must be a JSON object (vendor, score, passed)", LIVENESS)
    unknown = sorted(str(k)[:32] for k in value if k not in LIVENESS_KEYS)
    if unknown:
        raise ApiError(INVALID_REQUEST, f"liveness has unknown keys {unknown}; allowed: {list(LIVENESS_KEYS)}",
                       LIVENESS)
    vendor = value.get("vendor")
    if not isinstance(vendor, str) or not vendor.strip():
        raise ApiError(INVALID_REQUEST, "liveness.vendor is required: the liveness check's name", "liveness.vendor")
    vendor = vendor.strip()
    if len(vendor) > LIVENESS_VENDOR_MAX or any(not ch.isprintable() for ch in vendor):
        raise ApiError(INVALID_REQUEST, f"liveness.vendor must be at most {LIVENESS_VENDOR_MAX} printable "
                       "characters", "liveness.vendor")
    passed = value.get("passed")
    if not isinstance(passed, bool):
        raise ApiError(INVALID_REQUEST, "liveness.passed is required: true or false", "liveness.passed")
    score = value.get("score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:  # NaN fails too
            raise ApiError(INVALID_REQUEST, "liveness.score must be a number in [0, 1] (or null)", "liveness.score")
        score = float(score)
    return Liveness(vendor=vendor, passed=passed, score=score)
