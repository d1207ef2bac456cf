"""Bad input never gives a 5xx: every item of the corpus answers 4xx with a stable code in our
error shape, is audited as `rejected`, and the service keeps serving. The request body is
capped while it streams in (a 50 MB upload is refused without being buffered). Unexpected
failures answer 500 internal_error and are still audited. Runs on SQLite and PostgreSQL with
the real pipeline."""
from __future__ import annotations

import asyncio
import base64
import io
import socket
import struct
import zlib
from urllib.parse import urlparse

import numpy as np
import pytest
from sqlalchemy import func, select

from conftest import reencoded
from service.records import audit
from service.records.tables import AuditRecord

KNOWN_CODES = {"missing_field", "invalid_request", "unsupported_media_type", "image_undecodable",
               "image_too_large", "no_face", "face_too_small", "unauthorized", "forbidden", "rate_limited"}
MB = 1024 * 1024


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def encode(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(bundled_images) -> list[tuple[str, dict, int | tuple, str | tuple]]:
    """(name, request kwargs, expected status(es), expected code(s)). Bodies use the kiosk key."""
    from PIL import Image

    face = (bundled_images / "Tom_Hanks_54745.png").read_bytes()
    jpeg = encode(np.asarray(Image.open(io.BytesIO(face)).convert("RGB")), "JPEG")
    rng = np.random.default_rng(7)
    no_face = encode((rng.random((240, 320, 3)) * 40 + np.linspace(60, 200, 320)[None, :, None]).astype(np.uint8), "JPEG")
    gif = encode(np.zeros((32, 32, 3), np.uint8), "GIF")
    tiny = encode(np.zeros((1, 1, 3), np.uint8), "PNG")

    def files(id_photo: bytes, live_photo: bytes = face) -> dict:
        return {"files": {"id_photo": ("a", id_photo), "live_photo": ("b", live_photo)}}

    def js(doc) -> dict:
        return {"json": doc}

    b64 = base64.b64encode(face).decode()
    return [
        ("empty file", files(b""), 400, "image_undecodable"),
        ("text as image", files(b"this is a passport photo, honest"), 415, "unsupported_media_type"),
        ("GIF", files(gif), 415, "unsupported_media_type"),
        ("truncated JPEG", files(jpeg[: len(jpeg) // 2]), 400, "image_undecodable"),
        ("JPEG magic only", files(b"\xff\xd8\xff\xe0" + b"\0" * 20), 400, "image_undecodable"),
        ("1x1 PNG", files(tiny), (400, 422), ("no_face", "face_too_small", "image_undecodable")),
        ("PNG claiming 30000x30000", files(png_header_only(30000, 30000)), 413, "image_too_large"),
        ("image over the byte cap", files(b"\xff\xd8\xff\xe0" + bytes(11 * MB)), 413, "image_too_large"),
        ("no face", files(face, no_face), 422, "no_face"),
        ("missing live_photo", {"files": {"id_photo": ("a", face)}}, 400, "missing_field"),
        ("photo as a text field", {"data": {"id_photo": "abc", "live_photo": "def"},
                                   "files": {"x": ("x", b"x")}}, 400, "invalid_request"),
        ("bad base64", js({"id_photo": "not*base64!", "live_photo": b64}), 400, "invalid_request"),
        ("base64 of text", js({"id_photo": base64.b64encode(b"hello").decode(), "live_photo": b64}), 415,
         "unsupported_media_type"),
        ("photo is a number", js({"id_photo": 12345, "live_photo": b64}), 400, "invalid_request"),
        ("photo is a list", js({"id_photo": [1, 2], "live_photo": b64}), 400, "invalid_request"),
        ("device_id is an object", js({"id_photo": b64, "live_photo": b64, "device_id": {"a": 1}}), 400,
         "invalid_request"),
        ("reference with NUL", js({"id_photo": b64, "live_photo": b64, "reference": "a\x00b"}), 400, "invalid_request"),
        ("reference too long", js({"id_photo": b64, "live_photo": b64, "reference": "r" * 300}), 400, "invalid_request"),
        ("JSON array", js([b64, b64]), 400, "invalid_request"),
        ("JSON null", {"content": b"null", "headers": {"content-type": "application/json"}}, 400, "invalid_request"),
        ("empty JSON object", js({}), 400, "missing_field"),
        ("garbage JSON body", {"content": b"\x00\xffgarbage{{", "headers": {"content-type": "application/json"}},
         400, "invalid_request"),
        ("deeply nested JSON", {"content": b"[" * 100000, "headers": {"content-type": "application/json"}},
         400, "invalid_request"),
        ("garbage multipart", {"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}},
         400, ("invalid_request", "missing_field")),
        ("multipart without boundary", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}},
         400, "invalid_request"),
        ("no body", {"headers": {"content-type": "application/json"}}, 400, "invalid_request"),
        ("wrong content type", {"content": b"id_photo=abc", "headers": {"content-type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("form-urlencoded", {"data": {"id_photo": "abc", "live_photo": "abc"}}, 415, "unsupported_media_type"),
        ("no content type", {"content": b"hello"}, 415, "unsupported_media_type"),
        ("bad Content-Length", {"content": b"{}", "headers": {"content-type": "application/json",
                                                             "content-length": "lots"}}, 400, "invalid_request"),
    ]


def test_bad_input_corpus(make_client, models, corpus, bundled_images, engine, role_keys):
    client = make_client(models)
    kiosk = {"X-API-Key": role_keys["kiosk"]}
    for name, kwargs, status, codes in corpus:
        kwargs = {**kwargs, "headers": {**kiosk, **kwargs.get("headers", {})}}
        r = client.post("/verify", **kwargs)
        assert r.status_code in ((status,) if isinstance(status, int) else status), (name, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, (name, body)
        assert body["error"]["code"] in ((codes,) if isinstance(codes, str) else codes), (name, body)
        assert body["error"]["code"] in KNOWN_CODES and body["error"]["message"]

    # a wrong key, whatever the body: 401, not audited
    for headers in ({}, {"X-API-Key": "wrong"}):
        r = client.post("/verify", headers={**headers, "content-type": "application/json"}, content=b"garbage")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"

    # still serving: a real verify succeeds after all that
    face = (bundled_images / "Tom_Hanks_54745.png").read_bytes()
    r = client.post("/verify", headers=kiosk, files={"id_photo": ("a", face), "live_photo": ("b", reencoded(face))})
    assert r.status_code == 200, r.text

    # one audit record per authenticated call, rejected ones with their code; chain intact
    with engine.connect() as conn:
        rows = conn.execute(select(AuditRecord.decision, AuditRecord.error_code).order_by(AuditRecord.seq)).all()
    assert len(rows) == len(corpus) + 1
    assert all(row.decision == "rejected" and row.error_code in KNOWN_CODES for row in rows[:-1])
    assert rows[-1].decision in ("match", "no_match")
    assert audit.verify_chain(engine).ok

    # the no-face record keeps what was seen: both images' hashes, the face counts
    records, _ = audit.query(engine, audit.AuditFilter(error_code="no_face"), 10)
    rec = audit.to_public(next(r for r in records if r.error_field == "live_photo"))
    assert rec["faces"]["id_photo"]["faces_seen"] == 1 and rec["faces"]["live_photo"]["faces_seen"] == 0
    assert rec["faces"]["id_photo"]["sha256"] and rec["faces"]["live_photo"]["sha256"]


def test_50mb_upload_is_refused(make_client, role_keys, engine):
    client = make_client()  # refused before the pipeline
    kiosk = {"X-API-Key": role_keys["kiosk"]}
    big = bytes(50 * MB)
    r = client.post("/verify", headers=kiosk, files={"id_photo": ("a.jpg", big), "live_photo": ("b.jpg", b"x")})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    r = client.post("/verify", headers={**kiosk, "content-type": "application/json"}, content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(AuditRecord)
                            .where(AuditRecord.error_code == "image_too_large")).scalar() == 2


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=xyz", "application/json"])
def test_unsized_body_is_cut_off_at_the_cap(db_url, engine, role_keys, content_type, unused_models):
    """A chunked body with no Content-Length: the app stops reading once the cap is passed,
    long before the (endless) body ends."""
    from service.app import create_app
    from service.settings import Settings

    cap, chunk = 1 * MB, 64 * 1024
    app = create_app(Settings(database_url=db_url, max_request_bytes=cap), models=unused_models)
    first = (b'--xyz\r\nContent-Disposition: form-data; name="id_photo"; filename="a.jpg"\r\n'
             b"Content-Type: image/jpeg\r\n\r\n") if content_type.startswith("multipart") else b'{"id_photo": "'
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        pulled += 1
        if pulled > 2000:  # 125 MB: the app is buffering everything; end the test
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": first if pulled == 1 else b"A" * chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/verify", "raw_path": b"/verify", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"x-api-key", role_keys["kiosk"].encode()),
                         (b"content-type", content_type.encode()), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413
    assert pulled <= cap // chunk + 2, f"read {pulled} chunks for a {cap} byte cap"
    engine.dispose()


def test_declared_50mb_refused_before_the_body_is_sent(db_url, role_keys, live_server, unused_models):
    """Over a real socket: headers announce 50 MB, the server answers 413 after 64 KB."""
    from service.app import create_app
    from service.settings import Settings

    base = urlparse(live_server(create_app(Settings(database_url=db_url), models=unused_models)))
    with socket.create_connection((base.hostname, base.port), timeout=30) as sock:
        sock.sendall(b"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-API-Key: " + role_keys["kiosk"].encode() + b"\r\n"
                     b"Content-Length: " + str(50 * MB).encode() + b"\r\n\r\n" + b" " * 65536)
        reply = sock.makefile("rb")
        status = reply.readline()
        headers = {}
        while (line := reply.readline().strip()):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reply.read(int(headers["content-length"]))
    assert status.startswith(b"HTTP/1.1 413"), status
    assert b'"image_too_large"' in body


def test_unexpected_failure_is_500_audited_and_logged(make_client, models, bundled_images, engine, role_keys,
                                                      monkeypatch, caplog):
    client = make_client(models)

    def broken(*_args):
        raise RuntimeError("tower exploded")

    monkeypatch.setattr(models.pipeline, "scores", broken)
    face = (bundled_images / "Tom_Hanks_54745.png").read_bytes()
    r = client.post("/verify", headers={"X-API-Key": role_keys["kiosk"]},
                    files={"id_photo": ("a", face), "live_photo": ("b", reencoded(face))})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error" and "exploded" not in r.text  # no internals leak
    assert "tower exploded" in caplog.text
    rec = audit.get(engine, r.headers["X-Request-ID"])
    assert rec.decision == "rejected" and rec.error_code == "internal_error"
    assert rec.id_faces == 1 and rec.live_faces == 1  # what the pipeline saw before failing
    monkeypatch.undo()
    assert client.get("/healthz").status_code == 200
