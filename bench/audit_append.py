"""What one database carries of /verify's audit trail: appends per second, and the time of one
append, with N threads appending at once (every append takes the chain's advisory lock, reads
the head, inserts one row and commits: they are serialised database-wide, whatever the number
of API replicas).

Against a fresh database: SQLite in a temporary folder, or a new database on the PostgreSQL at
`--pg` (created, migrated, dropped). Bounded: `--seconds` per thread count.

    .venv/bin/python bench/audit_append.py [--db sqlite|postgresql] [--threads 1,4,16] [--seconds 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

PG_DEFAULT = os.environ.get("IDV_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def columns() -> dict:
    """A rejected call's audit columns, as /verify writes them (service/api/attempt.py)."""
    from service.api.attempt import VerifyAttempt
    from service.errors import ApiError

    attempt = VerifyAttempt()
    attempt.failed(ApiError("no_face", "no face was found in the image", "live_photo", status=422))
    attempt.finished()
    return attempt.audit_columns(None)


def run(engine, threads: int, seconds: float) -> dict:
    from service.records import audit

    times: list[list[float]] = [[] for _ in range(threads)]
    t_end = time.monotonic() + seconds

    def worker(i: int) -> None:
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            audit.append(engine, **columns())
            times[i].append((time.perf_counter() - t0) * 1e3)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    [t.start() for t in ts]
    [t.join(seconds + 60) for t in ts]
    all_t = np.asarray([x for xs in times for x in xs])
    return {"threads": threads, "n": len(all_t), "per_s": len(all_t) / seconds,
            "p50": float(np.percentile(all_t, 50)), "p99": float(np.percentile(all_t, 99))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--pg", default=PG_DEFAULT)
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    from sqlalchemy import create_engine, text

    from service.records.engine import make_engine, migrate
    from service.records.audit import verify_chain

    tmp = tempfile.TemporaryDirectory(prefix="idv-audit-")
    admin, name = None, None
    if args.db == "sqlite":
        url = f"sqlite:///{tmp.name}/audit.db"
    else:
        admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
        name = f"idv_audit_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        url = args.pg.rsplit("/", 1)[0] + "/" + name
    try:
        migrate(url)
        engine = make_engine(url)
        print(f"database {args.db}; load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("| threads | appends/s | append p50 (ms) | append p99 (ms) | appends |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for n in (int(x) for x in args.threads.split(",")):
            r = run(engine, n, args.seconds)
            print(f"| {r['threads']} | {r['per_s']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['n']} |", flush=True)
        report = verify_chain(engine)
        print(f"chain verified: {report.ok} ({report.checked} records)")
        engine.dispose()
    finally:
        if admin is not None:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
