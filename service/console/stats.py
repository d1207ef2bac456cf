"""Read-side queries behind the console pages: filter parsing, counts, the overview's
aggregates, CSV rows, and the chain state (whole chain, cached; and one record's links)."""
from __future__ import annotations

import csv
import io
import logging
import threading
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterator, Mapping, NamedTuple

import numpy as np
from sqlalchemy import Engine, func, select

from service import errors as error_codes
from service.records import audit
from service.records.audit import AuditFilter, utc
from service.records.engine import read_session
from service.records.tables import AuditRecord

DECISIONS = ("match", "no_match", "rejected")
log = logging.getLogger("idverify.console")
FILTER_FIELDS = ("since", "until", "decision", "device_id", "reference", "error_code", "min_score", "max_score")
PAGE_SIZES = (25, 50, 100, 200)
OVERVIEW_DEFAULT_DAYS = 7
# the error-code filter's choices: every stable code in service/errors.py (pipeline, auth, rate)
ERROR_CODES = tuple(sorted({v for k, v in vars(error_codes).items() if k.isupper() and isinstance(v, str)}))


# --- filters --------------------------------------------------------------------------------

class FilterError(NamedTuple):
    """One refused query value: the field and what it must be (shown as "field: message")."""
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _parse_time(value: str) -> datetime:
    dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


def parse_filters(params: Mapping[str, str], default_since: datetime | None = None
                  ) -> tuple[AuditFilter, dict[str, str], list[FilterError]]:
    """Query parameters -> (filter, the raw values to show back in the form, refused values).
    Blank fields mean "any"; the pages answer 400 when any value is refused, never a 500.
    `default_since` applies when `since` is absent (not when it was sent blank)."""
    raw = {name: (params.get(name) or "").strip() for name in FILTER_FIELDS}
    if "since" not in params and default_since is not None:
        raw["since"] = default_since.strftime("%Y-%m-%dT%H:%M")
    flt, errors = AuditFilter(), []
    for name in ("since", "until"):
        if raw[name]:
            try:
                setattr(flt, name, _parse_time(raw[name]))
            except ValueError:
                errors.append(FilterError(name, "not a date and time (use YYYY-MM-DDTHH:MM, UTC)"))
    if raw["decision"]:
        if raw["decision"] in DECISIONS:
            flt.decision = raw["decision"]
        else:
            errors.append(FilterError("decision", f"one of {', '.join(DECISIONS)}"))
    for name in ("device_id", "reference", "error_code"):
        if "\x00" in raw[name]:
            errors.append(FilterError(name, "contains a NUL byte"))
        elif raw[name]:
            setattr(flt, name, raw[name][:256])
    for name in ("min_score", "max_score"):
        if raw[name]:
            try:
                v = float(raw[name])
                if not 0.0 <= v <= 1.0:
                    raise ValueError
                setattr(flt, name, v)
            except ValueError:
                errors.append(FilterError(name, "a number from 0 to 1"))
    return flt, raw, errors


def page_size(params: Mapping[str, str]) -> int:
    try:
        n = int(params.get("limit") or 50)
    except ValueError:
        return 50
    return n if n in PAGE_SIZES else 50


# --- list -----------------------------------------------------------------------------------

def counts(engine: Engine, flt: AuditFilter) -> dict[str, int]:
    """Records matching the filter, by decision, plus 'total'."""
    stmt = flt.apply(select(AuditRecord.decision, func.count()).select_from(AuditRecord)).group_by(AuditRecord.decision)
    with read_session(engine) as s:
        found = {d: n for d, n in s.execute(stmt)}
    out = {d: int(found.get(d, 0)) for d in DECISIONS}
    out["total"] = int(sum(found.values()))
    return out


def iter_records(engine: Engine, flt: AuditFilter, batch: int = 1000) -> Iterator[AuditRecord]:
    """All records matching the filter, newest first, read in keyset batches."""
    before = None
    while True:
        stmt = flt.apply(select(AuditRecord))
        if before is not None:
            stmt = stmt.where(AuditRecord.seq < before)
        with read_session(engine) as s:
            rows = list(s.scalars(stmt.order_by(AuditRecord.seq.desc()).limit(batch)))
        if not rows:
            return
        yield from rows
        before = rows[-1].seq


CSV_COLUMNS = ("id", "seq", "time", "decision", "score", "threshold", "far_target", "model_version", "key_id",
               "device_id", "reference", "error_code", "error_field", "latency_ms", "id_faces", "live_faces",
               "id_sha256", "live_sha256", "images_retained", "record_hash")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # caller-supplied text (device id, reference) must not run as a spreadsheet formula, nor
    # its full-width or small forms (＝ ＋ － ＠, ﹦ ﹢ ﹣ ﹫), which spreadsheets may fold to ASCII
    lead = unicodedata.normalize("NFKC", text[:1])
    return "'" + text if text.startswith(_FORMULA_START) or lead.startswith(_FORMULA_START) else text


def csv_lines(engine: Engine, flt: AuditFilter) -> Iterator[str]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")

    def flush() -> str:
        out = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return out

    writer.writerow(CSV_COLUMNS)
    yield flush()
    for i, r in enumerate(iter_records(engine, flt), 1):
        values = {c: getattr(r, c, None) for c in CSV_COLUMNS}
        values["time"] = utc(r.created_at).isoformat()
        writer.writerow([_cell(values[c]) for c in CSV_COLUMNS])
        if i % 200 == 0:
            yield flush()
    yield flush()


# --- overview -------------------------------------------------------------------------------

@dataclass
class Overview:
    start: datetime
    end: datetime
    bucket: str                                   # hour | day | week
    buckets: list[tuple[str, dict[str, int]]]
    match_scores: list[float]
    no_match_scores: list[float]
    thresholds: list[float]
    errors: list[tuple[str, int]]
    latency: dict[str, dict[str, float]]          # group -> {p50, p90, p95, p99, max, n}
    total: int
    by_decision: dict[str, int] = field(default_factory=dict)


def _bucket_start(dt: datetime, bucket: str, origin: datetime) -> datetime:
    if bucket == "hour":
        return dt.replace(minute=0, second=0, microsecond=0)
    day = dt.replace(hour=0, minute=0, second=0, microsecond=0)
    if bucket == "day":
        return day
    return day - timedelta(days=(day - origin).days % 7)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    p = np.percentile(arr, [50, 90, 95, 99])
    return {"n": len(values), "p50": float(p[0]), "p90": float(p[1]), "p95": float(p[2]), "p99": float(p[3]),
            "max": float(arr.max())}


def overview(engine: Engine, flt: AuditFilter, now: datetime | None = None) -> Overview:
    now = now or datetime.now(timezone.utc)
    R = AuditRecord
    stmt = flt.apply(select(R.created_at, R.decision, R.score, R.threshold, R.error_code, R.latency_ms)).order_by(R.seq)
    with read_session(engine) as s:
        rows = [(utc(t), d, sc, th, e, lat) for t, d, sc, th, e, lat in s.execute(stmt)]
    start = utc(flt.since) if flt.since else (rows[0][0] if rows else now - timedelta(days=1))
    end = utc(flt.until) if flt.until else now
    # the chart's window: filters may reach the ends of datetime's range (records cannot)
    lo, hi = datetime(1970, 1, 1, tzinfo=timezone.utc), now + timedelta(days=1)
    start, end = min(max(start, lo), hi), min(max(end, lo), hi)
    if end <= start:
        end = start + timedelta(hours=1)
    span = end - start
    bucket = "hour" if span <= timedelta(days=3) else "day" if span <= timedelta(days=120) else "week"
    step = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7)}[bucket]
    origin = start.replace(hour=0, minute=0, second=0, microsecond=0)
    fmt = {"hour": "%m-%d %H:00", "day": "%Y-%m-%d", "week": "%Y-%m-%d"}[bucket]
    slots: dict[datetime, Counter] = {}
    t = _bucket_start(start, bucket, origin)
    while t < end and len(slots) < 400:
        slots[t] = Counter()
        t += step
    match_scores, no_match_scores, thresholds, errors = [], [], set(), Counter()
    latency: dict[str, list[float]] = {"all": [], "match": [], "no_match": [], "rejected": []}
    by_decision: Counter = Counter()
    for created, decision, score, threshold, error_code, lat in rows:
        key = _bucket_start(created, bucket, origin)
        if key in slots:
            slots[key][decision] += 1
        by_decision[decision] += 1
        if decision == "match" and score is not None:
            match_scores.append(score)
        elif decision == "no_match" and score is not None:
            no_match_scores.append(score)
        if decision in ("match", "no_match") and threshold is not None:
            thresholds.add(round(threshold, 6))
        if error_code:
            errors[error_code] += 1
        if lat is not None:
            latency["all"].append(lat)
            latency.setdefault(decision, []).append(lat)
    return Overview(
        start=start, end=end, bucket=bucket,
        buckets=[(k.strftime(fmt), dict(v)) for k, v in slots.items()],
        match_scores=match_scores, no_match_scores=no_match_scores, thresholds=sorted(thresholds),
        errors=errors.most_common(), latency={g: percentiles(v) for g, v in latency.items() if v},
        total=len(rows), by_decision={d: by_decision.get(d, 0) for d in DECISIONS},
    )


# --- chain state ----------------------------------------------------------------------------

@dataclass
class ChainRun:
    report: audit.ChainReport
    finished_at: datetime
    seconds: float


class ChainCache:
    """The last full verification of the chain (one per app; one run at a time). Pages that
    only show the state (the list, a record) start a refresh in the background when the last
    result is older than `max_age_s`, and show the last one meanwhile."""

    def __init__(self, max_age_s: float = 300.0):
        self.max_age_s = max_age_s
        self.last: ChainRun | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._lock.locked()

    def _verify(self, engine: Engine) -> ChainRun:
        t0 = time.perf_counter()
        report = audit.verify_chain(engine)
        self.last = ChainRun(report, datetime.now(timezone.utc), time.perf_counter() - t0)
        return self.last

    def run(self, engine: Engine) -> ChainRun:
        with self._lock:
            return self._verify(engine)

    def _background(self, engine: Engine) -> None:
        try:
            self._verify(engine)
        except Exception:  # noqa: BLE001 - shown as "not verified yet"; the chain page reports errors
            log.exception("background chain verification failed")
        finally:
            self._lock.release()

    def stale(self) -> bool:
        last = self.last
        return last is None or (datetime.now(timezone.utc) - last.finished_at).total_seconds() > self.max_age_s

    def current(self, engine: Engine, refresh: str = "sync") -> ChainRun | None:
        """The last result; when stale, refresh first (`sync`), start a refresh and return the
        last result (`background`), or just return it (`never`)."""
        if refresh == "never" or not self.stale():
            return self.last
        if refresh == "sync":
            return self.run(engine)
        if self._lock.acquire(blocking=False):
            threading.Thread(target=self._background, args=(engine,), name="chain-verify", daemon=True).start()
        return self.last


@dataclass
class RecordChainState:
    hash_ok: bool
    computed_hash: str
    prev_state: str        # ok | genesis | broken | missing
    next_state: str        # ok | head | broken | missing
    prev_id: str | None
    next_id: str | None
    covered: bool | None   # inside the last full verification that passed (None: no run yet)

    @property
    def ok(self) -> bool:
        return self.hash_ok and self.prev_state in ("ok", "genesis") and self.next_state in ("ok", "head")


def record_chain_state(engine: Engine, record: AuditRecord, last_run: ChainRun | None) -> RecordChainState:
    computed = audit.compute_hash(record)
    with read_session(engine) as s:
        prev = s.scalars(select(AuditRecord).where(AuditRecord.seq == record.seq - 1)).first()
        nxt = s.scalars(select(AuditRecord).where(AuditRecord.seq == record.seq + 1)).first()
        newer = s.scalar(select(func.count()).select_from(AuditRecord).where(AuditRecord.seq > record.seq)) or 0
    if record.seq == 1:
        prev_state = "genesis" if record.prev_hash == audit.GENESIS else "broken"
    elif prev is None:
        prev_state = "missing"
    else:
        prev_state = "ok" if record.prev_hash == prev.record_hash else "broken"
    if nxt is None:
        next_state = "head" if newer == 0 else "missing"
    else:
        next_state = "ok" if nxt.prev_hash == record.record_hash else "broken"
    covered = None
    if last_run is not None:
        r = last_run.report
        covered = bool(r.ok and r.head_seq is not None and record.seq <= r.head_seq) or bool(
            not r.ok and r.broken_seq is not None and record.seq < r.broken_seq)
    return RecordChainState(record.record_hash == computed, computed, prev_state, next_state,
                            prev.id if prev else None, nxt.id if nxt else None, covered)
