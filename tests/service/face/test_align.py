"""Alignment: the 5-point template derived from dlib's mean face, the similarity fit, the warp,
and that our chips embed like dlib's own chips."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.face.align import (DLIB_CHIP_TEMPLATE, DLIB_CHIP_TEMPLATE_DERIVED, DLIB_CHIP_TEMPLATE_FITTED,
                           DLIB_MEAN_FACE_X, DLIB_MEAN_FACE_Y, align, dlib_chip_template,
                           estimate_similarity, five_points_from_68)

ROOT = Path(__file__).resolve().parents[3]


def similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([r, [[tx], [ty]]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.asarray(pts, dtype=np.float64) @ m[:, :2].T + m[:, 2]


# -- template ---------------------------------------------------------------------------


def test_mean_face_tables():
    assert DLIB_MEAN_FACE_X.shape == DLIB_MEAN_FACE_Y.shape == (51,)  # landmarks 17..67
    assert 0 <= DLIB_MEAN_FACE_X.min() and DLIB_MEAN_FACE_X.max() <= 1
    assert 0 <= DLIB_MEAN_FACE_Y.min() and DLIB_MEAN_FACE_Y.max() <= 1


def test_template_derivation_by_hand():
    x, y = DLIB_MEAN_FACE_X, DLIB_MEAN_FACE_Y
    unit = np.array([
        [x[19:25].mean(), y[19:25].mean()],   # landmarks 36..41
        [x[25:31].mean(), y[25:31].mean()],   # 42..47
        [x[13], y[13]],                       # 30
        [x[31], y[31]],                       # 48
        [x[37], y[37]],                       # 54
    ])
    want = (0.25 + unit) / 1.5 * 150
    np.testing.assert_allclose(dlib_chip_template(150, 0.25), want, atol=1e-4)
    np.testing.assert_allclose(DLIB_CHIP_TEMPLATE_DERIVED, want, atol=1e-4)
    # no padding and unit size give the mean-shape points themselves
    np.testing.assert_allclose(dlib_chip_template(1, 0.0), unit, atol=1e-6)


def test_template_geometry():
    for t in (DLIB_CHIP_TEMPLATE_DERIVED, DLIB_CHIP_TEMPLATE_FITTED):
        le, re, nose, lm, rm = t
        assert le[0] < nose[0] < re[0] and lm[0] < nose[0] < rm[0]      # image-left first
        assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])          # eyes, nose, mouth
        assert abs(le[1] - re[1]) < 1 and abs(lm[1] - rm[1]) < 1        # upright
        assert 0 < t.min() and t.max() < 150
    # the fitted template is a small correction of the derived one
    assert np.abs(DLIB_CHIP_TEMPLATE_FITTED - DLIB_CHIP_TEMPLATE_DERIVED).max() < 3.0
    assert DLIB_CHIP_TEMPLATE.shape == (5, 2)


def test_five_points_from_68():
    shape = np.zeros((68, 2))
    shape[36:42] = [[10, 20]] * 6
    shape[42:48] = [[30, 20]] * 6
    shape[30], shape[48], shape[54] = [20, 30], [12, 40], [28, 40]
    np.testing.assert_allclose(five_points_from_68(shape),
                               [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])


# -- similarity fit and warp ------------------------------------------------------------


def test_estimate_similarity_recovers_exact_transform():
    m = similarity(-17.0, 2.7, 321.5, -40.25)
    src = apply(np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2], DLIB_CHIP_TEMPLATE)
    np.testing.assert_allclose(estimate_similarity(src, DLIB_CHIP_TEMPLATE), m, atol=1e-9)


def test_estimate_similarity_matches_skimage():
    skimage_transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(1)
    src = DLIB_CHIP_TEMPLATE * 1.9 + rng.normal(0, 3, (5, 2)) + [200, 80]
    cls = skimage_transform.SimilarityTransform
    if hasattr(cls, "from_estimate"):  # scikit-image >= 0.26
        ref = cls.from_estimate(src, DLIB_CHIP_TEMPLATE)
    else:
        ref = cls()
        assert ref.estimate(src, DLIB_CHIP_TEMPLATE)
    np.testing.assert_allclose(estimate_similarity(src, DLIB_CHIP_TEMPLATE), ref.params[:2], atol=1e-8)


def test_aligned_landmarks_land_on_template():
    """Draw a blob at each landmark of a rotated, scaled face; after align() each blob's
    centroid is on its template point (pixel-centre conventions agree)."""
    m_img = similarity(23.0, 2.2, 140.0, 35.0)  # chip -> image
    landmarks = apply(m_img, DLIB_CHIP_TEMPLATE)
    img = np.zeros((480, 520, 3), np.uint8)
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    for i, (x, y) in enumerate(landmarks):
        blob = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 4.0 ** 2))
        img[..., i % 3] = np.maximum(img[..., i % 3], (blob * 250).astype(np.uint8))
    chip = align(img, landmarks, DLIB_CHIP_TEMPLATE, 150)
    assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8
    v, u = np.mgrid[0:150, 0:150]
    for i, (tx, ty) in enumerate(DLIB_CHIP_TEMPLATE):
        w = chip[..., i % 3].astype(np.float64) * (np.hypot(u - tx, v - ty) < 8)
        cx, cy = (w * u).sum() / w.sum(), (w * v).sum() / w.sum()
        assert np.hypot(cx - tx, cy - ty) < 0.25, (i, cx, cy, tx, ty)


def test_align_noisy_landmarks_least_squares():
    rng = np.random.default_rng(7)
    landmarks = apply(similarity(5.0, 1.3, 60.0, 20.0), DLIB_CHIP_TEMPLATE) + rng.normal(0, 1.5, (5, 2))
    m = estimate_similarity(landmarks, DLIB_CHIP_TEMPLATE)
    resid = apply(m, landmarks) - DLIB_CHIP_TEMPLATE
    assert np.sqrt((resid ** 2).sum(1).mean()) < 2.5
    np.testing.assert_allclose(resid.sum(0), 0, atol=1e-8)  # least squares: centroids agree


# -- against dlib's own chips ----------------------------------------------------------


class _Dlib:
    def __init__(self):
        import dlib
        import face_recognition_models

        base = Path(face_recognition_models.__file__).resolve().parent / "models"
        self.dlib = dlib
        self.det = dlib.get_frontal_face_detector()
        self.sp5 = dlib.shape_predictor(str(base / "shape_predictor_5_face_landmarks.dat"))
        self.sp68 = dlib.shape_predictor(str(base / "shape_predictor_68_face_landmarks.dat"))
        self.rec = dlib.face_recognition_model_v1(str(base / "dlib_face_recognition_resnet_model_v1.dat"))

    def desc(self, chip: np.ndarray) -> np.ndarray:
        return np.asarray(self.rec.compute_face_descriptor(np.ascontiguousarray(chip)), dtype=np.float64)

    def cosines(self, img: np.ndarray, upsample: int) -> list[float]:
        """Per face: cos(dlib's own 5-point chip, our chip from 68-derived points)."""
        out = []
        for rect in self.det(img, upsample):
            ref = self.desc(self.dlib.get_face_chip(img, self.sp5(img, rect), 150, 0.25))
            shape = self.sp68(img, rect)
            pts = five_points_from_68(np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64))
            ours = self.desc(align(img, pts, DLIB_CHIP_TEMPLATE, 150))
            out.append(float(ref @ ours / np.linalg.norm(ref) / np.linalg.norm(ours)))
        return out


@pytest.fixture(scope="module")
def dl():
    pytest.importorskip("dlib")
    pytest.importorskip("face_recognition_models")
    return _Dlib()


def _rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))


def test_our_chips_embed_like_dlib_chips_bundled(dl):
    import insightface

    img = _rgb(Path(insightface.__file__).resolve().parent / "data" / "images" / "t1.jpg")
    cos = dl.cosines(img, upsample=0)
    assert len(cos) == 6
    assert min(cos) > 0.95 and np.mean(cos) > 0.97, cos


def test_our_chips_embed_like_dlib_chips_lfw(dl):
    env = os.environ.get("IDV_DATA_DIR")
    root = (Path(env) if env else ROOT.parent / "shared" / "data") / "lfw" / "images"
    if not root.is_dir():
        pytest.skip(f"LFW not found at {root} (set IDV_DATA_DIR to the shared data folder)")
    people = sorted(p for p in root.iterdir() if p.is_dir())
    cos = []
    for person in people[5::len(people) // 12][:12]:
        c = dl.cosines(_rgb(sorted(person.glob("*.jpg"))[0]), upsample=1)
        cos.extend(c[:1])
    assert len(cos) >= 8
    assert np.mean(cos) > 0.98, cos
