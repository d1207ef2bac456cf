"""Optional image retention: both photos of a /verify call, encrypted at rest; `idverify audit purge`.

Off by default. With IDV_RETAIN_IMAGES=true a /verify call stores the uploads that passed decoding
(what the pipeline could not or would not decode is never kept) in `retained_images` (audit id, side, ciphertext, created_at), encrypted with
AES-256-GCM under IDV_IMAGE_KEY (urlsafe base64 of 32 bytes, e.g. the output of
`idverify audit image-key`). Each blob is bound to its record and side (they are the GCM
associated data), so a blob copied onto another record does not decrypt. The service refuses to
start when retention is on and the key is missing or malformed (`cipher_for`).

The audit record only gets `images_retained` / `retain_until` set; those columns are outside the
record hash, so `purge` (delete images older than IDV_RETENTION_DAYS, clear the flag) leaves the
chain verifiable. Records and their hashes are never deleted.

Blob layout: b"IDV1" | 12-byte random nonce | ciphertext+tag.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, delete, func, select, update

from service.records.engine import read_session, write_session
from service.records.tables import AuditRecord, RetainedImage

log = logging.getLogger("idverify.retention")

SIDES = {"id_photo": "id", "live_photo": "live"}   # request field -> stored side
MAGIC = b"IDV1"
NONCE_LEN = 12


class RetentionConfigError(RuntimeError):
    pass


class ImageDecryptError(Exception):
    pass


def generate_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


class ImageCipher:
    """AES-256-GCM with the record id and side as associated data."""

    def __init__(self, key: str):
        try:
            raw = base64.urlsafe_b64decode(key.strip() + "=" * (-len(key.strip()) % 4))
        except (binascii.Error, ValueError) as exc:
            raise RetentionConfigError("IDV_IMAGE_KEY is not urlsafe base64") from exc
        if len(raw) != 32:
            raise RetentionConfigError(f"IDV_IMAGE_KEY must encode 32 bytes (it encodes {len(raw)}); "
                                       "make one with `idverify audit image-key`")
        self._aead = AESGCM(raw)

    @staticmethod
    def _aad(audit_id: str, side: str) -> bytes:
        return f"idverify/retained/{audit_id}/{side}".encode()

    def encrypt(self, plaintext: bytes, audit_id: str, side: str) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return MAGIC + nonce + self._aead.encrypt(nonce, plaintext, self._aad(audit_id, side))

    def decrypt(self, blob: bytes, audit_id: str, side: str) -> bytes:
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_LEN + 16:
            raise ImageDecryptError("not a retained-image blob")
        nonce = blob[len(MAGIC):len(MAGIC) + NONCE_LEN]
        try:
            return self._aead.decrypt(nonce, blob[len(MAGIC) + NONCE_LEN:], self._aad(audit_id, side))
        except InvalidTag as exc:
            raise ImageDecryptError("wrong key, or the blob was altered or moved to another record") from exc


def cipher_for(settings) -> ImageCipher | None:
    """The cipher for retained images: None when retention is off and no key is set. Raises
    RetentionConfigError (the service refuses to start) when retention is on without a usable key."""
    if settings.retain_images and not settings.image_key:
        raise RetentionConfigError("IDV_RETAIN_IMAGES is on but IDV_IMAGE_KEY is not set: refusing to start "
                                   "(make a key with `idverify audit image-key`)")
    if settings.retain_images and settings.retention_days < 1:
        raise RetentionConfigError("IDV_RETENTION_DAYS must be at least 1")
    # with retention off a key may still be set, so the console can show images kept earlier
    return ImageCipher(settings.image_key) if settings.image_key else None


# --- writing --------------------------------------------------------------------------------

def store(engine: Engine, cipher: ImageCipher, audit_id: str, images: dict[str, bytes], retention_days: int,
          now: datetime | None = None) -> None:
    """Encrypt and store `images` (side -> bytes) for an existing audit record, and mark it."""
    now = now or datetime.now(timezone.utc)
    rows = [RetainedImage(audit_id=audit_id, side=side, ciphertext=cipher.encrypt(data, audit_id, side),
                          created_at=now)
            for side, data in images.items() if data]
    if not rows:
        return
    with write_session(engine) as s:
        s.add_all(rows)
        s.execute(update(AuditRecord).where(AuditRecord.id == audit_id)
                  .values(images_retained=True, retain_until=now + timedelta(days=retention_days)))


def retain_request(engine: Engine, cipher: ImageCipher | None, settings, audit_id: str, inp,
                   decoded: set[str] | None = None) -> None:
    """Called by /verify after its audit record is committed: store the request's uploads named
    in `decoded` (the fields that passed decoding; None = both) when retention is on. A failure
    is logged, not raised (the record then says images_retained = false); the answer still goes out."""
    if not settings.retain_images or inp is None:
        return
    try:
        images = {side: getattr(inp, field) for field, side in SIDES.items() if decoded is None or field in decoded}
        store(engine, cipher, audit_id, images, settings.retention_days)
    except Exception:  # noqa: BLE001 - retention must not turn a verified answer into an error
        log.exception("could not retain the images of %s", audit_id)


# --- reading --------------------------------------------------------------------------------

def stored_sides(engine: Engine, audit_id: str) -> list[str]:
    with read_session(engine) as s:
        return sorted(s.scalars(select(RetainedImage.side).where(RetainedImage.audit_id == audit_id)))


def load(engine: Engine, cipher: ImageCipher | None, audit_id: str, side: str) -> bytes | None:
    """The plaintext image, or None when nothing is stored. ImageDecryptError on a wrong key."""
    with read_session(engine) as s:
        row = s.get(RetainedImage, (audit_id, side))
    if row is None:
        return None
    if cipher is None:
        raise ImageDecryptError("IDV_IMAGE_KEY is not set")
    return cipher.decrypt(row.ciphertext, audit_id, side)


# --- purge ----------------------------------------------------------------------------------

@dataclass
class PurgeResult:
    images: int
    records: int
    cutoff: datetime


def purge(engine: Engine, retention_days: int, now: datetime | None = None, dry_run: bool = False) -> PurgeResult:
    """Delete retained images stored before now - retention_days and clear `images_retained` on
    records left without images. Audit records and their hashes are untouched."""
    if retention_days < 0:
        raise ValueError("retention_days must be >= 0")
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=retention_days)
    with write_session(engine) as s:
        ids = sorted(set(s.scalars(select(RetainedImage.audit_id).where(RetainedImage.created_at < cutoff))))
        images = s.scalar(select(func.count()).where(RetainedImage.created_at < cutoff)) or 0
        if dry_run or not ids:
            return PurgeResult(images, len(ids), cutoff)
        s.execute(delete(RetainedImage).where(RetainedImage.created_at < cutoff))
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            still = select(RetainedImage.audit_id).where(RetainedImage.audit_id.in_(part))
            s.execute(update(AuditRecord).where(AuditRecord.id.in_(part), AuditRecord.id.not_in(still))
                      .values(images_retained=False))
    return PurgeResult(images, len(ids), cutoff)

