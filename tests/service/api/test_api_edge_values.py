"""Issue 12, item 4: values any operator or admin can send that answered 500 (and dropped the
connection): out-of-range dates, cursors and ids, NUL bytes. Now 4xx with the error envelope in
the API; in the console, 400 (the form with the value named, or the envelope for a JSON client)
or the value clamped (dates, page size), the CSV export whole.
On SQLite and PostgreSQL."""
from __future__ import annotations

import base64
import json
import uuid

import pytest

from console_support import sign_in
from service.records import audit


def _cursor(before) -> str:
    return base64.urlsafe_b64encode(json.dumps({"before": before}).encode()).decode().rstrip("=")


@pytest.fixture
def seeded(engine):
    for i in range(3):
        audit.append(engine, id=str(uuid.uuid4()), decision="match", score=0.9, latency_ms=1.0, device_id=f"d{i}")


def envelope(r, status: int | tuple = (400, 404)):
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    assert set(r.json()["error"]) == {"code", "message", "field"}


DATES = [("since", "0001-01-01T00:00:00+01:00", 3), ("until", "9999-12-31T23:59:59-01:00", 3),
         ("since", "9999-12-31T23:59:59-01:00", 0), ("until", "0001-01-01T00:00:00+01:00", 0)]


@pytest.mark.parametrize("name,value,expect", DATES)
def test_dates_at_the_ends_of_the_range_are_clamped(make_client, role_keys, seeded, name, value, expect):
    client = make_client()
    r = client.get("/audit", params={name: value}, headers={"X-API-Key": role_keys["operator"]})
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == expect


@pytest.mark.parametrize("before", [2**63, 2**63 - 1 + 1, 10**30, -1, 0, 1.5, "x", None])
def test_cursors_out_of_range_are_refused(make_client, role_keys, seeded, before):
    client = make_client()
    r = client.get("/audit", params={"cursor": _cursor(before)}, headers={"X-API-Key": role_keys["operator"]})
    envelope(r, 400)
    assert r.json()["error"]["field"] == "cursor"
    ok = client.get("/audit", params={"cursor": _cursor(2**63 - 1)}, headers={"X-API-Key": role_keys["operator"]})
    assert ok.status_code == 200 and len(ok.json()["items"]) == 3


@pytest.mark.parametrize("key_id", [2**31, 2**63, 2**64, 0, -1])
def test_key_ids_out_of_range_are_refused(make_client, role_keys, key_id):
    client = make_client()
    r = client.delete(f"/admin/keys/{key_id}", headers={"X-API-Key": role_keys["admin"]})
    envelope(r, 400)
    assert r.json()["error"]["field"] == "key_id"
    envelope(client.delete(f"/admin/keys/{2**31 - 1}", headers={"X-API-Key": role_keys["admin"]}), 404)


@pytest.mark.parametrize("name", ["device_id", "reference", "error_code", "model_version", "scoring"])
def test_nul_bytes_in_filters_are_refused(make_client, role_keys, seeded, name):
    client = make_client()
    r = client.get("/audit", params={name: "a\x00b"}, headers={"X-API-Key": role_keys["operator"]})
    envelope(r, 400)
    assert r.json()["error"]["field"] == name


def test_nul_bytes_and_odd_ids_in_the_record_path(make_client, role_keys, seeded):
    client = make_client()
    h = {"X-API-Key": role_keys["operator"]}
    envelope(client.get("/audit/a%00b", headers=h), 400)
    envelope(client.get("/audit/" + "x" * 5000, headers=h), 404)


def test_each_refusal_keeps_the_connection(make_client, role_keys, seeded):
    """A 500 used to drop the keep-alive connection; a 4xx does not (one TestClient, in order)."""
    client = make_client()
    h = {"X-API-Key": role_keys["operator"]}
    for params in ({"cursor": _cursor(2**63)}, {"device_id": "\x00"}, {"since": DATES[0][1]}):
        assert client.get("/audit", params=params, headers=h).status_code < 500
    assert client.get("/healthz").status_code == 200


def test_console_pages_and_export_with_the_same_values(make_client, role_keys, seeded):
    """Dates are clamped as in the API (200, the page or the whole export); NUL bytes and
    out-of-range cursors answer 400 (the API's envelope for a JSON client); a huge limit is
    clamped."""
    client = make_client()
    sign_in(client, role_keys["operator"])
    clamped = [{"since": DATES[0][1]}, {"until": DATES[1][1]}, {"since": DATES[1][1], "until": DATES[0][1]},
               {"limit": str(2**70)}]
    refused = [({"device_id": "a\x00b"}, "device_id"), ({"reference": "\x00"}, "reference"),
               ({"error_code": "\x00"}, "error_code"), ({"model_version": "a\x00"}, "model_version"),
               ({"scoring": "\x00"}, "scoring"), ({"cursor": _cursor(2**63)}, "cursor"),
               ({"cursor": _cursor(10**40)}, "cursor")]
    for params in clamped:
        for page in ("/console", "/console/overview"):
            r = client.get(page, params=params)
            assert r.status_code == 200, (page, params, r.status_code)
        r = client.get("/console/export.csv", params=params)
        assert r.status_code == 200, (params, r.status_code)
        lines = r.text.strip().splitlines()   # the export is whole: header plus every matching row
        assert lines[0].startswith("id,seq,") and len(lines) in (1, 4), (params, r.text[:300])
    for params, field in refused:
        pages = ("/console",) if field == "cursor" else ("/console", "/console/overview", "/console/export.csv")
        for page in pages:
            r = client.get(page, params=params)
            assert r.status_code == 400, (page, params, r.status_code)
            assert f'data-field="{field}"' in r.text
            if field != "cursor":
                assert "NUL" in r.text
            j = client.get(page, params=params, headers={"Accept": "application/json"})
            envelope(j, 400)
            assert j.json()["error"]["code"] == "invalid_request" and j.json()["error"]["field"] == field
    for path in ("/console/records/a%00b", "/console/records/a%00b/images/id", "/console/records/" + "x" * 3000):
        assert client.get(path).status_code == 404


def test_nul_bytes_in_key_names_are_refused(make_client, role_keys):
    """Found by the fuzz run: a key name with a NUL byte was a 500 on PostgreSQL."""
    r = make_client().post("/admin/keys", json={"role": "kiosk", "name": "a\x00b"},
                           headers={"X-API-Key": role_keys["admin"]})
    envelope(r, 400)
    assert r.json()["error"]["field"] == "name"
