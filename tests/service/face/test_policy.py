"""service/face/policy.py without the models: IDV_REFUSE_QUALITY's entries, the dominance
measure, and the rules on hand-made faces (the API tests run them on real photos)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from service.face.detect import Face
from service.face.pipeline import Side
from service.face.policy import Policy, PolicyConfigError, PolicyRefusal, dominance, parse_refusals


def _face(x: float, width: float) -> Face:
    return Face(box=(x, 10.0, x + width, 10.0 + width * 1.2), landmarks=np.zeros((5, 2), np.float32), score=0.99)


def test_refusal_entries():
    assert parse_refusals("") == parse_refusals(" none ") == frozenset()
    assert parse_refusals("blurry") == {("id_photo", "blurry"), ("live_photo", "blurry")}
    assert parse_refusals(" live_photo:off_frontal , id_photo:small_face") == {
        ("live_photo", "off_frontal"), ("id_photo", "small_face")}
    for bad in ("sharpness", "live:blurry", "multiple_faces", "blurry;small_face"):
        with pytest.raises(PolicyConfigError, match="IDV_REFUSE_QUALITY"):
            parse_refusals(bad)


def test_dominance_is_the_area_ratio_to_the_next_largest_face():
    big, near, far = _face(0, 100), _face(150, 80), _face(300, 40)
    assert dominance([big], big) == math.inf
    assert dominance([big, near, far], big) == pytest.approx(100**2 / 80**2)
    assert dominance([big, near, far], near) == pytest.approx(80**2 / 100**2)


def test_rules_on_hand_made_faces():
    policy = Policy(live_face_dominance=2.0, refuse=frozenset({("live_photo", "blurry")}))
    big, near = _face(0, 100), _face(150, 60)      # 2.78x the area
    live = Side(field="live_photo", sha256="0" * 64, faces=[big, near], face=big, faces_seen=2,
                quality={"blurry": False})
    policy.check_photo(live)
    with pytest.raises(PolicyRefusal) as refused:
        Policy(live_face_dominance=3.0).check_photo(live)
    assert (refused.value.code, refused.value.field, refused.value.rule) == (
        "multiple_faces", "live_photo", "multiple_faces:live_photo")
    chip = Side(field="id_photo", sha256="0" * 64, faces=[big, near], face=big, faces_seen=2, quality={"blurry": True})
    with pytest.raises(PolicyRefusal, match="exactly one"):
        policy.check_photo(chip)
    chip.faces, chip.faces_seen = [big], 1
    policy.check_photo(chip)                        # blurry, but only the live photo's blur refuses
    live.quality["blurry"] = True
    with pytest.raises(PolicyRefusal) as refused:
        policy.check_photo(live)
    assert refused.value.code == "quality_blurry" and refused.value.to_dict()["error"]["rule"] == "quality:blurry:live_photo"
