"""Audit trail: append-only, hash-chained records of every authenticated /verify call.

Each record carries `seq` (1, 2, 3, ...), `prev_hash` (the previous record's hash; 64 zeros for
the first) and `record_hash` = SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8)
of its content fields including prev_hash. Appends are serialised so the chain stays linear
under concurrent calls: PostgreSQL takes a transaction-level advisory lock, SQLite the write
lock (BEGIN IMMEDIATE, see service.records.engine.write_session). A record is committed before the answer
goes out. `verify_chain` walks the chain and names the first record that does not hold.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
from sqlalchemy import Engine, Select, and_, exc as sa_exc, or_, select, text
from sqlalchemy.orm import Session

from service.records.engine import read_session, write_session
from service.records.tables import AuditRecord

GENESIS = "0" * 64
MAX_SEQ = 2**63 - 1   # BIGINT
# pg_advisory_xact_lock key for chain appends (any constant unique to this purpose)
CHAIN_LOCK_ID = 0x1D5E_A0D1
# SQLSTATE of the PostgreSQL trigger that refuses a record committing past its answer deadline
ANSWER_LATE_SQLSTATE = "IDV01"
# Fields covered by record_hash. The image-retention columns are deliberately not.
HASHED_FIELDS = (
    "id", "seq", "created_at", "key_id", "device_id", "reference", "decision", "score",
    "threshold", "far_target", "model_version",
    "id_faces", "id_box", "id_quality", "id_sha256",
    "live_faces", "live_box", "live_quality", "live_sha256",
    "error_code", "error_field", "latency_ms", "timings_ms", "prev_hash",
)
# Added later (migrations 0004-0006): hashed only when set, so records written before them still verify.
HASHED_IF_SET = ("scores", "scoring", "rule", "liveness", "live_seen_before")
FLOAT_FIELDS = {"score", "threshold", "far_target", "latency_ms"}
SIDE_FIELDS = {"id_photo": "id", "live_photo": "live"}


# --- canonical form and hash ----------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """Plain JSON values (numpy scalars/arrays, tuples -> lists; NaN/inf -> None), so what is
    stored, read back and hashed is the same on SQLite and PostgreSQL."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def utc(dt: datetime) -> datetime:
    """SQLite hands datetimes back naive (they were stored as UTC); PostgreSQL aware. A time whose
    UTC equivalent falls outside datetime's range (0001-01-01T00:00+01:00) is clamped to the
    range's end."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    try:
        return dt.astimezone(timezone.utc)
    except OverflowError:
        return (datetime.min if dt.year == datetime.min.year else datetime.max).replace(tzinfo=timezone.utc)


def _canonical_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "created_at":
        return utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if name in FLOAT_FIELDS:
        return float(value)
    return value


def canonical(record: AuditRecord) -> bytes:
    content = {name: _canonical_value(name, getattr(record, name)) for name in HASHED_FIELDS}
    content.update({name: getattr(record, name) for name in HASHED_IF_SET if getattr(record, name) is not None})
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def compute_hash(record: AuditRecord) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


# --- writing --------------------------------------------------------------------------------

def side_columns(field: str, side: Any) -> dict:
    """The audit columns for one side (a pipeline Side, or None when the body was never read)."""
    prefix = SIDE_FIELDS[field]
    if side is None:
        return {}
    return {
        f"{prefix}_faces": side.faces_seen,
        f"{prefix}_box": side.box,  # as answered
        f"{prefix}_quality": jsonable(side.quality) or None,
        f"{prefix}_sha256": side.sha256,
    }


def _lock_chain(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHAIN_LOCK_ID})
    # SQLite: write_session already holds the database write lock (BEGIN IMMEDIATE)


class AnswerLate(Exception):
    """The call's answer deadline passed before its record could commit: nothing was written."""


def _answer_by(session: Session, seconds: float) -> None:
    """PostgreSQL: the commit-time trigger of migration 0007 refuses this transaction's record
    once the server's clock is `seconds` past now (a commit held up by a stopped server)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT set_config('idv.answer_by', "
                             "(clock_timestamp() + make_interval(secs => :s))::text, true)"), {"s": seconds})


def append(engine: Engine, guard: Any = None, **columns: Any) -> AuditRecord:
    """Write one record at the head of the chain and commit it. `columns` are AuditRecord
    columns other than seq, created_at, prev_hash and record_hash, which are set here.

    `guard` (a call's answer deadline, service/api/deadline.py): the record commits only while
    its caller can still be answered with it; else AnswerLate and nothing is written. Checked
    just before COMMIT (`guard.begin_commit()`), and on PostgreSQL again by the server at commit."""
    record = AuditRecord(**{k: jsonable(v) for k, v in columns.items()})
    committing = False
    try:
        with write_session(engine) as s:
            _lock_chain(s)
            if guard is not None:
                _answer_by(s, max(0.0, guard.commit_remaining()))
            head = s.execute(select(AuditRecord.seq, AuditRecord.record_hash)
                             .order_by(AuditRecord.seq.desc()).limit(1)).first()
            record.seq = head.seq + 1 if head else 1
            record.prev_hash = head.record_hash if head else GENESIS
            record.created_at = datetime.now(timezone.utc)
            record.images_retained = False
            record.record_hash = compute_hash(record)
            s.add(record)
            if guard is not None:
                s.flush()
                if not guard.begin_commit():
                    raise AnswerLate(record.id)
                committing = True
    except BaseException as exc:
        if committing:
            guard.end_commit(False)
            if isinstance(exc, sa_exc.DBAPIError) and getattr(exc.orig, "sqlstate", None) == ANSWER_LATE_SQLSTATE:
                raise AnswerLate(record.id) from exc
        raise
    if committing:
        guard.end_commit(True)
    return record


# --- reading --------------------------------------------------------------------------------

def to_public(record: AuditRecord) -> dict:
    def side(prefix: str) -> dict:
        return {
            "faces_seen": getattr(record, f"{prefix}_faces"),
            "box": getattr(record, f"{prefix}_box"),
            "quality": getattr(record, f"{prefix}_quality"),
            "sha256": getattr(record, f"{prefix}_sha256"),
        }

    return {
        "id": record.id,
        "seq": record.seq,
        "time": utc(record.created_at).isoformat(),
        "key_id": record.key_id,
        "device_id": record.device_id,
        "reference": record.reference,
        "decision": record.decision,
        "score": record.score,
        "scores": record.scores,
        "scoring": record.scoring,
        "rule": record.rule,
        "liveness": record.liveness,
        "threshold": record.threshold,
        "far_target": record.far_target,
        "model_version": record.model_version,
        "faces": {field: side(prefix) for field, prefix in SIDE_FIELDS.items()},
        "error_code": record.error_code,
        "error_field": record.error_field,
        "latency_ms": record.latency_ms,
        "timings_ms": record.timings_ms,
        "live_photo_seen_before": record.live_seen_before,
        "images_retained": record.images_retained,
        "prev_hash": record.prev_hash,
        "record_hash": record.record_hash,
    }


def live_photo_seen(engine: Engine, sha256: str, since: datetime) -> bool:
    """Was a live photo with this SHA-256 decided on (match or no_match) since then? One probe
    of the (live_sha256, created_at) index."""
    R = AuditRecord
    stmt = (select(R.seq).where(R.live_sha256 == sha256, R.created_at >= utc(since),
                                R.decision.in_(("match", "no_match"))).limit(1))
    with read_session(engine) as s:
        return s.execute(stmt).first() is not None


def plausible_id(record_id: str) -> bool:
    """Could this be a record id (a UUID string)? NUL bytes never reach the database
    (PostgreSQL refuses them in text)."""
    return 0 < len(record_id) <= 36 and "\x00" not in record_id


def get(engine: Engine, record_id: str) -> AuditRecord | None:
    if not plausible_id(record_id):
        return None
    with read_session(engine) as s:
        return s.get(AuditRecord, record_id)


# --- scoring modes ----------------------------------------------------------------------------

# `scoring` as /verify writes it: a family ("towers", "sface"), "fused" or "fallback:<family>";
# at most AuditRecord.scoring's 32 characters
SCORING_RE = re.compile(r"(fallback:)?[a-z0-9][a-z0-9_-]{0,22}")
MODEL_VERSION_MAX = 64   # AuditRecord.model_version's length


def score_mode(score: float | None, scoring: str | None, model_version: str | None) -> str | None:
    """The scale a record's score is on: `scoring` as stored; for a score written before
    `scoring` was stored (one family then), the family its model_version names
    ("towers:dual-v2" -> "towers"). None when there is no score and no scoring. The SQL twin is
    AuditFilter's `scoring` condition."""
    if scoring or score is None:
        return scoring
    family, sep, _ = (model_version or "").partition(":")
    return family if sep and family else None


def filter_problem(name: str, value: str) -> str | None:
    """Why a text filter's value is refused, or None. Every text filter: no NUL byte (PostgreSQL
    refuses them in text); `model_version` fits its column; `scoring` is a mode's shape."""
    if "\x00" in value:
        return "contains a NUL byte"
    if name == "model_version" and len(value) > MODEL_VERSION_MAX:
        return f"at most {MODEL_VERSION_MAX} characters (a model version as records show it, e.g. towers:dual-v2)"
    if name == "scoring" and not SCORING_RE.fullmatch(value):
        return "a scoring mode: a family (e.g. towers, sface), fused, or fallback:<family>"
    return None


@dataclass
class AuditFilter:
    since: datetime | None = None
    until: datetime | None = None
    decision: str | None = None
    device_id: str | None = None
    reference: str | None = None
    error_code: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    model_version: str | None = None
    scoring: str | None = None         # the score's mode (score_mode): older records by model_version

    TEXT_FIELDS = ("device_id", "reference", "error_code", "model_version", "scoring")

    def problems(self) -> list[tuple[str, str]]:
        """(field, why) for each text filter value no record can hold or the database must not see."""
        found = ((name, filter_problem(name, value)) for name in self.TEXT_FIELDS
                 if (value := getattr(self, name)) is not None)
        return [(name, why) for name, why in found if why]

    def apply(self, stmt: Select) -> Select:
        R = AuditRecord
        if self.since is not None:
            stmt = stmt.where(R.created_at >= utc(self.since))
        if self.until is not None:
            stmt = stmt.where(R.created_at < utc(self.until))
        for name in ("decision", "device_id", "reference", "error_code", "model_version"):
            value = getattr(self, name)
            if value is not None:
                stmt = stmt.where(getattr(R, name) == value)
        if self.scoring is not None:
            stmt = stmt.where(or_(R.scoring == self.scoring, and_(
                R.scoring.is_(None), R.score.is_not(None),
                R.model_version.startswith(self.scoring + ":", autoescape=True))))
        if self.min_score is not None:
            stmt = stmt.where(R.score >= self.min_score)
        if self.max_score is not None:
            stmt = stmt.where(R.score <= self.max_score)
        return stmt


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"before": seq}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """ValueError when the cursor is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        seq = json.loads(raw)["before"]
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor") from exc
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_SEQ:
        raise ValueError("invalid cursor")
    return seq


def query(engine: Engine, flt: AuditFilter, limit: int, cursor: str | None = None) -> tuple[list[AuditRecord], str | None]:
    """Newest first, keyset-paginated on seq. Returns (records, next_cursor or None)."""
    stmt = flt.apply(select(AuditRecord))
    if cursor:
        stmt = stmt.where(AuditRecord.seq < decode_cursor(cursor))
    stmt = stmt.order_by(AuditRecord.seq.desc()).limit(limit + 1)
    with read_session(engine) as s:
        records = list(s.scalars(stmt))
    if len(records) > limit:
        return records[:limit], encode_cursor(records[limit - 1].seq)
    return records, None


# --- verification ---------------------------------------------------------------------------

@dataclass
class ChainReport:
    ok: bool
    checked: int
    head_seq: int | None = None
    head_hash: str | None = None
    broken_id: str | None = None
    broken_seq: int | None = None
    reason: str | None = None


def _walk(engine: Engine, batch: int) -> Iterator[AuditRecord]:
    last = 0
    while True:
        with read_session(engine) as s:
            rows = list(s.scalars(select(AuditRecord).where(AuditRecord.seq > last)
                                  .order_by(AuditRecord.seq).limit(batch)))
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def verify_chain(engine: Engine, batch: int = 1000) -> ChainReport:
    """Recompute every hash and link, oldest first; stop at the first record that fails."""
    prev_seq, prev_hash, checked = 0, GENESIS, 0
    for record in _walk(engine, batch):
        reason = None
        if record.record_hash != compute_hash(record):
            reason = "record_hash does not match the record's content (the row was changed)"
        elif record.seq != prev_seq + 1:
            reason = f"seq {record.seq} follows seq {prev_seq} (records are missing)"
        elif record.prev_hash != prev_hash:
            reason = (f"prev_hash does not match the hash of record seq {prev_seq}"
                      if prev_seq else "the first record does not start from the genesis hash")
        if reason:
            return ChainReport(False, checked, prev_seq or None, prev_hash if prev_seq else None,
                               record.id, record.seq, reason)
        prev_seq, prev_hash, checked = record.seq, record.record_hash, checked + 1
    return ChainReport(True, checked, prev_seq or None, prev_hash if prev_seq else None)
