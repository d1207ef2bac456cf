"""The console's CSV export of the filtered list: one row per record, newest first, streamed in
keyset batches. Beside `score` stands `scoring` (the mode the score is on, audit.score_mode),
and each tower family seen in the exported records has its own column `score_<family>` (that
family's own score of the pair). Text cells that a spreadsheet would run as a formula are
neutralised with a leading apostrophe."""
from __future__ import annotations

import csv
import unicodedata
import io
from typing import Iterator, Sequence

from sqlalchemy import Engine, func, select

from service.records import audit
from service.records.audit import AuditFilter, utc
from service.records.engine import read_session
from service.records.tables import AuditRecord

LEADING_COLUMNS = ("id", "seq", "time", "decision", "score", "scoring", "threshold", "far_target", "model_version")
TRAILING_COLUMNS = ("key_id", "device_id", "reference", "error_code", "error_field", "latency_ms", "id_faces",
                    "live_faces", "id_sha256", "live_sha256", "images_retained", "record_hash")
MAX_FAMILY_COLUMNS = 16   # score_<family> columns at most (the service writes two families)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # caller-supplied text (device id, reference) must not run as a spreadsheet formula
    # caller-supplied text (device id, reference) must not run as a spreadsheet formula, nor
    # its full-width or small forms (＝ ＋ － ＠, ﹦ ﹢ ﹣ ﹫), which spreadsheets may fold to ASCII
    lead = unicodedata.normalize("NFKC", text[:1])
    return "'" + text if text.startswith(_FORMULA_START) or lead.startswith(_FORMULA_START) else text


def iter_records(engine: Engine, flt: AuditFilter, batch: int = 1000, upto: int | None = None,
                 columns: Sequence = ()) -> Iterator:
    """The records matching the filter up to seq `upto`, newest first, read in keyset batches:
    AuditRecord rows, or (seq, *columns) rows when `columns` are given."""
    before = None if upto is None else upto + 1
    while True:
        stmt = flt.apply(select(AuditRecord.seq, *columns) if columns else select(AuditRecord))
        if before is not None:
            stmt = stmt.where(AuditRecord.seq < before)
        stmt = stmt.order_by(AuditRecord.seq.desc()).limit(batch)
        with read_session(engine) as s:
            rows = list(s.execute(stmt) if columns else s.scalars(stmt))
        if not rows:
            return
        yield from rows
        before = rows[-1].seq


def families(engine: Engine, flt: AuditFilter, upto: int) -> list[str]:
    """The families with a score in the filtered records up to seq `upto`, sorted."""
    seen: set[str] = set()
    for row in iter_records(engine, flt, upto=upto, columns=(AuditRecord.scores,)):
        if isinstance(row.scores, dict):
            seen.update(str(name) for name in row.scores)
            if len(seen) > MAX_FAMILY_COLUMNS:
                break
    return sorted(seen)[:MAX_FAMILY_COLUMNS]


def csv_lines(engine: Engine, flt: AuditFilter) -> Iterator[str]:
    """The header, then the rows. Both passes (the families seen, then the rows) stop at the head
    of the chain as it was when the export began, so a record appended meanwhile cannot bring a
    family without its column."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")

    def flush() -> str:
        out = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return out

    with read_session(engine) as s:
        head = s.scalar(select(func.max(AuditRecord.seq)))
    names = families(engine, flt, head) if head is not None else []
    writer.writerow([_cell(c) for c in (*LEADING_COLUMNS, *(f"score_{n}" for n in names), *TRAILING_COLUMNS)])
    yield flush()
    if head is None:
        return
    for i, r in enumerate(iter_records(engine, flt, upto=head), 1):
        scores = r.scores if isinstance(r.scores, dict) else {}
        values = {c: getattr(r, c, None) for c in (*LEADING_COLUMNS, *TRAILING_COLUMNS)}
        values["time"] = utc(r.created_at).isoformat()
        values["scoring"] = audit.score_mode(r.score, r.scoring, r.model_version)
        writer.writerow([_cell(values[c]) for c in LEADING_COLUMNS] + [_cell(scores.get(n)) for n in names]
                        + [_cell(values[c]) for c in TRAILING_COLUMNS])
        if i % 200 == 0:
            yield flush()
    yield flush()
