"""Issue 12, items 3 and 7 at the HTTP layer: invalid UTF-8 in multipart text fields is 400
`invalid_request` (not stored as Latin-1), every API answer carries `Cache-Control: no-store`
and `X-Content-Type-Options: nosniff`, /metrics can need a token, a slow body is cut at
IDV_BODY_TIMEOUT_SECONDS with 408, and an unexpected error is the 500 envelope with X-Request-ID."""
from __future__ import annotations

import socket
import time

from service.records import audit


def test_invalid_utf8_in_form_fields_is_refused(make_client, role_keys, engine, models):
    client = make_client(models=models)
    for name in ("device_id", "reference"):
        body = (b"--b\r\nContent-Disposition: form-data; name=\"" + name.encode() + b"\"\r\n\r\nkiosk-\xe9\xff\r\n"
                b"--b\r\nContent-Disposition: form-data; name=\"id_photo\"; filename=\"a\"\r\n\r\nxx\r\n"
                b"--b\r\nContent-Disposition: form-data; name=\"live_photo\"; filename=\"b\"\r\n\r\nxx\r\n--b--\r\n")
        r = client.post("/verify", content=body, headers={"X-API-Key": role_keys["kiosk"],
                                                          "Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 400 and r.json()["error"] == {
            "code": "invalid_request", "message": r.json()["error"]["message"], "field": name}
        record = audit.get(engine, r.headers["X-Request-ID"])
        assert record.device_id is None and record.reference is None and record.error_code == "invalid_request"
    # valid UTF-8 still passes the reader (and fails later, on the photos)
    r = client.post("/verify", files={"id_photo": ("a", b"xx"), "live_photo": ("b", b"yy")},
                    data={"device_id": "kiosk-é"}, headers={"X-API-Key": role_keys["kiosk"]})
    assert r.json()["error"]["code"] == "unsupported_media_type"
    assert audit.get(engine, r.headers["X-Request-ID"]).device_id == "kiosk-é"


def test_api_answers_are_not_cached_or_sniffed(make_client, role_keys):
    client = make_client()
    for r in (client.get("/healthz"), client.get("/readyz"), client.get("/metrics"), client.get("/openapi.json"),
              client.get("/audit"), client.get("/audit", headers={"X-API-Key": role_keys["operator"]}),
              client.get("/nowhere"), client.delete("/healthz"), client.post("/verify")):
        assert r.headers["cache-control"] == "no-store", r.request.url
        assert r.headers["x-content-type-options"] == "nosniff", r.request.url


def test_metrics_behind_a_token(make_client):
    client = make_client(metrics_token="s3cret-token")
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
    assert r.status_code == 200 and "idverify_requests" in r.text
    assert make_client().get("/metrics").status_code == 200   # off by default


def test_unexpected_errors_are_the_envelope_with_a_request_id(make_client, role_keys, monkeypatch):
    from service.api import admin

    client = make_client()
    monkeypatch.setattr(admin.keys, "list_keys", lambda engine: 1 / 0)
    r = client.get("/admin/keys", headers={"X-API-Key": role_keys["admin"]})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error" and r.headers["X-Request-ID"]
    assert client.get("/healthz").status_code == 200


def test_slow_body_is_cut_with_408(live_server, db_url, role_keys):
    from service.app import create_app
    from service.settings import Settings

    from conftest import UnusedModels

    base = live_server(create_app(Settings(database_url=db_url, body_timeout_seconds=1.0), models=UnusedModels()))
    host, port = base.rsplit(":", 1)[0].split("//")[1], int(base.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /verify HTTP/1.1\r\nHost: x\r\nX-API-Key: " + role_keys["kiosk"].encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"id_photo\": \"")
        t0 = time.monotonic()
        answer = b""
        while b"}}" not in answer and time.monotonic() - t0 < 5:
            answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer and time.monotonic() - t0 < 5
