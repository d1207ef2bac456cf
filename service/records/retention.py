"""Optional image retention: both photos of a /verify call, encrypted at rest; `idverify audit purge`.

Off by default. With IDV_RETAIN_IMAGES=true a /verify call stores the uploads that passed decoding
(what the pipeline could not or would not decode is never kept) in `retained_images` (audit id,
side, ciphertext, created_at). Each record's images are encrypted with AES-256-GCM under a random
data key of their own, kept in `image_keys` wrapped (AES-256-GCM) by IDV_IMAGE_KEY (urlsafe base64
of 32 bytes, e.g. the output of `idverify audit image-key`). Each blob is bound to its record and
side, each wrapped key to its record (the GCM associated data), so neither decrypts elsewhere.
The service refuses to start when retention is on and the key is missing or malformed (`cipher_for`).

The audit record only gets `images_retained` / `retain_until` set; those columns are outside the
record hash, so `purge` (delete images older than IDV_RETENTION_DAYS, clear the flag) leaves the
chain verifiable. Records and their hashes are never deleted.

Purge deletes the images and their data keys. Copies of the ciphertext may stay in the database
files (free pages, dead tuples, TOAST, the WAL); without the data key they cannot be decrypted,
IDV_IMAGE_KEY or not. So the key must not linger either: SQLite deletes with secure_delete (the
engine sets it: deleted rows are zeroed) and purge ends with a truncating WAL checkpoint;
PostgreSQL keeps the keys in an UNLOGGED table (never written to the WAL) that purge rewrites
(VACUUM FULL), which drops the file holding the deleted keys (docs/security.md).

Blob layouts (nonces 12 random bytes): image b"IDV2" | nonce | ciphertext+tag under the record's
data key; wrapped data key b"IDK1" | nonce | ciphertext+tag under IDV_IMAGE_KEY; and images kept
before per-record keys, still readable: b"IDV1" | nonce | ciphertext+tag under IDV_IMAGE_KEY.
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
from sqlalchemy import Engine, delete, func, select, text, update

from service.records.engine import read_session, write_session
from service.records.tables import AuditRecord, ImageKey, RetainedImage

log = logging.getLogger("idverify.retention")

SIDES = {"id_photo": "id", "live_photo": "live"}   # request field -> stored side
MAGIC = b"IDV1"       # an image under IDV_IMAGE_KEY itself (kept before per-record keys)
MAGIC_V2 = b"IDV2"    # an image under its record's data key
KEY_MAGIC = b"IDK1"   # a record's data key under IDV_IMAGE_KEY
NONCE_LEN = 12


class RetentionConfigError(RuntimeError):
    pass


class ImageDecryptError(Exception):
    pass


def generate_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def _seal(aead: AESGCM, magic: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_LEN)
    return magic + nonce + aead.encrypt(nonce, plaintext, aad)


def _open(aead: AESGCM, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < len(MAGIC) + NONCE_LEN + 16:
        raise ImageDecryptError("not a retained-image blob")
    nonce = blob[len(MAGIC):len(MAGIC) + NONCE_LEN]
    try:
        return aead.decrypt(nonce, blob[len(MAGIC) + NONCE_LEN:], aad)
    except InvalidTag as exc:
        raise ImageDecryptError("wrong key, or the blob was altered or moved to another record") from exc


class ImageCipher:
    """IDV_IMAGE_KEY: wraps each record's data key; images are AES-256-GCM under that data key,
    with the record id and side as associated data."""

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

    @staticmethod
    def _key_aad(audit_id: str) -> bytes:
        return f"idverify/image-key/{audit_id}".encode()

    def new_data_key(self, audit_id: str) -> tuple[bytes, bytes]:
        """(data key, the data key wrapped for `audit_id`)."""
        data_key = AESGCM.generate_key(bit_length=256)
        return data_key, _seal(self._aead, KEY_MAGIC, data_key, self._key_aad(audit_id))

    def unwrap(self, wrapped: bytes, audit_id: str) -> bytes:
        if not wrapped.startswith(KEY_MAGIC):
            raise ImageDecryptError("not a wrapped image key")
        return _open(self._aead, wrapped, self._key_aad(audit_id))

    def encrypt(self, plaintext: bytes, audit_id: str, side: str, data_key: bytes | None = None) -> bytes:
        """Under the record's `data_key` (IDV2); without one, under IDV_IMAGE_KEY itself (IDV1)."""
        if data_key is None:
            return _seal(self._aead, MAGIC, plaintext, self._aad(audit_id, side))
        return _seal(AESGCM(data_key), MAGIC_V2, plaintext, self._aad(audit_id, side))

    def decrypt(self, blob: bytes, audit_id: str, side: str, data_key: bytes | None = None) -> bytes:
        if blob.startswith(MAGIC_V2):
            if data_key is None:
                raise ImageDecryptError("the image's data key is gone (purged, or lost with an unlogged table)")
            return _open(AESGCM(data_key), blob, self._aad(audit_id, side))
        if blob.startswith(MAGIC):
            return _open(self._aead, blob, self._aad(audit_id, side))
        raise ImageDecryptError("not a retained-image blob")


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
    """Encrypt `images` (side -> bytes) under a new data key and store them with the key (wrapped)
    for an existing audit record, and mark it."""
    now = now or datetime.now(timezone.utc)
    data_key, wrapped = cipher.new_data_key(audit_id)
    rows = [RetainedImage(audit_id=audit_id, side=side, ciphertext=cipher.encrypt(data, audit_id, side, data_key),
                          created_at=now)
            for side, data in images.items() if data]
    if not rows:
        return
    with write_session(engine) as s:
        s.add(ImageKey(audit_id=audit_id, wrapped_key=wrapped, created_at=now))
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
        key = s.get(ImageKey, audit_id) if row is not None else None
    if row is None:
        return None
    if cipher is None:
        raise ImageDecryptError("IDV_IMAGE_KEY is not set")
    data_key = cipher.unwrap(key.wrapped_key, audit_id) if key is not None else None
    return cipher.decrypt(row.ciphertext, audit_id, side, data_key)


# --- purge ----------------------------------------------------------------------------------

@dataclass
class PurgeResult:
    images: int
    records: int
    cutoff: datetime
    keys: int = 0                   # data keys deleted (with their records' last images)
    unscrubbed: str | None = None   # why the deleted keys' bytes may still be in the files


def purge(engine: Engine, retention_days: int, now: datetime | None = None, dry_run: bool = False) -> PurgeResult:
    """Delete retained images stored before now - retention_days, the data keys of records left
    without images, and clear `images_retained` on those records; then `scrub` the files. Audit
    records and their hashes are untouched."""
    if retention_days < 0:
        raise ValueError("retention_days must be >= 0")
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=retention_days)
    with write_session(engine) as s:
        ids = sorted(set(s.scalars(select(RetainedImage.audit_id).where(RetainedImage.created_at < cutoff))))
        images = s.scalar(select(func.count()).where(RetainedImage.created_at < cutoff)) or 0
        if dry_run:
            return PurgeResult(images, len(ids), cutoff)
        s.execute(delete(RetainedImage).where(RetainedImage.created_at < cutoff))
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            still = select(RetainedImage.audit_id).where(RetainedImage.audit_id.in_(part))
            s.execute(update(AuditRecord).where(AuditRecord.id.in_(part), AuditRecord.id.not_in(still))
                      .values(images_retained=False))
        # every key without images (a store is one transaction: its key and images appear together)
        keys = s.execute(delete(ImageKey).where(ImageKey.audit_id.not_in(select(RetainedImage.audit_id)))).rowcount
    return PurgeResult(images, len(ids), cutoff, keys or 0, scrub(engine))


def scrub(engine: Engine) -> str | None:
    """Leave no deleted data key in the database files. None when done, else why not (purge
    again later). SQLite: the deleted rows are already zeroed (secure_delete); a truncating
    checkpoint empties the WAL that still holds their earlier pages. PostgreSQL: VACUUM FULL
    rewrites the (unlogged) key table, and the file with the deleted keys is dropped."""
    try:
        if engine.dialect.name == "sqlite":
            raw = engine.raw_connection()
            try:
                busy, _, _ = raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                raw.close()
            return "the WAL is in use by a reader; its old pages stay until a later checkpoint" if busy else None
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM FULL image_keys"))
        return None
    except Exception as exc:  # noqa: BLE001 - the keys are deleted; the caller reports what is left
        log.warning("could not scrub the deleted image keys: %s", exc)
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
