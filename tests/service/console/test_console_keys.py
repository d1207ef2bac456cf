"""The console's API-key page: admins list, create (plaintext shown once) and revoke keys
through CSRF-protected forms, revocation only from its confirmation page; operators are answered
403; a refusal from keys.revoke_key (the last active admin key) is shown on the page."""
from __future__ import annotations

import logging
import re

import pytest

from console_support import csrf_from, sign_in
from service.records import keys


@pytest.fixture
def client(make_client):
    return make_client()


def _token(client) -> str:
    return csrf_from(client.get("/console/keys").text)


def test_operators_get_403_and_no_keys_link(client, role_keys):
    sign_in(client, role_keys["operator"])
    assert 'href="/console/keys"' not in client.get("/console").text
    r = client.get("/console/keys")
    assert r.status_code == 403 and "An operator key cannot manage API keys" in r.text and "test-kiosk" not in r.text
    token = csrf_from(client.get("/console").text)
    assert client.post("/console/keys", data={"csrf_token": token, "role": "admin", "name": "x"}).status_code == 403
    assert client.post("/console/keys/1/revoke", data={"csrf_token": token}).status_code == 403
    assert client.get("/console/keys/1/revoke").status_code == 403


def test_without_a_session_or_csrf_token(client, role_keys):
    assert client.get("/console/keys", follow_redirects=False).status_code == 303
    assert client.post("/console/keys", data={"role": "kiosk", "name": "x"}).status_code == 401
    sign_in(client, role_keys["admin"])
    assert client.post("/console/keys", data={"role": "kiosk", "name": "x"}).status_code == 403
    assert client.post("/console/keys", data={"role": "kiosk", "name": "x", "csrf_token": "guess"}).status_code == 403
    assert client.post("/console/keys/1/revoke", data={}).status_code == 403
    assert client.post("/console/keys/1/revoke", data={"confirm": "yes"}).status_code == 403   # CSRF still


def test_admin_lists_and_creates_a_key_shown_once(client, engine, role_keys, caplog):
    sign_in(client, role_keys["admin"])
    page = client.get("/console")
    assert 'href="/console/keys"' in page.text
    r = client.get("/console/keys")
    assert r.status_code == 200
    for role in keys.ROLES:
        assert f"test-{role}" in r.text
    assert all(plaintext not in r.text for plaintext in role_keys.values())
    with caplog.at_level(logging.DEBUG):
        r = client.post("/console/keys", data={"csrf_token": csrf_from(r.text), "role": "kiosk", "name": "lobby 7"})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    plaintext = re.search(r'id="new-key">([^<]+)<', r.text).group(1)
    created = keys.lookup(engine, plaintext)
    assert created is not None and created.role == "kiosk" and created.name == "lobby 7"
    assert plaintext not in caplog.text and f"key {created.id} (kiosk) created" in caplog.text
    again = client.get("/console/keys")
    assert "lobby 7" in again.text and plaintext not in again.text and created.prefix in again.text


@pytest.mark.parametrize("form", [{"role": "root", "name": "x"}, {"role": "kiosk", "name": " "},
                                  {"role": "kiosk", "name": "x" * 201}, {"role": "kiosk", "name": "a\x00b"}])
def test_invalid_create_forms_are_reported(client, engine, role_keys, form):
    sign_in(client, role_keys["admin"])
    before = len(keys.list_keys(engine))
    r = client.post("/console/keys", data={"csrf_token": _token(client), **form})
    assert r.status_code == 400 and 'id="keys-error"' in r.text
    assert len(keys.list_keys(engine)) == before


def _row(client, key_id: int) -> str:
    return re.search(rf'<tr id="key-{key_id}">(.*?)</tr>', client.get("/console/keys").text, re.S).group(1)


def test_admin_revokes_a_key_after_confirming(client, engine, role_keys):
    sign_in(client, role_keys["admin"])
    kiosk = keys.lookup(engine, role_keys["kiosk"])
    # the list links to the confirmation step: no form there revokes on one click
    row = _row(client, kiosk.id)
    assert f'href="/console/keys/{kiosk.id}/revoke"' in row and "<form" not in row
    # a POST that did not come from the confirmation page revokes nothing: it is sent there
    r = client.post(f"/console/keys/{kiosk.id}/revoke", data={"csrf_token": _token(client)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/console/keys/{kiosk.id}/revoke"
    assert keys.lookup(engine, role_keys["kiosk"]) is not None
    page = client.get(f"/console/keys/{kiosk.id}/revoke")
    assert page.status_code == 200 and f"Revoke key {kiosk.id}?" in page.text and "test-kiosk" in page.text
    assert 'name="confirm" value="yes"' in page.text and 'name="csrf_token"' in page.text
    assert 'href="/console/keys" id="cancel-revoke"' in page.text and page.headers["cache-control"] == "no-store"
    assert "you will be signed out" not in page.text
    r = client.post(f"/console/keys/{kiosk.id}/revoke", data={"csrf_token": csrf_from(page.text), "confirm": "yes"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/keys"
    assert keys.lookup(engine, role_keys["kiosk"]) is None
    row = _row(client, kiosk.id)
    assert "yes, " in row and "Revoke" not in row
    assert client.get(f"/console/keys/{kiosk.id}/revoke").status_code == 409   # already revoked
    # one's own key: the page says what follows
    own = keys.lookup(engine, role_keys["admin"])
    assert "you will be signed out" in client.get(f"/console/keys/{own.id}/revoke").text
    for missing in ("99999", "nope"):
        assert client.get(f"/console/keys/{missing}/revoke").status_code == 404
        assert client.post(f"/console/keys/{missing}/revoke",
                           data={"csrf_token": _token(client), "confirm": "yes"}).status_code == 404


def test_a_refused_revocation_is_shown(client, engine, role_keys):
    """keys.revoke_key refuses to revoke the last active admin key; the page says why."""
    sign_in(client, role_keys["admin"])
    token = _token(client)
    admin = keys.lookup(engine, role_keys["admin"])
    others = [k for k in keys.list_keys(engine) if k.role == "admin" and k.id != admin.id and not k.revoked_at]
    for k in others:  # leave the signed-in key as the only active admin key
        keys.revoke_key(engine, k.id)
    r = client.post(f"/console/keys/{admin.id}/revoke", data={"csrf_token": token, "confirm": "yes"})
    assert r.status_code == 409 and "Not revoked:" in r.text and "admin" in r.text
    assert keys.lookup(engine, role_keys["admin"]) is not None
