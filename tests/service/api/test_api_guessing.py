"""Issue 12, item 6: key guessing. Failed keys and console sign-ins are throttled per client
address and per key prefix (429 with Retry-After), the bootstrap admin key must be at least 32
characters, keys are stored as HMAC(IDV_KEY_PEPPER, SHA-256) (migration 0003 converts the old
digests in place), and the last active admin key cannot be revoked. SQLite and PostgreSQL."""
from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from console_support import csrf_from
from conftest import UnusedModels
from service.app import create_app
from service.records import keys
from service.records.engine import make_engine, migrate
from service.records.tables import ApiKey
from service.settings import Settings


def client_at(db_url: str, address: str, **settings) -> TestClient:
    return TestClient(create_app(Settings(database_url=db_url, **settings), models=UnusedModels()),
                      client=(address, 40000))


def test_wrong_keys_are_throttled_per_address(db_url, role_keys):
    with client_at(db_url, "10.0.0.1", auth_failures_per_minute=5) as attacker, \
            client_at(db_url, "10.0.0.2", auth_failures_per_minute=5) as other:
        codes = [attacker.get("/audit", headers={"X-API-Key": f"guess-{i:04d}-xxxxxxxxxxxxxxx"}).status_code
                 for i in range(8)]
        assert codes == [401] * 5 + [429] * 3
        r = attacker.get("/audit", headers={"X-API-Key": role_keys["operator"]})   # even a right key, for now
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limited"
        assert attacker.post("/verify", headers={"X-API-Key": role_keys["kiosk"]}).status_code == 429
        # other addresses are not affected; a missing header is not a guess
        assert other.get("/audit", headers={"X-API-Key": role_keys["operator"]}).status_code == 200
        assert [other.get("/audit").status_code for _ in range(10)] == [401] * 10


def test_wrong_keys_are_throttled_per_key_prefix(db_url, role_keys):
    """Guesses spread over many addresses still share the presented key's prefix."""
    prefix = role_keys["operator"][:12]
    codes = []
    # one app, many addresses: the throttle lives in the app
    app = create_app(Settings(database_url=db_url, auth_failures_per_minute=5), models=UnusedModels())
    for i in range(7):
        with TestClient(app, client=(f"10.1.0.{i}", 40000)) as c:
            codes.append(c.get("/audit", headers={"X-API-Key": prefix + "wrong-suffix-xxxxxxxxxxxxxxx"}).status_code)
    assert codes == [401] * 5 + [429] * 2
    with TestClient(app, client=("10.1.0.99", 40000)) as c:
        assert c.get("/audit", headers={"X-API-Key": "idv_another-prefix-xxxxxxxxxxxxxxx"}).status_code == 401


def test_console_sign_ins_are_throttled(db_url, role_keys):
    with client_at(db_url, "10.2.0.1", auth_failures_per_minute=3) as c:
        codes = []
        for i in range(5):
            page = c.get("/console/login")
            r = c.post("/console/login", data={"key": f"wrong-{i}-xxxxxxxxxxxxxxxxxxxxxxxxx",
                                               "csrf_token": csrf_from(page.text)}, follow_redirects=False)
            codes.append(r.status_code)
        assert codes == [401] * 3 + [429] * 2 and int(r.headers["Retry-After"]) >= 1


def test_bootstrap_key_must_be_long(db_url):
    with pytest.raises(ValueError, match="at least 32"):
        with TestClient(create_app(Settings(database_url=db_url, bootstrap_admin_key="short-but-not-32-chars"),
                                   models=UnusedModels())):
            pass
    with TestClient(create_app(Settings(database_url=db_url, bootstrap_admin_key="b" * 32), models=UnusedModels())) as c:
        assert c.get("/admin/keys", headers={"X-API-Key": "b" * 32}).status_code == 200


def test_keys_are_stored_under_the_pepper(db_url, engine):
    key, plaintext = keys.create_key(engine, "operator", "peppered", pepper="pepper-1")
    with engine.connect() as conn:
        stored = conn.execute(select(ApiKey.key_hash).where(ApiKey.id == key.id)).scalar()
    assert stored != hashlib.sha256(plaintext.encode()).hexdigest()
    assert stored == keys.pepper_hash("pepper-1", hashlib.sha256(plaintext.encode()).hexdigest())
    with client_at(db_url, "10.3.0.1", key_pepper="pepper-1") as right, \
            client_at(db_url, "10.3.0.2", key_pepper="pepper-2") as wrong:
        assert right.get("/audit", headers={"X-API-Key": plaintext}).status_code == 200
        assert wrong.get("/audit", headers={"X-API-Key": plaintext}).status_code == 401


def test_migration_0003_converts_existing_digests(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate(url, "0002")
    engine = make_engine(url)
    plaintext = "idv_" + "k" * 43
    with engine.begin() as conn:   # a key as 0002 stored it: plain SHA-256
        conn.execute(text("INSERT INTO api_keys (name, role, prefix, key_hash, created_at) "
                          "VALUES ('old', 'admin', 'idv_kkk', :h, '2026-01-01 00:00:00')"),
                     {"h": hashlib.sha256(plaintext.encode()).hexdigest()})
    migrate(url, key_pepper="the-pepper")
    assert keys.lookup(engine, plaintext, "the-pepper") is not None
    assert keys.lookup(engine, plaintext) is None and keys.lookup(engine, plaintext, "other") is None
    engine.dispose()


def test_the_last_admin_key_cannot_be_revoked(make_client, engine, role_keys):
    client = make_client()
    admin = role_keys["admin"]
    own = keys.lookup(engine, admin).id
    r = client.delete(f"/admin/keys/{own}", headers={"X-API-Key": admin})
    assert r.status_code == 409 and r.json()["error"]["code"] == "last_admin_key"
    second, plain2 = keys.create_key(engine, "admin", "second")
    assert client.delete(f"/admin/keys/{second.id}", headers={"X-API-Key": admin}).status_code == 200
    assert client.delete(f"/admin/keys/{own}", headers={"X-API-Key": admin}).status_code == 409
    third, plain3 = keys.create_key(engine, "admin", "third")
    assert client.delete(f"/admin/keys/{own}", headers={"X-API-Key": plain3}).status_code == 200
    assert client.get("/admin/keys", headers={"X-API-Key": plain3}).status_code == 200
