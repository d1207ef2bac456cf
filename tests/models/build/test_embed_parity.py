"""The exported tower reproduces dlib's own face descriptor.

Chips are made by dlib itself (frontal face detector, 5-point shape predictor,
``get_face_chip(img, shape, 150, 0.25)``), then dlib's ``compute_face_descriptor(chip)`` is
compared with onnxruntime on ``models/repository/towers/baseline/backbone.onnx`` for the
same chip. Real images, real models: insightface's bundled pictures (always available) and
LFW from the shared data folder (skipped when absent).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

dlib = pytest.importorskip("dlib")
frm = pytest.importorskip("face_recognition_models")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[3]
TOWERS = ROOT / "models" / "repository" / "towers"
BASELINE = TOWERS / "baseline"
DLIB_MODELS = Path(frm.__file__).resolve().parent / "models"
ATOL = 1e-4


def data_dir() -> Path:
    env = os.environ.get("IDV_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def bundled_images() -> list[Path]:
    import insightface  # bundled sample pictures; insightface is a service dependency

    folder = Path(insightface.__file__).resolve().parent / "data" / "images"
    return [folder / "t1.jpg", folder / "Tom_Hanks_54745.png"]


def lfw_images(n: int = 10) -> list[Path]:
    root = data_dir() / "lfw" / "images"
    if not root.is_dir():
        pytest.skip(f"LFW not found at {root} (set IDV_DATA_DIR to the shared data folder)")
    people = sorted(p for p in root.iterdir() if p.is_dir())
    step = max(1, len(people) // n)
    files = [sorted(p.glob("*.jpg"))[0] for p in people[::step][:n]]
    if len(files) < n:
        pytest.skip(f"only {len(files)} LFW images under {root}")
    return files


def load_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"cannot read {path}"
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


class Dlib:
    def __init__(self):
        self.detector = dlib.get_frontal_face_detector()
        self.sp5 = dlib.shape_predictor(str(DLIB_MODELS / "shape_predictor_5_face_landmarks.dat"))
        self.rec = dlib.face_recognition_model_v1(str(DLIB_MODELS / "dlib_face_recognition_resnet_model_v1.dat"))

    def chips(self, img: np.ndarray, upsample: int = 0) -> list[np.ndarray]:
        faces = self.detector(img, upsample) or self.detector(img, upsample + 1)
        return [dlib.get_face_chip(img, self.sp5(img, f), 150, 0.25) for f in faces]

    def descriptor(self, chip: np.ndarray) -> np.ndarray:
        return np.asarray(self.rec.compute_face_descriptor(chip), dtype=np.float32)


@pytest.fixture(scope="module")
def dl() -> Dlib:
    return Dlib()


@pytest.fixture(scope="module")
def session(baseline_folder):
    path = baseline_folder / "backbone.onnx"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_embed(session, chips: list[np.ndarray]) -> np.ndarray:
    x = np.stack(chips).astype(np.float32)
    return session.run(["embedding"], {"image": x})[0]


def check_parity(dl: Dlib, session, chips: list[np.ndarray]) -> float:
    want = np.stack([dl.descriptor(c) for c in chips])
    got = onnx_embed(session, chips)
    assert got.shape == (len(chips), 128) and got.dtype == np.float32
    diff = float(np.abs(got - want).max())
    assert diff <= ATOL, f"max |onnx - dlib| = {diff:.3g} > {ATOL}"
    return diff


def test_parity_bundled_faces(dl, session):
    """No shared data needed: 6 faces in t1.jpg + Tom_Hanks_54745.png."""
    chips = [c for p in bundled_images() for c in dl.chips(load_rgb(p))]
    assert len(chips) >= 7, f"expected >= 7 faces in the bundled images, got {len(chips)}"
    check_parity(dl, session, chips)


def test_parity_lfw(dl, session):
    chips = []
    for path in lfw_images(10):
        found = dl.chips(load_rgb(path), upsample=1)
        if found:
            chips.append(found[0])
    assert len(chips) >= 8, f"dlib found faces in only {len(chips)} of 10 LFW images"
    check_parity(dl, session, chips)


def test_batch_equals_single(dl, session):
    chips = dl.chips(load_rgb(bundled_images()[0]))[:4]
    batch = onnx_embed(session, chips)
    single = np.concatenate([onnx_embed(session, [c]) for c in chips])
    assert np.abs(batch - single).max() <= 1e-5


def test_torch_module_matches_onnx_and_splits(dl, session):
    """The PyTorch port (what training starts from) equals the export, stage splits included."""
    torch = pytest.importorskip("torch")
    from models.build.dlib_resnet import STAGES, DlibResNet

    model = DlibResNet.from_dat(DLIB_MODELS / "dlib_face_recognition_resnet_model_v1.dat")
    chips = dl.chips(load_rgb(bundled_images()[0]))[:3]
    x = torch.from_numpy(np.stack(chips).astype(np.float32))
    with torch.no_grad():
        full = model(x)
        assert float((full - torch.from_numpy(onnx_embed(session, chips))).abs().max()) <= ATOL
        for stage in STAGES:
            split = model.forward_from(stage, model.forward_features(x, upto=stage))
            assert torch.equal(split, full), stage


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_matches_files(baseline_folder):
    """The shipped manifest names the graph the wheel regenerates, byte for byte."""
    assert (TOWERS / (TOWERS / "CURRENT").read_text().strip() / "manifest.json").exists()
    manifest = json.loads((BASELINE / "manifest.json").read_text())
    assert manifest["name"] == "towers" and manifest["version"] == "baseline"
    assert set(manifest["towers"]) == {"id", "live"}
    for side, entry in manifest["towers"].items():
        path = baseline_folder / entry["file"]
        assert path.exists(), f"{side}: {path} missing"
        assert sha256(path) == entry["sha256"], f"{side}: SHA-256 of {path} differs from the manifest"
    assert manifest["input"]["name"] == "image" and manifest["input"]["layout"] == "NHWC"
    assert manifest["input"]["size"] == [150, 150] and manifest["input"]["range"] == [0, 255]
    assert manifest["output"] == {**manifest["output"], "name": "embedding", "dim": 128}
    assert manifest["score"]["kind"] == "cosine01"
    tpl = np.asarray(manifest["template"]["points"])
    assert tpl.shape == (5, 2) and manifest["template"]["size"] == 150
    # the calibration table ships beside the manifest, hash-checked like the towers
    cal = BASELINE / manifest["calibration"]
    assert sha256(cal) == manifest["calibration_sha256"]
    table = json.loads(cal.read_text())["table"]
    assert [r["far"] for r in table] == sorted((r["far"] for r in table), reverse=True)
    assert {"lfw_10fold", "lfw_ivs_folds9-10"} <= set(manifest["metrics"])


def test_onnx_graph_contract(session):
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.name == "image" and inp.type == "tensor(float)"
    assert inp.shape[1:] == [150, 150, 3] and not isinstance(inp.shape[0], int)  # dynamic batch
    assert out.name == "embedding" and out.shape[1:] == [128]
