"""/verify with IDV_SCORING=fused: one fused score, per-family scores in the answer and the
audit record, the record's hash covering them; records written before still verify."""
from __future__ import annotations

import pytest
from sqlalchemy import update

from service.face.loader import load_models
from service.records import audit
from service.records.tables import AuditRecord
from service.settings import Settings


@pytest.fixture(scope="module")
def fused():
    return load_models(Settings(scoring="fused"))


def test_fused_verify_answers_and_audits_the_scores(make_client, fused, lfw_pairs, engine, role_keys):
    client = make_client(fused)
    a, b = (p.read_bytes() for p in lfw_pairs["same"])
    r = client.post("/verify", headers={"X-API-Key": role_keys["kiosk"]},
                    files={"id_photo": ("a.jpg", a), "live_photo": ("b.jpg", b)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scoring"] == "fused" and body["decision"] == "match"
    assert set(body["scores"]) == {"towers", "sface"} and all(0 <= s <= 1 for s in body["scores"].values())
    assert 0 <= body["score"] <= 1 and body["threshold"] == fused.threshold.score
    assert body["far_target"] == fused.threshold.far and body["model_version"] == fused.model_version
    assert {f"{side}.{stage}:{family}" for side in ("id_photo", "live_photo") for stage in ("align", "embed")
            for family in ("towers", "sface")} <= set(body["timings_ms"])
    for key in ("id_photo.align", "id_photo.embed", "live_photo.embed"):   # a stage's per-family parts are in it
        parts = body["timings_ms"][f"{key}:towers"] + body["timings_ms"][f"{key}:sface"]
        assert parts <= body["timings_ms"][key] + 0.01, body["timings_ms"]
    record = audit.get(engine, body["request_id"])
    assert record.scores == body["scores"] and record.scoring == "fused" and record.score == body["score"]
    got = client.get(f"/audit/{body['request_id']}", headers={"X-API-Key": role_keys["operator"]}).json()
    assert got["scores"] == body["scores"] and got["scoring"] == "fused"
    assert audit.verify_chain(engine).ok
    metrics = client.get("/metrics").text   # every family and the fusion: info and one score each
    for family in ("towers", "sface", "fused"):
        assert f'idverify_score_count{{family="{family}"}} 1.0' in metrics
        assert f'idverify_model_info{{family="{family}",scoring="fused",' in metrics
    # the hash covers the scores
    with engine.begin() as conn:
        conn.execute(update(AuditRecord).where(AuditRecord.id == body["request_id"])
                     .values(scores={"towers": 1.0, "sface": 1.0}))
    report = audit.verify_chain(engine)
    assert not report.ok and report.broken_id == body["request_id"]


def test_records_without_scores_still_verify(engine):
    old = audit.append(engine, id="00000000-0000-0000-0000-000000000001", decision="rejected", latency_ms=1.0)
    new = audit.append(engine, id="00000000-0000-0000-0000-000000000002", decision="no_match", score=0.2,
                       scores={"towers": 0.2, "sface": None}, scoring="fallback:towers", latency_ms=1.0)
    assert old.scores is None and audit.verify_chain(engine).ok
    # a record's hash is the same as before the columns existed when they are not set
    assert b'"scores"' not in audit.canonical(old) and b'"scores"' in audit.canonical(new)
