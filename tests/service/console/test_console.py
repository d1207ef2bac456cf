"""The operator console (/console): sign-in (operator/admin only, never kiosk), sessions (cookie
flags, expiry, sign-out, revocation), CSRF on every POST, filters, counts and keyset paging,
CSV export, record detail with chain state, overview charts, and that the key never shows up
in a URL, a page or a log. Runs on SQLite and PostgreSQL; records come from the real audit
writer (no pipeline needed)."""
from __future__ import annotations

import csv
import io
import logging
import re
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from console_support import append_record, csrf_from, seed, sign_in
from service.records import keys
from service.console import sessions


@pytest.fixture
def client(make_client):
    return make_client()


def _rows(html: str) -> list[str]:
    return re.findall(r'href="/console/records/([0-9a-f-]{36})"', html)


# --- sign-in ----------------------------------------------------------------------------------

def test_kiosk_cannot_sign_in(client, role_keys):
    r = sign_in(client, role_keys["kiosk"], expect=403)
    assert "kiosk key cannot sign in" in r.text
    assert sessions.COOKIE not in r.cookies and sessions.COOKIE not in client.cookies
    assert client.get("/console", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("role", ["operator", "admin"])
def test_operator_and_admin_sign_in(client, role_keys, role):
    r = sign_in(client, role_keys[role])
    assert r.headers["location"] == "/console"
    page = client.get("/console")
    assert page.status_code == 200 and f"test-{role}" in page.text


def test_unknown_or_revoked_key_is_refused(client, engine, role_keys):
    assert "not valid" in sign_in(client, "idv_" + "x" * 43, expect=401).text
    op = keys.lookup(engine, role_keys["operator"])
    keys.revoke_key(engine, op.id)
    sign_in(client, role_keys["operator"], expect=401)


def test_sign_in_form_needs_its_csrf_token(client, role_keys):
    client.get("/console/login")  # sets the login cookie
    r = client.post("/console/login", data={"key": role_keys["operator"]}, follow_redirects=False)
    assert r.status_code == 403 and sessions.COOKIE not in client.cookies
    r = client.post("/console/login", data={"key": role_keys["operator"], "csrf_token": "forged"},
                    follow_redirects=False)
    assert r.status_code == 403


def test_session_cookie_flags(make_client, role_keys):
    r = sign_in(make_client(), role_keys["operator"])
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(sessions.COOKIE + "="))
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/console"} <= flags
    assert "secure" not in flags  # plain http, mode auto
    value = cookie.split(";")[0].split("=", 1)[1]
    assert len(value) >= 43 and value not in role_keys.values()

    # forced on: even the sign-in form's cookie is Secure (so plain http cannot sign in at all)
    r = make_client(console_secure_cookie="true").get("/console/login")
    assert "secure" in r.headers["set-cookie"].lower()
    # auto behind https
    from fastapi.testclient import TestClient

    https = TestClient(make_client().app, base_url="https://console.example")
    r = sign_in(https, role_keys["operator"])
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(sessions.COOKIE + "="))
    assert "secure" in {part.strip().lower() for part in cookie.split(";")[1:]}


def test_session_is_stored_hashed_and_expires(client, engine, role_keys):
    sign_in(client, role_keys["operator"])
    value = client.cookies[sessions.COOKIE]
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT id_hash, expires_at FROM console_sessions")).all()
    assert len(stored) == 1 and stored[0][0] != value and value not in stored[0][0]
    minutes = 30
    assert sessions.lookup(engine, value, minutes) is not None
    later = datetime.now(timezone.utc) + timedelta(minutes=minutes + 1)
    assert sessions.lookup(engine, value, minutes, now=later) is None          # idle timeout
    # the absolute cap holds even when the session is kept busy
    assert sessions.lookup(engine, value, 10_000, now=datetime.now(timezone.utc) + timedelta(hours=13)) is None


def test_expired_session_redirects_to_sign_in(make_client, engine, role_keys):
    client = make_client(console_session_minutes=1)
    sign_in(client, role_keys["operator"])
    with engine.begin() as conn:
        conn.execute(text("UPDATE console_sessions SET expires_at = :t"),
                     {"t": datetime.now(timezone.utc) - timedelta(seconds=1)})
    assert client.get("/console", follow_redirects=False).status_code == 303


def test_revoking_the_key_ends_its_sessions(client, engine, role_keys):
    sign_in(client, role_keys["admin"])
    assert client.get("/console", follow_redirects=False).status_code == 200
    keys.revoke_key(engine, keys.lookup(engine, role_keys["admin"]).id)
    assert client.get("/console", follow_redirects=False).status_code == 303


# --- no session / CSRF ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/console", "/console/overview", "/console/chain", "/console/export.csv",
                                  "/console/records/00000000-0000-0000-0000-000000000000",
                                  "/console/records/00000000-0000-0000-0000-000000000000/images/id"])
def test_without_a_session_get_redirects_to_sign_in(client, path):
    r = client.get(path, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login?next=")
    client.cookies.set(sessions.COOKIE, "not-a-session", path="/console")
    assert client.get(path, follow_redirects=False).status_code == 303


@pytest.mark.parametrize("path", ["/console/logout", "/console/chain/verify"])
def test_without_a_session_post_is_401(client, path):
    assert client.post(path, data={"csrf_token": "x"}, follow_redirects=False).status_code == 401


@pytest.mark.parametrize("path", ["/console/logout", "/console/chain/verify"])
def test_post_without_csrf_token_is_403(client, role_keys, path):
    sign_in(client, role_keys["operator"])
    assert client.post(path, data={}, follow_redirects=False).status_code == 403
    assert client.post(path, data={"csrf_token": "guess"}, follow_redirects=False).status_code == 403
    # the session survives a refused POST, and the real token works
    page = client.get("/console")
    assert page.status_code == 200
    r = client.post(path, data={"csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303


def test_csrf_token_is_per_session(make_client, role_keys):
    a, b = make_client(), make_client()
    sign_in(a, role_keys["operator"])
    sign_in(b, role_keys["operator"])
    token_a = csrf_from(a.get("/console").text)
    assert token_a != csrf_from(b.get("/console").text)
    assert b.post("/console/logout", data={"csrf_token": token_a}, follow_redirects=False).status_code == 403


def test_sign_out_ends_the_session_on_the_server(client, role_keys):
    sign_in(client, role_keys["operator"])
    old = client.cookies[sessions.COOKIE]
    token = csrf_from(client.get("/console").text)
    r = client.post("/console/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    client.cookies.set(sessions.COOKIE, old, path="/console")  # replaying the old cookie does not work
    assert client.get("/console", follow_redirects=False).status_code == 303


def test_the_key_never_appears_in_urls_pages_or_logs(client, role_keys, caplog):
    key = role_keys["operator"]
    with caplog.at_level(logging.DEBUG):
        r = sign_in(client, key)
        pages = [client.get(p) for p in ("/console", "/console/overview", "/console/chain")]
        sign_in(client, role_keys["kiosk"], expect=403)
    assert key not in r.headers["location"]
    for page in pages:
        assert page.status_code == 200 and key not in page.text and key not in str(page.url)
        assert all(key not in v for v in page.headers.values())
    assert role_keys["kiosk"] not in caplog.text and key not in caplog.text
    assert "console sign-in: key" in caplog.text


def test_security_headers(client, role_keys):
    for r in (client.get("/console/login"), client.get("/console", follow_redirects=False)):
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"


# --- list, filters, paging --------------------------------------------------------------------

def test_list_filters_and_counts(client, engine, role_keys):
    records = seed(engine)
    sign_in(client, role_keys["operator"])

    page = client.get("/console")
    assert _rows(page.text) == [r.id for r in reversed(records)]  # newest first
    assert "<strong>18</strong> records" in page.text
    assert "6 match" in page.text and "6 no_match" in page.text and "6 rejected" in page.text

    def ids(**params):
        r = client.get("/console", params=params)
        assert r.status_code == 200
        return set(_rows(r.text))

    by = {r.id: r for r in records}
    assert ids(decision="no_match") == {i for i, r in by.items() if r.decision == "no_match"}
    assert ids(device_id="dev-b") == {i for i, r in by.items() if r.device_id == "dev-b"}
    assert ids(reference="case-m3") == {records[3].id}
    assert ids(error_code="image_undecodable") == {i for i, r in by.items() if r.error_code == "image_undecodable"}
    assert ids(min_score="0.6", max_score="0.7") == {i for i, r in by.items()
                                                      if r.score is not None and 0.6 <= r.score <= 0.7}
    assert ids(decision="rejected", device_id="dev-a", error_code="no_face") == {
        i for i, r in by.items() if r.error_code == "no_face"}
    # time range: a window before, around and after the records
    now = datetime.now(timezone.utc)
    fmt = "%Y-%m-%dT%H:%M"
    assert ids(until=(now - timedelta(hours=1)).strftime(fmt)) == set()
    assert ids(since=(now - timedelta(hours=1)).strftime(fmt), until=(now + timedelta(hours=1)).strftime(fmt)) == set(by)
    assert ids(since=(now + timedelta(minutes=2)).strftime(fmt)) == set()
    r = client.get("/console", params={"decision": "no_match", "device_id": "dev-b"})
    assert "<strong>6</strong> records" in r.text and "0 match" in r.text


def test_invalid_filters_answer_400_with_the_form_and_each_value_named(client, engine, role_keys):
    seed(engine)
    sign_in(client, role_keys["operator"])
    bad = {"since": "yesterday", "min_score": "2", "decision": "maybe", "cursor": "garbage"}
    for page in ("/console", "/console/overview", "/console/export.csv"):
        r = client.get(page, params=bad)
        assert r.status_code == 400, (page, r.status_code)
        assert r.headers["content-type"].startswith("text/html")
        for msg in ("since: not a date", "min_score: a number from 0 to 1", "decision: one of"):
            assert msg in r.text, (page, msg)
        assert 'data-code="invalid_request"' in r.text and 'data-field="since"' in r.text
        assert 'value="yesterday"' in r.text          # the form comes back filled in, to correct
        assert _rows(r.text) == []                     # nothing was queried
    assert "cursor: not a paging cursor" in client.get("/console", params={"cursor": "garbage"}).text
    assert client.get("/console", params={"cursor": "garbage"}).status_code == 400
    # a client that asks for JSON gets the API's error envelope
    r = client.get("/console", params={"min_score": "2"}, headers={"Accept": "application/json"})
    assert r.status_code == 400
    assert r.json() == {"error": {"code": "invalid_request", "field": "min_score",
                                  "message": "min_score: a number from 0 to 1"}}
    # the same page with valid values is a 200 with every record
    r = client.get("/console", params={"since": "2000-01-01T00:00"})
    assert r.status_code == 200 and len(_rows(r.text)) == 18


def test_keyset_paging_walks_every_record_once(client, engine, role_keys):
    records = seed(engine) + [append_record(engine, decision="no_match", reference=f"x{i}") for i in range(40)]
    sign_in(client, role_keys["operator"])
    seen, url = [], "/console?limit=25"
    while url:
        r = client.get(url)
        seen += _rows(r.text)
        m = re.search(r'href="(\?[^"]*cursor=[^"]+)" id="older"', r.text)
        url = "/console" + m.group(1).replace("&amp;", "&") if m else None
    assert seen == [r.id for r in reversed(records)]
    # paging keeps the filter
    seen, url = [], "/console?limit=25&decision=no_match"
    while url:
        r = client.get(url)
        seen += _rows(r.text)
        m = re.search(r'href="(\?[^"]*cursor=[^"]+)" id="older"', r.text)
        url = "/console" + m.group(1).replace("&amp;", "&") if m else None
    assert seen == [r.id for r in reversed(records) if r.decision == "no_match"] and len(seen) == 46


# --- CSV export --------------------------------------------------------------------------------

def test_csv_export_of_the_filtered_list(client, engine, role_keys):
    records = seed(engine)
    evil = append_record(engine, decision="no_match", score=0.3, device_id="=HYPERLINK(\"http://x\")",
                         reference="+1 and, a \"quote\"")
    sign_in(client, role_keys["operator"])
    r = client.get("/console/export.csv", params={"decision": "no_match"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"].startswith('attachment; filename="idverify-audit-')
    rows = list(csv.DictReader(io.StringIO(r.text)))
    expected = [x for x in reversed(records + [evil]) if x.decision == "no_match"]
    assert [row["id"] for row in rows] == [x.id for x in expected]
    assert {row["decision"] for row in rows} == {"no_match"}
    first = rows[0]
    assert first["device_id"] == "'=HYPERLINK(\"http://x\")"  # no formula injection
    assert first["reference"] == "'+1 and, a \"quote\""
    assert float(first["score"]) == 0.3 and first["record_hash"] == evil.record_hash
    assert first["seq"] == str(evil.seq)
    # everything, and an empty result still has its header
    assert len(list(csv.DictReader(io.StringIO(client.get("/console/export.csv").text)))) == 19
    empty = client.get("/console/export.csv", params={"reference": "nothing"}).text
    assert empty.splitlines()[0].startswith("id,seq,time,decision,score")
    assert client.get("/console/export.csv", params={"min_score": "x"}).status_code == 400


def test_csv_export_neutralises_full_width_formula_signs(client, engine, role_keys):
    texts = ["\uff1dHYPERLINK(\"http://x\")", "\uff0b1+1", "\uff0d2", "\uff20SUM(A1)", "\ufe66cmd", "\ufe621"]
    for i, text in enumerate(texts):
        append_record(engine, decision="no_match", score=0.3, device_id=text, reference=f"ref {i}")
    append_record(engine, decision="no_match", score=0.3, device_id="\uff2biosk 7", reference="=1")
    sign_in(client, role_keys["operator"])
    rows = {row["device_id"]: row for row in csv.DictReader(io.StringIO(client.get("/console/export.csv").text))}
    for text in texts:
        assert "'" + text in rows, (text, sorted(rows))
    assert rows["\uff2biosk 7"]["reference"] == "'=1"   # a full-width letter is left alone


# --- detail, chain, overview ------------------------------------------------------------------

def test_record_detail_shows_every_field_and_its_chain_state(client, engine, role_keys):
    op = keys.lookup(engine, role_keys["kiosk"])
    records = seed(engine, key_id=op.id)
    rec = records[7]
    sign_in(client, role_keys["operator"])
    r = client.get(f"/console/records/{rec.id}")
    assert r.status_code == 200
    for value in (rec.id, str(rec.seq), rec.reference, rec.device_id, rec.record_hash, rec.prev_hash,
                  rec.id_sha256, rec.live_sha256, "towers:test", "sharpness", "81.2", "test-kiosk",
                  "52.0, 61.5, 190.2, 201.0", "detect 60.0 ms"):
        assert value in r.text, value
    assert 'id="record-chain">chain links OK' in r.text
    assert "Image retention is off" in r.text
    assert client.get("/console/records/nope").status_code == 404

    with engine.begin() as conn:  # an insider edits the row
        conn.execute(text("UPDATE audit_records SET score = 0.99, decision = 'match' WHERE id = :id"), {"id": rec.id})
    r = client.get(f"/console/records/{rec.id}")
    assert 'id="record-chain">chain BROKEN here' in r.text and "differs: the row was changed" in r.text


def test_chain_page_names_the_first_broken_record(client, engine, role_keys):
    records = seed(engine)
    sign_in(client, role_keys["admin"])
    r = client.get("/console/chain")
    assert "Verified OK up to seq 18 (18 records)" in r.text
    assert "chain verified OK up to seq 18" in client.get("/console").text
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_records SET reference = 'changed' WHERE id = :id"), {"id": records[4].id})
    # the cached result is shown until re-verified; "Verify again now" re-runs it
    r = client.post("/console/chain/verify", data={"csrf_token": csrf_from(r.text)})
    assert r.status_code == 200
    assert f"BROKEN at record <a href=\"/console/records/{records[4].id}\">{records[4].id}</a> (seq 5)" in r.text
    assert "4 records before it verified" in r.text
    assert f"chain BROKEN at record {records[4].id}" in client.get("/console").text


def test_overview_renders_svg_charts(client, engine, role_keys):
    seed(engine)
    sign_in(client, role_keys["operator"])
    r = client.get("/console/overview")
    assert r.status_code == 200
    assert r.text.count("<svg") == 4
    assert "Decisions per day" in r.text                     # default range: the last 7 days
    assert re.search(r'<text [^>]*class="threshold"[^>]*>towers 0.9100</text>', r.text)  # the threshold's label
    assert "no_face" in r.text and "image_undecodable" in r.text
    for p in ("p50", "p90", "p95", "p99"):
        assert p in r.text
    assert "18 records (6 match, 6 no_match, 6 rejected)" in " ".join(r.text.split())
    # filtered, and over a short range it buckets by hour
    since = (datetime.now(timezone.utc) - timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M")
    r = client.get("/console/overview", params={"since": since, "decision": "match"})
    assert "Decisions per hour" in r.text
    assert "6 records (6 match, 0 no_match, 0 rejected)" in " ".join(r.text.split())


def test_console_does_not_break_the_api(client, engine, role_keys):
    """The console lives beside the JSON API: /audit still answers JSON with X-API-Key."""
    seed(engine)
    r = client.get("/audit", headers={"X-API-Key": role_keys["operator"]})
    assert r.status_code == 200 and len(r.json()["items"]) == 18


def test_oversized_or_odd_forms_are_refused(client, role_keys):
    page = client.get("/console/login")
    token = csrf_from(page.text)
    big = {"key": "x" * 20_000, "csrf_token": token}
    assert client.post("/console/login", data=big, follow_redirects=False).status_code == 413
    many = {f"f{i}": "1" for i in range(50)} | {"csrf_token": token}
    assert client.post("/console/login", data=many, follow_redirects=False).status_code == 413
    # multipart is not one of the console's forms: no token is read from it
    r = client.post("/console/login", files={"key": ("k", role_keys["operator"].encode())},
                    data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 403
    sign_in(client, role_keys["operator"])
    assert client.post("/console/logout", data={"csrf_token": "x" * 20_000},
                       follow_redirects=False).status_code == 413


def test_sign_in_returns_to_the_page_asked_for(client, engine, role_keys):
    records = seed(engine)
    target = f"/console/records/{records[2].id}"
    r = client.get(target, follow_redirects=False)
    login = client.get(r.headers["location"])
    assert f'name="next" value="{target}"' in login.text
    token = csrf_from(login.text)
    wrong = client.post("/console/login", data={"key": "idv_nope", "csrf_token": token, "next": target})
    assert wrong.status_code == 401 and f'name="next" value="{target}"' in wrong.text
    r = client.post("/console/login", data={"key": role_keys["operator"], "csrf_token": token, "next": target},
                    follow_redirects=False)
    assert r.headers["location"] == target
    # never off-site
    for evil in ("https://evil.example/console", "//evil.example/console", "/console:@evil"):
        client.cookies.clear()
        page = client.get("/console/login")
        r = client.post("/console/login", data={"key": role_keys["operator"], "csrf_token": csrf_from(page.text),
                                                "next": evil}, follow_redirects=False)
        assert r.headers["location"] == "/console", evil
