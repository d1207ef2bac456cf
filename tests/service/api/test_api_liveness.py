"""The kiosk's liveness result on /verify: accepted in multipart (a JSON text field) and in JSON
(an object), recorded in the audit record and covered by its hash; bad values refused with
their field; IDV_REQUIRE_LIVENESS refusing a missing or failed one. Real models and photos
(insightface's bundled portrait); SQLite and PostgreSQL."""
from __future__ import annotations

import base64
import json

import pytest
from sqlalchemy import update

from conftest import reencoded
from console_support import sign_in
from service.records import audit
from service.records.tables import AuditRecord

PASSED = {"vendor": "acme-pad 3.1", "score": 0.97, "passed": True}
FAILED = {"vendor": "acme-pad 3.1", "score": 0.08, "passed": False}


@pytest.fixture(scope="module")
def portrait(bundled_images) -> bytes:
    return (bundled_images / "Tom_Hanks_54745.png").read_bytes()


def _multipart(client, key: str, photo: bytes, liveness=None):
    data = {} if liveness is None else {"liveness": liveness if isinstance(liveness, str) else json.dumps(liveness)}
    return client.post("/verify", headers={"X-API-Key": key}, data=data,
                       files={"id_photo": ("id.png", photo), "live_photo": ("live.jpg", reencoded(photo))})


def _json(client, key: str, photo: bytes, **extra):
    b64 = base64.b64encode(photo).decode()
    live = base64.b64encode(reencoded(photo)).decode()
    return client.post("/verify", headers={"X-API-Key": key}, json={"id_photo": b64, "live_photo": live, **extra})


def test_liveness_is_recorded_and_hashed(make_client, models, portrait, engine, role_keys):
    client = make_client(models)
    r = _multipart(client, role_keys["kiosk"], portrait, PASSED)
    assert r.status_code == 200, r.text
    first = r.json()["request_id"]
    assert audit.get(engine, first).liveness == PASSED
    got = client.get(f"/audit/{first}", headers={"X-API-Key": role_keys["operator"]}).json()
    assert got["liveness"] == PASSED
    sign_in(client, role_keys["operator"])   # the console's record page shows it, and the rule
    page = client.get(f"/console/records/{first}").text
    assert '<dd id="liveness">acme-pad 3.1: passed, score 0.9700</dd>' in page
    assert '<dd id="rule">score_threshold</dd>' in page

    # JSON body: an object; score is optional; without IDV_REQUIRE_LIVENESS a failed check is
    # recorded, not refused
    r = _json(client, role_keys["kiosk"], portrait, liveness={"vendor": "other", "passed": True})
    assert r.status_code == 200, r.text
    assert audit.get(engine, r.json()["request_id"]).liveness == {"vendor": "other", "score": None, "passed": True}
    r = _json(client, role_keys["kiosk"], portrait, liveness=FAILED)
    assert r.status_code == 200 and r.json()["rule"] == "score_threshold", r.text
    assert audit.get(engine, r.json()["request_id"]).liveness == FAILED
    assert audit.verify_chain(engine).ok

    # the record's hash covers it: a failed check turned into a pass is caught
    with engine.begin() as conn:
        conn.execute(update(AuditRecord).where(AuditRecord.id == r.json()["request_id"]).values(
            liveness={**FAILED, "passed": True}))
    report = audit.verify_chain(engine)
    assert not report.ok and report.broken_id == r.json()["request_id"]


BAD = [
    ("not json", "liveness"),
    ("[1, 2]", "liveness"),
    ({"vendor": "acme", "passed": True, "extra": 1}, "liveness"),
    ({"passed": True}, "liveness.vendor"),
    ({"vendor": "   ", "passed": True}, "liveness.vendor"),
    ({"vendor": "x" * 65, "passed": True}, "liveness.vendor"),
    ({"vendor": "a\x00b", "passed": True}, "liveness.vendor"),
    ({"vendor": "acme"}, "liveness.passed"),
    ({"vendor": "acme", "passed": "yes"}, "liveness.passed"),
    ({"vendor": "acme", "passed": 1}, "liveness.passed"),
    ({"vendor": "acme", "passed": True, "score": 1.5}, "liveness.score"),
    ({"vendor": "acme", "passed": True, "score": -0.1}, "liveness.score"),
    ({"vendor": "acme", "passed": True, "score": "0.9"}, "liveness.score"),
    ({"vendor": "acme", "passed": True, "score": True}, "liveness.score"),
    ('{"vendor": "acme", "passed": true, "score": NaN}', "liveness.score"),
    ({"vendor": "acme", "passed": True, "score": 10**400}, "liveness.score"),
]


@pytest.mark.parametrize("value, field", BAD)
def test_bad_liveness_values_are_refused_with_their_field(make_client, unused_models, portrait, role_keys,
                                                          value, field):
    client = make_client(unused_models)   # refused while reading the body: the pipeline is never reached
    answers = [_multipart(client, role_keys["kiosk"], portrait, value)]
    if not isinstance(value, str):
        answers.append(_json(client, role_keys["kiosk"], portrait, liveness=value))
    for r in answers:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["code"], err["field"]) == ("invalid_request", field), err


def test_json_liveness_must_be_an_object(make_client, unused_models, portrait, role_keys):
    r = _json(make_client(unused_models), role_keys["kiosk"], portrait, liveness=json.dumps(PASSED))
    assert r.status_code == 400 and r.json()["error"]["field"] == "liveness"


def test_required_liveness_refuses_a_missing_or_failed_one(make_client, models, portrait, engine, role_keys):
    client = make_client(models, require_liveness=True)
    kiosk = role_keys["kiosk"]
    for liveness, code, rule in ((None, "liveness_required", "liveness:missing"),
                                 (FAILED, "liveness_failed", "liveness:failed")):
        r = _multipart(client, kiosk, portrait, liveness)
        assert r.status_code == 422, r.text
        assert r.json()["error"] | {"message": ""} == {"code": code, "field": "liveness", "rule": rule, "message": ""}
        record = audit.get(engine, r.headers["X-Request-ID"])
        assert (record.decision, record.error_code, record.rule, record.liveness) == ("rejected", code, rule, liveness)
    r = _multipart(client, kiosk, portrait, PASSED)
    assert r.status_code == 200 and r.json()["rule"] == "score_threshold", r.text
    assert audit.get(engine, r.json()["request_id"]).liveness == PASSED
    assert audit.verify_chain(engine).ok
