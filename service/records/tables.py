"""Every database table (SQLAlchemy 2, typed): keys, audit records, retained images and their
keys, console sessions. The schema is created and changed only by the Alembic migrations in
migrations/versions; keep both in step."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, String, false)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    # constraint names as the migrations spell them, the same on SQLite and PostgreSQL
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
    })


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(16))           # non-secret, for display
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex of the key
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # bound to one device: /verify with this key only for this device_id, and no other key may
    # use it (migration 0006)
    device_id: Mapped[str | None] = mapped_column(String(128), index=True)


# JSON columns store SQL NULL (not JSON 'null') for None
Json = JSON(none_as_null=True)


class AuditRecord(Base):
    """One /verify call. Rows are append-only and hash-chained (service/records/audit.py): every column
    except the image-retention ones is covered by record_hash."""
    __tablename__ = "audit_records"
    # replays: is this live photo's SHA-256 among the records of the last window? (migration 0006)
    __table_args__ = (Index("ix_audit_records_live_sha256_created_at", "live_sha256", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)   # = the answer's request_id
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)        # chain position, 1, 2, ...
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    device_id: Mapped[str | None] = mapped_column(String(128), index=True)
    reference: Mapped[str | None] = mapped_column(String(256), index=True)
    decision: Mapped[str] = mapped_column(String(16), index=True)    # match | no_match | rejected
    score: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    far_target: Mapped[float | None] = mapped_column(Float)          # FAR the threshold stands for
    model_version: Mapped[str | None] = mapped_column(String(64))
    scores: Mapped[dict | None] = mapped_column(Json)                # family -> score (migration 0003)
    scoring: Mapped[str | None] = mapped_column(String(32))          # a family, fused, fallback:<family>
    rule: Mapped[str | None] = mapped_column(String(64))             # the policy rule that decided (migration 0005)
    liveness: Mapped[dict | None] = mapped_column(Json)              # the kiosk's liveness result (migration 0005)

    id_faces: Mapped[int | None] = mapped_column(Integer)
    id_box: Mapped[list | None] = mapped_column(Json)
    id_quality: Mapped[dict | None] = mapped_column(Json)
    id_sha256: Mapped[str | None] = mapped_column(String(64))
    live_faces: Mapped[int | None] = mapped_column(Integer)
    live_box: Mapped[list | None] = mapped_column(Json)
    live_quality: Mapped[dict | None] = mapped_column(Json)
    live_sha256: Mapped[str | None] = mapped_column(String(64))
    live_seen_before: Mapped[bool | None] = mapped_column(Boolean)   # decided on within the replay window

    error_code: Mapped[str | None] = mapped_column(String(64), index=True)
    error_field: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[float] = mapped_column(Float)
    timings_ms: Mapped[dict | None] = mapped_column(Json)

    prev_hash: Mapped[str] = mapped_column(String(64))
    record_hash: Mapped[str] = mapped_column(String(64))

    # Optional image retention (the encrypted blobs live in a separate table when enabled).
    # Not covered by record_hash, so a purge can clear them without breaking the chain.
    images_retained: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    retain_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RetainedImage(Base):
    """One encrypted upload (service/records/retention.py). Created by migration 0002."""
    __tablename__ = "retained_images"
    __table_args__ = (CheckConstraint("side IN ('id', 'live')", name="ck_retained_images_side"),)

    audit_id: Mapped[str] = mapped_column(String(36), ForeignKey("audit_records.id", ondelete="CASCADE"),
                                          primary_key=True)
    side: Mapped[str] = mapped_column(String(8), primary_key=True)          # id | live
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ImageKey(Base):
    """A record's own data key for its retained images, wrapped by IDV_IMAGE_KEY; deleted by
    purge (service/records/retention.py). Created by migration 0007 (UNLOGGED on PostgreSQL)."""
    __tablename__ = "image_keys"

    audit_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ConsoleSession(Base):
    """A console sign-in (service/console/sessions.py). Created by migration 0002."""
    __tablename__ = "console_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)   # SHA-256 hex of the cookie value
    key_id: Mapped[int] = mapped_column(Integer, ForeignKey("api_keys.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
