"""The audit chain under load, on PostgreSQL: "the chain verifies after 200 concurrent /verify
calls, and a direct edit of one row is reported with that row's id".

How: the real app is served by uvicorn (conftest's live_server) on a fresh PostgreSQL database,
and 200 threads, released together by a barrier, each POST one /verify with real photos (LFW
pairs when ../shared/data is there, else insightface's bundled photos) through the real
pipeline (models loaded once per session). Appends are serialised by the advisory lock in
service/records/audit.py. Then `verify_chain` must pass over exactly the 200 records the answers named,
and after a direct UPDATE of one row `idverify audit verify` must exit 1 naming that row.
On 2 shared cores the 200 calls take about 20 s. Only when the models cannot be loaded at all
does the app run without them: every call then ends as an audited `not_ready` rejection, which
still goes through authentication, body parsing and the audit writer (the test says so in its
output). A second test makes 200 concurrent appends straight at the audit writer.
"""
from __future__ import annotations

import itertools
import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import select, text

from conftest import reencoded
from console_support import append_record, lfw_pairs, served_models
from service.records import audit, keys
from service.app import create_app
from service.cli import main as cli
from service.records.engine import make_engine, migrate
from service.records.tables import AuditRecord
from service.settings import Settings

CALLS = 200


@pytest.fixture
def pg_url(pg_database_factory):
    url = pg_database_factory()
    migrate(url)
    return url


def _photo_pairs(request) -> list[tuple[bytes, bytes]]:
    try:
        lfw = request.getfixturevalue("lfw")
        return [(a.read_bytes(), b.read_bytes()) for _, a, b in lfw_pairs(lfw, same=5, different=5)]
    except pytest.skip.Exception:
        images = request.getfixturevalue("bundled_images")
        chip = (images / "Tom_Hanks_54745.png").read_bytes()
        return [(chip, (images / name).read_bytes()) for name in ("mask_white.jpg", "mask_blue.jpg")] + [(chip, reencoded(chip))]


def test_chain_verifies_after_200_concurrent_verify_calls_on_postgresql(request, pg_url, live_server, capsys):
    engine = make_engine(pg_url)
    try:
        kiosk = keys.create_key(engine, "kiosk", "chain-kiosk")[1]
        app = create_app(Settings(database_url=pg_url), models=served_models(request))
        base = live_server(app)
        pairs = list(itertools.islice(itertools.cycle(_photo_pairs(request)), CALLS))

        barrier = threading.Barrier(CALLS)
        results: list = [None] * CALLS

        def call(i: int) -> None:
            id_photo, live_photo = pairs[i]
            with httpx.Client(base_url=base, timeout=600) as client:
                barrier.wait()
                try:
                    r = client.post("/verify", headers={"X-API-Key": kiosk},
                                    files={"id_photo": ("id.jpg", id_photo), "live_photo": ("live.jpg", live_photo)},
                                    data={"device_id": f"kiosk-{i % 7}", "reference": f"chain-{i}"})
                    results[i] = (r.status_code, r.headers.get("X-Request-ID"), r.json())
                except Exception as exc:  # noqa: BLE001
                    results[i] = exc

        t0 = time.monotonic()
        threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0

        failures = [r for r in results if not isinstance(r, tuple)]
        assert not failures, failures[:3]
        # decided, or refused by the decision policy (an LFW news photo with a bystander beside the subject)
        outcomes = {(status, body.get("error", {}).get("code")) for status, _, body in results}
        assert (200, None) in outcomes and outcomes <= {(200, None), (422, "multiple_faces")}, outcomes
        with capsys.disabled():
            print(f"\n{CALLS} concurrent /verify calls on PostgreSQL in {elapsed:.1f} s "
                  "(real pipeline)")

        # every answer has its record, and nothing else is in the chain
        answered = {rid for _, rid, _ in results}
        with engine.connect() as conn:
            rows = conn.execute(select(AuditRecord.id, AuditRecord.seq, AuditRecord.decision, AuditRecord.reference)
                                .order_by(AuditRecord.seq)).all()
        assert len(answered) == CALLS and {r.id for r in rows} == answered
        assert [r.seq for r in rows] == list(range(1, CALLS + 1))
        by_id = {r.id: r for r in rows}
        for _status, rid, body in results:
            assert by_id[rid].decision == body.get("decision", "rejected")

        report = audit.verify_chain(engine)
        assert report.ok, report
        assert report.checked == CALLS and report.head_seq == CALLS
        assert cli(["audit", "--database-url", pg_url, "verify"]) == 0
        assert f"audit chain ok: {CALLS} records" in capsys.readouterr().out

        # a direct edit of one row, as someone with database access could make
        victim = rows[116]
        with engine.begin() as conn:
            conn.execute(text("UPDATE audit_records SET decision = :d, reference = 'edited' WHERE id = :id"),
                         {"d": "match" if victim.decision != "match" else "no_match", "id": victim.id})
        report = audit.verify_chain(engine)
        assert not report.ok and report.broken_id == victim.id and report.broken_seq == 117
        assert cli(["audit", "--database-url", pg_url, "verify"]) == 1
        out = capsys.readouterr().out
        assert f"BROKEN at record {victim.id} (seq 117)" in out and "116 records before it verified" in out
    finally:
        engine.dispose()


def test_200_concurrent_appends_at_the_audit_writer_on_postgresql(pg_url):
    engine = make_engine(pg_url)
    try:
        barrier = threading.Barrier(CALLS)
        ids = [str(uuid.uuid4()) for _ in range(CALLS)]
        errors: list = []

        def append(i: int) -> None:
            barrier.wait()
            try:
                append_record(engine, id=ids[i], reference=f"w{i}")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=append, args=(i,)) for i in range(CALLS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        report = audit.verify_chain(engine, batch=37)
        assert report.ok and report.checked == CALLS == report.head_seq
        with engine.connect() as conn:
            assert set(conn.scalars(select(AuditRecord.id))) == set(ids)
    finally:
        engine.dispose()
