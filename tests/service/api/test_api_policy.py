"""The decision policy on /verify (service/face/policy.py) with real photos and the real models:
two people side by side (two LFW photos composed into one), a dominant face beside a small one,
a tiny face (downscaled), a blurred face; each rule's answer and audit record, and the record's
hash covering the rule. Runs on SQLite and PostgreSQL."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import update

from service.app import create_app
from service.face.policy import PolicyConfigError
from service.records import audit
from service.records.tables import AuditRecord
from service.settings import Settings


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(lfw_pairs) -> dict[str, bytes]:
    """One person (two photos of them), and compositions of LFW photos."""
    same_a, same_b = (_rgb(p) for p in lfw_pairs["same"])
    other_a, other_b = (_rgb(p) for p in lfw_pairs["different"])
    dominant = np.zeros((250, 350, 3), np.uint8)       # the person, and another face at 2/5 the size beside
    dominant[:, :250] = same_b
    dominant[75:175, 250:] = cv2.resize(other_b, (100, 100), interpolation=cv2.INTER_AREA)
    return {
        "id": _jpeg(same_a), "live": _jpeg(same_b),
        "two_people": _jpeg(np.concatenate([other_a, other_b], axis=1)),   # side by side, same scale
        "dominant": _jpeg(dominant),
        "tiny": _jpeg(cv2.resize(same_b, (125, 125), interpolation=cv2.INTER_AREA)),  # face ~48 px wide
        "blurred_live": _jpeg(cv2.GaussianBlur(same_b, (0, 0), 4)),
        "blurred_id": _jpeg(cv2.GaussianBlur(same_a, (0, 0), 4)),
    }


def _verify(client, key: str, id_photo: bytes, live_photo: bytes):
    r = client.post("/verify", headers={"X-API-Key": key},
                    files={"id_photo": ("id.jpg", id_photo), "live_photo": ("live.jpg", live_photo)})
    assert r.headers["X-Request-ID"]
    return r


def _refused(r, engine, code: str, field: str, rule: str) -> AuditRecord:
    """A 422 naming the rule, and its audit record saying the same."""
    assert r.status_code == 422, r.text
    assert r.json() == {"error": {"code": code, "field": field, "rule": rule, "message": r.json()["error"]["message"]}}
    record = audit.get(engine, r.headers["X-Request-ID"])
    assert record.decision == "rejected" and record.score is None
    assert (record.error_code, record.error_field, record.rule) == (code, field, rule)
    return record


def _decided(r, engine) -> tuple[dict, AuditRecord]:
    assert r.status_code == 200, r.text
    body = r.json()
    record = audit.get(engine, body["request_id"])
    assert body["rule"] == record.rule == "score_threshold" and record.decision == body["decision"]
    return body, record


def test_two_people_side_by_side_are_refused_on_either_photo(make_client, models, photos, engine, role_keys):
    client = make_client(models)
    r = _verify(client, role_keys["kiosk"], photos["id"], photos["two_people"])
    record = _refused(r, engine, "multiple_faces", "live_photo", "multiple_faces:live_photo")
    assert record.live_faces == 2 and record.live_quality["multiple_faces"] is True and record.id_faces == 1
    assert "2 faces" in r.json()["error"]["message"]

    # the chip photo must hold exactly one face, however the faces compare
    r = _verify(client, role_keys["kiosk"], photos["two_people"], photos["live"])
    record = _refused(r, engine, "multiple_faces", "id_photo", "multiple_faces:id_photo")
    assert record.id_faces == 2
    assert audit.verify_chain(engine).ok


def test_a_clearly_dominant_face_is_scored_and_the_ratio_is_a_setting(make_client, models, photos, engine, role_keys):
    r = _verify(make_client(models), role_keys["kiosk"], photos["id"], photos["dominant"])
    body, record = _decided(r, engine)
    live = body["faces"]["live_photo"]
    assert live["faces_seen"] == 2 and live["quality"]["multiple_faces"] is True and record.live_faces == 2
    assert live["box"][2] <= 250   # the person's face, not the small one beside it

    strict = make_client(models, live_face_dominance=10.0)   # the small face is ~1/6 of the area: not enough
    r = _verify(strict, role_keys["kiosk"], photos["id"], photos["dominant"])
    _refused(r, engine, "multiple_faces", "live_photo", "multiple_faces:live_photo")


def test_a_group_photo_is_refused(make_client, models, bundled_images, engine, role_keys):
    chip = (bundled_images / "Tom_Hanks_54745.png").read_bytes()
    r = _verify(make_client(models), role_keys["kiosk"], chip, (bundled_images / "t1.jpg").read_bytes())
    record = _refused(r, engine, "multiple_faces", "live_photo", "multiple_faces:live_photo")
    assert record.live_faces == 6


def test_quality_flags_refuse_only_when_listed(make_client, models, photos, engine, role_keys):
    kiosk = role_keys["kiosk"]
    # by default no flag refuses: the tiny and the blurred face are scored, with their flags set
    default = make_client(models)
    body, record = _decided(_verify(default, kiosk, photos["id"], photos["tiny"]), engine)
    assert body["faces"]["live_photo"]["quality"]["small_face"] is True and record.live_quality["small_face"]
    body, _ = _decided(_verify(default, kiosk, photos["blurred_id"], photos["blurred_live"]), engine)
    assert body["faces"]["live_photo"]["quality"]["blurry"] and body["faces"]["id_photo"]["quality"]["blurry"]

    small = make_client(models, refuse_quality="live_photo:small_face")
    _refused(_verify(small, kiosk, photos["id"], photos["tiny"]), engine,
             "quality_small_face", "live_photo", "quality:small_face:live_photo")
    _decided(_verify(small, kiosk, photos["id"], photos["live"]), engine)

    blurry = make_client(models, refuse_quality="blurry")   # both photos
    _refused(_verify(blurry, kiosk, photos["id"], photos["blurred_live"]), engine,
             "quality_blurry", "live_photo", "quality:blurry:live_photo")
    record = _refused(_verify(blurry, kiosk, photos["blurred_id"], photos["live"]), engine,
                      "quality_blurry", "id_photo", "quality:blurry:id_photo")
    assert record.id_quality["blurry"] is True

    live_only = make_client(models, refuse_quality="live_photo:blurry")   # a soft chip photo is scored
    body, _ = _decided(_verify(live_only, kiosk, photos["blurred_id"], photos["live"]), engine)
    assert body["faces"]["id_photo"]["quality"]["blurry"] is True
    assert audit.verify_chain(engine).ok


def test_the_record_hash_covers_the_rule(make_client, models, photos, engine, role_keys):
    r = _verify(make_client(models), role_keys["kiosk"], photos["id"], photos["two_people"])
    _refused(r, engine, "multiple_faces", "live_photo", "multiple_faces:live_photo")
    got = make_client(models).get(f"/audit/{r.headers['X-Request-ID']}", headers={"X-API-Key": role_keys["operator"]})
    assert got.json()["rule"] == "multiple_faces:live_photo"
    assert audit.verify_chain(engine).ok
    with engine.begin() as conn:
        conn.execute(update(AuditRecord).where(AuditRecord.id == r.headers["X-Request-ID"]).values(rule="score_threshold"))
    report = audit.verify_chain(engine)
    assert not report.ok and report.broken_id == r.headers["X-Request-ID"]


@pytest.mark.parametrize("setting, value, named", [
    ("refuse_quality", "sharpness", "IDV_REFUSE_QUALITY"),
    ("refuse_quality", "blurry,chip:blurry", "IDV_REFUSE_QUALITY"),
    ("refuse_quality", "multiple_faces", "IDV_REFUSE_QUALITY"),
    ("live_face_dominance", 0.5, "IDV_LIVE_FACE_DOMINANCE"),
    ("live_face_dominance", float("nan"), "IDV_LIVE_FACE_DOMINANCE"),
])
def test_a_policy_the_service_cannot_run_refuses_to_start(tmp_path, setting, value, named):
    with pytest.raises(PolicyConfigError, match=named):
        create_app(Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", **{setting: value}), models=object())
