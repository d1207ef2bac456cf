"""Keys and roles: the 401/403 matrix, /admin/keys, the bootstrap admin key, the per-key rate
limit, and the `idverify keys` command line. Runs on SQLite and PostgreSQL."""
from __future__ import annotations

import base64
import hashlib
import logging

import pytest
from sqlalchemy import func, select

from service.records import audit, keys
from service.cli import main as cli
from service.records.tables import ApiKey, AuditRecord

# (method, path, json body, roles allowed)
ROUTES = [
    ("POST", "/verify", {}, {"kiosk", "admin"}),  # {}: authorised calls get 400 missing_field
    ("GET", "/audit", None, {"operator", "admin"}),
    ("GET", "/audit/00000000-0000-0000-0000-000000000000", None, {"operator", "admin"}),
    ("GET", "/admin/keys", None, {"admin"}),
    ("POST", "/admin/keys", {"role": "kiosk", "name": "matrix"}, {"admin"}),
    ("DELETE", "/admin/keys/999999", None, {"admin"}),
]


def _error(r):
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, body
    return body["error"]["code"]


def test_role_matrix(make_client, engine, role_keys):
    client = make_client()
    revoked_plain = keys.create_key(engine, "admin", "old")[1]
    keys.revoke_key(engine, keys.lookup(engine, revoked_plain).id)
    for method, path, body, allowed in ROUTES:
        for headers in ({}, {"X-API-Key": "idv_not-a-key"}, {"X-API-Key": ""}, {"X-API-Key": revoked_plain}):
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401 and _error(r) == "unauthorized", (method, path, headers, r.text)
        for role, plain in role_keys.items():
            r = client.request(method, path, json=body, headers={"X-API-Key": plain})
            if role in allowed:
                assert r.status_code not in (401, 403), (method, path, role, r.text)
            else:
                assert r.status_code == 403 and _error(r) == "forbidden", (method, path, role, r.text)

    # /verify: authenticated calls are audited (the operator's 403 and the authorised 400s),
    # anonymous ones are not
    with engine.connect() as conn:
        rows = conn.execute(select(AuditRecord.key_id, AuditRecord.decision, AuditRecord.error_code)
                            .order_by(AuditRecord.seq)).all()
    by_role = {k.id: k.role for k in keys.list_keys(engine)}
    assert sorted((by_role[r.key_id], r.decision, r.error_code) for r in rows) == [
        ("admin", "rejected", "missing_field"), ("kiosk", "rejected", "missing_field"),
        ("operator", "rejected", "forbidden")]
    assert audit.verify_chain(engine).ok


def test_admin_manages_keys(make_client, engine, admin_key, caplog):
    client = make_client()
    admin = {"X-API-Key": admin_key}
    admin_id = keys.lookup(engine, admin_key).id
    with caplog.at_level(logging.INFO, logger="idverify.admin"):
        r = client.post("/admin/keys", json={"role": "kiosk", "name": "lobby kiosk"}, headers=admin)
    assert r.status_code == 201, r.text
    created = r.json()
    assert {"id", "key", "role", "name"} <= set(created)
    assert created["role"] == "kiosk" and created["name"] == "lobby kiosk"
    plaintext = created["key"]
    assert len(plaintext) >= 40

    # stored hashed: neither the plaintext nor the listing reveals it
    with engine.connect() as conn:
        row = conn.execute(select(ApiKey).where(ApiKey.id == created["id"])).one()
    assert row.key_hash == keys.hash_key(plaintext) and plaintext not in (row.key_hash, row.prefix)
    listing = client.get("/admin/keys", headers=admin).json()["items"]
    mine = next(k for k in listing if k["id"] == created["id"])
    assert "key" not in mine and plaintext.startswith(mine["prefix"]) and mine["revoked_at"] is None
    assert plaintext not in client.get("/admin/keys", headers=admin).text

    kiosk = {"X-API-Key": plaintext}
    assert client.get("/audit", headers=kiosk).status_code == 403
    assert client.post("/verify", json={}, headers=kiosk).status_code == 400  # authorised

    with caplog.at_level(logging.INFO, logger="idverify.admin"):
        r = client.delete(f"/admin/keys/{created['id']}", headers=admin)
    assert r.status_code == 200 and r.json()["revoked_at"]
    # key management leaves its own lines (never the plaintext)
    assert f"admin: key {created['id']} (kiosk) created by key {admin_id}" in caplog.text
    assert f"admin: key {created['id']} (kiosk) revoked by key {admin_id}" in caplog.text
    assert plaintext not in caplog.text
    r = client.post("/verify", json={}, headers=kiosk)
    assert r.status_code == 401 and _error(r) == "unauthorized"

    for body in ({"role": "root", "name": "x"}, {"role": "kiosk"}, {"role": "kiosk", "name": ""}, [], "x"):
        r = client.post("/admin/keys", json=body, headers=admin)
        assert r.status_code == 400 and _error(r) in ("invalid_request", "missing_field"), (body, r.text)
    r = client.post("/admin/keys", content=b"{not json", headers={**admin, "content-type": "application/json"})
    assert r.status_code == 400 and _error(r) == "invalid_request"
    r = client.delete("/admin/keys/424242", headers=admin)
    assert r.status_code == 404 and _error(r) == "not_found"
    r = client.delete("/admin/keys/abc", headers=admin)
    assert r.status_code == 400 and _error(r) == "invalid_request"


def test_bootstrap_admin_key(make_client, engine):
    boot = "0123456789abcdef" * 3   # as `openssl rand -hex` makes them: no idv_ tag
    client = make_client(bootstrap_admin_key=boot)
    r = client.post("/admin/keys", json={"role": "operator", "name": "ops"}, headers={"X-API-Key": boot})
    assert r.status_code == 201
    client2 = make_client(bootstrap_admin_key=boot)  # a restart does not create it twice
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ApiKey).where(
            ApiKey.key_hash == keys.hash_key(boot))).scalar() == 1
    row = keys.lookup(engine, boot)
    # listed under a random identifier: none of the secret's own characters
    assert row.role == "admin" and row.prefix.startswith(keys.BOOTSTRAP_TAG) and not boot.startswith(row.prefix)
    assert client.get("/admin/keys", headers={"X-API-Key": boot}).json()["items"][0]["prefix"] == row.prefix
    # a bootstrap key listed before by its first characters gets such an identifier at the next start
    with engine.begin() as conn:
        conn.execute(ApiKey.__table__.update().where(ApiKey.id == row.id).values(prefix=boot[:12]))
    make_client(bootstrap_admin_key=boot)
    relabelled = keys.lookup(engine, boot).prefix
    assert relabelled.startswith(keys.BOOTSTRAP_TAG) and relabelled != row.prefix and not boot.startswith(relabelled)

    keys.revoke_key(engine, row.id)  # a revoked bootstrap key stays revoked across restarts
    make_client(bootstrap_admin_key=boot)
    assert client2.get("/admin/keys", headers={"X-API-Key": boot}).status_code == 401


def test_rate_limit_per_key(make_client, role_keys, engine):
    client = make_client(rate_limit_per_minute=2)
    kiosk, admin = {"X-API-Key": role_keys["kiosk"]}, {"X-API-Key": role_keys["admin"]}
    photos = {"id_photo": base64.b64encode(b"chip bytes").decode(), "live_photo": base64.b64encode(b"live").decode()}
    codes = [client.post("/verify", json={}, headers=kiosk) for _ in range(2)]
    # over the limit: refused before any analysis (these bytes are no image), its body read for the record
    codes.append(client.post("/verify", json={**photos, "device_id": "kiosk-2", "reference": "case-9"}, headers=kiosk))
    assert [r.status_code for r in codes] == [400, 400, 429]
    assert _error(codes[2]) == "rate_limited" and int(codes[2].headers["Retry-After"]) >= 1
    assert client.post("/verify", json={}, headers=admin).status_code == 400  # another key: its own budget
    with engine.connect() as conn:  # the refused call is audited too, with the device it came from
        limited = conn.execute(select(AuditRecord).where(AuditRecord.error_code == "rate_limited")).all()
    assert len(limited) == 1 and limited[0].id == codes[2].headers["X-Request-ID"]
    assert (limited[0].device_id, limited[0].reference, limited[0].decision) == ("kiosk-2", "case-9", "rejected")
    assert limited[0].id_sha256 == hashlib.sha256(b"chip bytes").hexdigest() and limited[0].id_faces is None


def test_rate_limiter_refills():
    from service.ratelimit import RateLimiter

    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one per second, bursts of 60
    assert all(limiter.check("k") == 0.0 for _ in range(60))
    assert limiter.check("k") == pytest.approx(1.0)
    now[0] += 1.0
    assert limiter.check("k") == 0.0
    assert limiter.check("other") == 0.0
    assert RateLimiter(0).check("k") == 0.0  # 0 = off


def test_keys_cli(db_url, engine, make_client, capsys):
    assert cli(["keys", "--database-url", db_url, "create", "--role", "operator", "--name", "night shift"]) == 0
    plaintext = capsys.readouterr().out.strip().splitlines()[-1]  # the key is the last line
    key = keys.lookup(engine, plaintext)
    assert key.role == "operator" and key.name == "night shift"

    client = make_client()
    assert client.get("/audit", headers={"X-API-Key": plaintext}).status_code == 200

    assert cli(["keys", "--database-url", db_url, "list"]) == 0
    out = capsys.readouterr().out
    assert "night shift" in out and key.prefix in out and plaintext not in out and "active" in out

    assert cli(["keys", "--database-url", db_url, "revoke", str(key.id)]) == 0
    capsys.readouterr()
    assert client.get("/audit", headers={"X-API-Key": plaintext}).status_code == 401
    assert cli(["keys", "--database-url", db_url, "list"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert cli(["keys", "--database-url", db_url, "revoke", "99999"]) == 1
    with pytest.raises(SystemExit):
        cli(["keys", "--database-url", db_url, "create", "--role", "root", "--name", "x"])
