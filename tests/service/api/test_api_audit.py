"""The audit trail: GET /audit filters and keyset paging, GET /audit/{id}, the hash chain under
concurrent appends, and `idverify audit verify` naming the record that was tampered with.
Runs on SQLite and PostgreSQL."""
from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import text

from service.records import audit
from service.cli import main as cli


def _append(engine, **columns):
    base = dict(id=str(uuid.uuid4()), key_id=None, decision="no_match", score=0.2, threshold=0.5,
                far_target=1e-3, model_version="test", latency_ms=12.5, id_faces=1, live_faces=1,
                id_box=[1.5, 2, 30, 40], id_quality={"blurry": False, "sharpness": 81.2},
                id_sha256="a" * 64, live_sha256="b" * 64, timings_ms={"decode": 1.25})
    base.update(columns)
    return audit.append(engine, **base)


def _seed(engine) -> list:
    """12 records: 4 match on dev-a, 4 no_match on dev-b, 4 rejected (no_face) on dev-a."""
    records = []
    for i in range(4):
        records.append(_append(engine, decision="match", score=0.8 + i / 100, device_id="dev-a", reference=f"m{i}"))
    for i in range(4):
        records.append(_append(engine, decision="no_match", score=0.1 + i / 100, device_id="dev-b", reference=f"n{i}"))
    for i in range(4):
        records.append(_append(engine, decision="rejected", score=None, device_id="dev-a", error_code="no_face",
                               error_field="live_photo", reference=f"r{i}"))
    return records


def test_audit_paging_newest_first_and_filters(make_client, engine, role_keys):
    records = _seed(engine)
    client = make_client()
    h = {"X-API-Key": role_keys["operator"]}

    # keyset pages of 5: 5 + 5 + 2, newest first, no overlap, cursor ends
    seen, cursor = [], None
    for expected in (5, 5, 2):
        r = client.get("/audit", params={"limit": 5, **({"cursor": cursor} if cursor else {})}, headers=h)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) == expected
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
    assert cursor is None
    assert seen == [rec.id for rec in reversed(records)]

    def ids(**params):
        r = client.get("/audit", params=params, headers=h)
        assert r.status_code == 200, r.text
        return {item["id"] for item in r.json()["items"]}

    assert ids(decision="match") == {r.id for r in records[:4]}
    assert ids(device_id="dev-b") == {r.id for r in records[4:8]}
    assert ids(error_code="no_face") == {r.id for r in records[8:]}
    assert ids(reference="n2") == {records[6].id}
    assert ids(min_score=0.5) == {r.id for r in records[:4]}
    assert ids(max_score=0.11) == {records[4].id, records[5].id}
    assert ids(decision="rejected", device_id="dev-a") == {r.id for r in records[8:]}
    now = datetime.now(timezone.utc)
    assert ids(since=(now - timedelta(hours=1)).isoformat()) == {r.id for r in records}
    assert ids(since=(now + timedelta(hours=1)).isoformat()) == set()
    assert ids(until=(now + timedelta(hours=1)).isoformat()) == {r.id for r in records}
    assert ids(until=(now - timedelta(hours=1)).isoformat()) == set()
    # paging within a filter
    r = client.get("/audit", params={"device_id": "dev-a", "limit": 3}, headers=h).json()
    r2 = client.get("/audit", params={"device_id": "dev-a", "limit": 10, "cursor": r["next_cursor"]}, headers=h).json()
    assert [i["id"] for i in r["items"] + r2["items"]] == [x.id for x in reversed(records) if x.device_id == "dev-a"]
    assert r2["next_cursor"] is None

    # bad parameters: our error shape, 400
    for params in ({"limit": 0}, {"limit": "x"}, {"cursor": "not-a-cursor"}, {"decision": "maybe"},
                   {"since": "yesterday"}, {"min_score": 2}):
        r = client.get("/audit", params=params, headers=h)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
        assert r.json()["error"]["field"]


def test_audit_record_by_id(make_client, engine, role_keys):
    rec = _append(engine, decision="match", score=0.91, device_id="kiosk-7", reference="case-1")
    client = make_client()
    r = client.get(f"/audit/{rec.id}", headers={"X-API-Key": role_keys["admin"]})
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == rec.id and body["seq"] == 1 and body["decision"] == "match"
    assert body["score"] == 0.91 and body["device_id"] == "kiosk-7" and body["reference"] == "case-1"
    assert body["faces"]["id_photo"] == {"faces_seen": 1, "box": [1.5, 2, 30, 40],
                                         "quality": {"blurry": False, "sharpness": 81.2}, "sha256": "a" * 64}
    assert body["prev_hash"] == audit.GENESIS and len(body["record_hash"]) == 64
    assert body["time"].endswith("+00:00")

    r = client.get(f"/audit/{uuid.uuid4()}", headers={"X-API-Key": role_keys["operator"]})
    assert r.status_code == 404
    assert r.json() == {"error": {"code": "not_found", "message": r.json()["error"]["message"], "field": "id"}}


def test_chain_stays_linear_under_concurrent_appends(engine, db_url):
    threads, per_thread = 6, 15
    errors = []

    def worker(n):
        try:
            for i in range(per_thread):
                _append(engine, device_id=f"t{n}", reference=str(i))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    report = audit.verify_chain(engine, batch=7)  # small batches exercise the keyset walk
    assert report.ok, report
    assert report.checked == threads * per_thread == report.head_seq


def _chain_with(engine, n=5):
    return [_append(engine, reference=f"ref-{i}", score=0.1 * i) for i in range(n)]


def test_audit_verify_cli_names_the_edited_row(engine, db_url, capsys):
    records = _chain_with(engine)
    assert cli(["audit", "--database-url", db_url, "verify"]) == 0
    assert "audit chain ok: 5 records" in capsys.readouterr().out

    victim = records[2]
    with engine.begin() as conn:  # a direct edit, as an insider with database access would
        conn.execute(text("UPDATE audit_records SET decision = 'match', score = 0.99 WHERE id = :id"),
                     {"id": victim.id})
    assert cli(["audit", "--database-url", db_url, "verify"]) == 1
    out = capsys.readouterr().out
    assert f"BROKEN at record {victim.id} (seq 3)" in out
    assert "2 records before it verified" in out


def test_audit_verify_detects_recomputed_hash_and_deletion(engine, db_url):
    records = _chain_with(engine)
    # the editor also recomputes the edited row's own hash: the next row's link breaks
    victim = records[1]
    victim.score = 0.77
    forged = audit.compute_hash(victim)
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_records SET score = 0.77, record_hash = :h WHERE id = :id"),
                     {"h": forged, "id": victim.id})
    report = audit.verify_chain(engine)
    assert not report.ok and report.broken_id == records[2].id and "prev_hash" in report.reason

    # a deleted row: the gap is named at the record after it
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_records SET score = 0.1, record_hash = :h WHERE id = :id"),
                     {"h": records[1].record_hash, "id": victim.id})
        conn.execute(text("DELETE FROM audit_records WHERE id = :id"), {"id": records[3].id})
    report = audit.verify_chain(engine)
    assert not report.ok and report.broken_id == records[4].id and "missing" in report.reason


def test_retention_columns_are_outside_the_hash(engine):
    records = _chain_with(engine, 3)
    with engine.begin() as conn:  # what a retention purge would do
        conn.execute(text("UPDATE audit_records SET images_retained = :t, retain_until = :d"),
                     {"t": True, "d": datetime(2030, 1, 1, tzinfo=timezone.utc)})
    assert audit.verify_chain(engine).ok
    assert audit.get(engine, records[0].id).images_retained is True


def test_hash_is_stable_across_read_back(engine):
    """Values read back from the database hash exactly as written (floats, JSON, time zones,
    numpy scalars from the pipeline)."""
    import numpy as np

    rec = _append(engine, score=np.float32(0.123456789), latency_ms=3, id_quality={"s": np.float64(1 / 3),
                  "flag": np.bool_(True), "nan": float("nan")}, id_box=(np.float32(1.1), 2, 3.5, 4),
                  device_id="ünïcode ✓")
    stored = audit.get(engine, rec.id)
    assert stored.record_hash == audit.compute_hash(stored) == rec.record_hash
    assert stored.id_quality == {"s": 1 / 3, "flag": True, "nan": None}


def test_cursor_is_opaque_but_checked():
    c = audit.encode_cursor(42)
    assert audit.decode_cursor(c) == 42
    for bad in ("", "!!!", audit.encode_cursor(42)[:-3] + "xyz", "eyJiZWZvcmUiOiAiNDIifQ"):
        try:
            audit.decode_cursor(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
