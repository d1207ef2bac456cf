"""/verify's checks beyond the format (service/api/guards.py), with the real models and real
photos, on SQLite and PostgreSQL: the ID photo sent as the live photo (the same bytes, or the
same pixels in another file) is 422 `same_image`; a live photo decided on before is flagged in
the answer and the hash-chained record, and refused (409 `live_photo_replayed`) when set; a key
bound to a device_id verifies only for it and no other key may use that device_id (403
`device_mismatch`); a JSON body naming a key twice is 400 `duplicate_json_key`."""
from __future__ import annotations

import base64
import io
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select, update

from conftest import reencoded
from service.records import audit, keys
from service.records.tables import ApiKey, AuditRecord


@pytest.fixture
def photo(bundled_images) -> bytes:
    return (bundled_images / "Tom_Hanks_54745.png").read_bytes()


def _post(client, key: str, id_photo: bytes, live_photo: bytes, **data):
    return client.post("/verify", headers={"X-API-Key": key}, data=data,
                       files={"id_photo": ("id", id_photo), "live_photo": ("live", live_photo)})


def _code(r) -> tuple[int, str, str | None]:
    err = r.json()["error"]
    return r.status_code, err["code"], err["field"]


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def test_the_id_photo_as_the_live_photo_is_refused(make_client, models, photo, engine, role_keys):
    client = make_client(models)
    kiosk = role_keys["kiosk"]
    r = _post(client, kiosk, photo, photo)
    assert _code(r) == (422, "same_image", "live_photo")
    rec = audit.get(engine, r.headers["X-Request-ID"])
    assert rec.decision == "rejected" and rec.error_code == "same_image" and rec.error_field == "live_photo"
    assert rec.id_sha256 == rec.live_sha256 and rec.id_faces is None   # refused before any analysis

    # the same pixels in another file (PNG vs BMP): decoded and compared, refused too
    pixels = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))
    png, bmp = _encode(pixels, "PNG"), _encode(pixels, "BMP")
    assert png != bmp
    r = _post(client, kiosk, png, bmp)
    assert _code(r) == (422, "same_image", "live_photo")
    rec = audit.get(engine, r.headers["X-Request-ID"])
    assert rec.error_code == "same_image" and rec.id_faces == 1 and rec.live_faces == 1

    # one pixel changed is another photo: analysed and decided (here a match, the same face)
    other = pixels.copy()
    other[0, 0] = 255 - other[0, 0]
    r = _post(client, kiosk, png, _encode(other, "BMP"))
    assert r.status_code == 200 and r.json()["decision"] == "match", r.text
    r = _post(client, kiosk, photo, reencoded(photo))
    assert r.status_code == 200 and r.json()["decision"] == "match", r.text
    assert audit.verify_chain(engine).ok


def test_a_live_photo_decided_on_before_is_flagged(make_client, models, photo, engine, role_keys):
    client = make_client(models)
    kiosk = role_keys["kiosk"]
    live = reencoded(photo)
    first = _post(client, kiosk, photo, live)
    assert first.status_code == 200 and first.json()["live_photo_seen_before"] is False, first.text
    again = _post(client, kiosk, reencoded(photo, 80), live)   # another chip photo, the same live photo
    assert again.status_code == 200 and again.json()["live_photo_seen_before"] is True, again.text
    rec = audit.get(engine, again.headers["X-Request-ID"])
    assert rec.live_seen_before is True and audit.get(engine, first.headers["X-Request-ID"]).live_seen_before is False
    operator = {"X-API-Key": role_keys["operator"]}
    assert client.get(f"/audit/{rec.id}", headers=operator).json()["live_photo_seen_before"] is True
    assert audit.verify_chain(engine).ok
    # the flag is hashed into the chain
    with engine.begin() as conn:
        conn.execute(update(AuditRecord).where(AuditRecord.id == rec.id).values(live_seen_before=False))
    report = audit.verify_chain(engine)
    assert not report.ok and report.broken_id == rec.id


def test_replays_refused_when_set_and_only_within_the_window(make_client, models, photo, engine, role_keys):
    client = make_client(models, refuse_replayed_live=True, replay_window_seconds=3600)
    kiosk = role_keys["kiosk"]
    live = reencoded(photo)
    first = _post(client, kiosk, photo, live)
    assert first.status_code == 200 and first.json()["live_photo_seen_before"] is False, first.text
    r = _post(client, kiosk, photo, live)
    assert _code(r) == (409, "live_photo_replayed", "live_photo")
    rec = audit.get(engine, r.headers["X-Request-ID"])
    assert rec.error_code == "live_photo_replayed" and rec.live_seen_before is True and rec.live_faces is None
    # a refused call does not count as seen: only the decided one does, and only within the window
    with engine.begin() as conn:
        conn.execute(update(AuditRecord).where(AuditRecord.id == first.headers["X-Request-ID"])
                     .values(created_at=datetime.now(timezone.utc) - timedelta(hours=2)))
    r = _post(client, kiosk, photo, live)
    assert r.status_code == 200 and r.json()["live_photo_seen_before"] is False, r.text
    # a window of 0: no check
    client = make_client(models, refuse_replayed_live=True, replay_window_seconds=0)
    r = _post(client, kiosk, photo, live)
    assert r.status_code == 200 and r.json()["live_photo_seen_before"] is None, r.text


def test_a_bound_kiosk_key_and_its_device_id(make_client, models, photo, engine, admin_key):
    client = make_client(models)
    admin = {"X-API-Key": admin_key}
    r = client.post("/admin/keys", headers=admin, json={"role": "kiosk", "name": "gate 12", "device_id": "kiosk-12"})
    assert r.status_code == 201 and r.json()["device_id"] == "kiosk-12", r.text
    bound, bound_id = r.json()["key"], r.json()["id"]
    other = client.post("/admin/keys", headers=admin, json={"role": "kiosk", "name": "free"}).json()
    assert other["device_id"] is None
    live = reencoded(photo)

    # the bound key: its own device (named, or not named) is verified; another one is refused
    r = _post(client, bound, photo, live, device_id="kiosk-12")
    assert r.status_code == 200, r.text
    r = _post(client, bound, photo, live)
    assert r.status_code == 200 and audit.get(engine, r.headers["X-Request-ID"]).device_id == "kiosk-12"
    r = _post(client, bound, photo, live, device_id="kiosk-13")
    assert _code(r) == (403, "device_mismatch", "device_id")
    rec = audit.get(engine, r.headers["X-Request-ID"])
    assert rec.device_id == "kiosk-12" and rec.error_code == "device_mismatch" and rec.live_faces is None

    # another key may not write records under the bound device_id; free ones it may
    r = _post(client, other["key"], photo, live, device_id="kiosk-12")
    assert _code(r) == (403, "device_mismatch", "device_id")
    assert audit.get(engine, r.headers["X-Request-ID"]).device_id is None
    assert _post(client, other["key"], photo, live, device_id="kiosk-99").status_code == 200
    with engine.connect() as conn:
        under_12 = conn.execute(select(AuditRecord.key_id).where(AuditRecord.device_id == "kiosk-12")).scalars().all()
    assert set(under_12) == {bound_id}
    # revoked, the key frees its device
    assert client.delete(f"/admin/keys/{bound_id}", headers=admin).status_code == 200
    assert _post(client, other["key"], photo, live, device_id="kiosk-12").status_code == 200

    listed = {k["id"]: k for k in client.get("/admin/keys", headers=admin).json()["items"]}
    assert listed[bound_id]["device_id"] == "kiosk-12" and listed[other["id"]]["device_id"] is None
    # only kiosk keys are bound, to a printable device_id
    for body in ({"role": "operator", "name": "o", "device_id": "kiosk-1"}, {"role": "admin", "name": "a", "device_id": "x"},
                 {"role": "kiosk", "name": "k", "device_id": ""}, {"role": "kiosk", "name": "k", "device_id": "a\x1bb"},
                 {"role": "kiosk", "name": "k", "device_id": "d" * 129}):
        r = client.post("/admin/keys", headers=admin, json=body)
        assert _code(r)[:1] == (400,) and r.json()["error"]["field"] == "device_id", (body, r.text)
    with pytest.raises(ValueError):
        keys.create_key(engine, "operator", "o", device_id="kiosk-1")
    assert audit.verify_chain(engine).ok


def test_a_json_key_named_twice_is_refused(make_client, models, photo, engine, role_keys, admin_key):
    client = make_client(models)
    b64 = base64.b64encode(photo).decode()
    live = base64.b64encode(reencoded(photo)).decode()
    kiosk = {"X-API-Key": role_keys["kiosk"], "content-type": "application/json"}
    ok = json.dumps({"id_photo": b64, "live_photo": live, "device_id": "a"})
    assert client.post("/verify", headers=kiosk, content=ok).status_code == 200
    for doubled, field in ((ok[:-1] + ', "device_id": "b"}', "device_id"),
                           (ok[:-1] + f', "live_photo": "{b64}"}}', "live_photo"),
                           ('{"id_photo": "x", "live_photo": "y", "extra": {"k": 1, "k": 2}}', "k")):
        r = client.post("/verify", headers=kiosk, content=doubled)
        assert _code(r) == (400, "duplicate_json_key", field), r.text
        assert audit.get(engine, r.headers["X-Request-ID"]).error_code == "duplicate_json_key"

    admin = {"X-API-Key": admin_key, "content-type": "application/json"}
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(ApiKey)).scalar()
    r = client.post("/admin/keys", headers=admin, content='{"role": "kiosk", "name": "k", "role": "admin"}')
    assert _code(r) == (400, "duplicate_json_key", "role")
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ApiKey)).scalar() == before
    r = client.post("/admin/keys", headers=admin, content='{"role": "kiosk", "name": "k"}')
    assert r.status_code == 201, r.text


def test_keys_cli_binds_a_kiosk_key(db_url, engine, capsys):
    from service.cli import main as cli

    assert cli(["keys", "--database-url", db_url, "create", "--role", "kiosk", "--name", "gate", "--device-id",
                "kiosk-7"]) == 0
    key = keys.lookup(engine, capsys.readouterr().out.strip().splitlines()[-1])
    assert key.role == "kiosk" and key.device_id == "kiosk-7" and keys.device_bound(engine, "kiosk-7")
    assert cli(["keys", "--database-url", db_url, "list"]) == 0
    assert "(device 'kiosk-7')" in capsys.readouterr().out
    assert cli(["keys", "--database-url", db_url, "create", "--role", "operator", "--name", "o", "--device-id",
                "kiosk-8"]) == 1
    assert "only a kiosk key" in capsys.readouterr().out and not keys.device_bound(engine, "kiosk-8")
