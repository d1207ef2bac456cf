"""SFace in torch (models/build/sface_torch.py) computes what the committed ONNX graph computes.

- parity on real LFW faces (landmarks from our MTCNN, crops from service.align with SFace's
  template, and their mirror images): the module against onnxruntime running
  models/repository/sface/2/sface.onnx, max |diff| <= 1e-5 of the embeddings' scale and
  cosine >= 0.99999, before any training;
- batch norm is folded: no BatchNorm, Dropout or buffers, so train() and eval() agree and a
  batch of chips changes nothing;
- the stage split, the per-stage parameter groups, the pretrained copy, preprocess;
- to_onnx writes the tower contract and the exported graph agrees with the original;
- a graph that is not SFace (the dlib tower) is refused.

Skips with a reason when torch/onnx/onnxruntime or the LFW images (settings.data_dir,
IDV_DATA_DIR) are absent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[train]')")
onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from models.build import sface_checks as ck  # noqa: E402
from models.build import sface_torch as st  # noqa: E402
from service.face.align import align  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
REL_TOL = 1e-5      # max |diff| relative to the embeddings' largest |value|
MIN_COSINE = 0.99999


def _session(path: Path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _assert_parity(got: np.ndarray, want: np.ndarray) -> None:
    scale = float(np.abs(want).max())
    assert scale > 1.0  # real embeddings, not near zero
    assert float(np.abs(got - want).max()) <= REL_TOL * scale
    assert float(_cosines(got, want).min()) >= MIN_COSINE


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(1)
    return st.from_onnx(st.DEFAULT_ONNX)


@pytest.fixture(scope="module")
def reference():
    return _session(st.DEFAULT_ONNX)


@pytest.fixture(scope="module")
def chips() -> np.ndarray:
    """Aligned 112x112 RGB uint8 crops of 8 LFW people, then the same crops mirrored."""
    from service.settings import get_settings

    data_dir = Path(get_settings().data_dir)
    if not (data_dir / "lfw" / "images").is_dir():
        pytest.skip(f"LFW images not found under {data_dir / 'lfw' / 'images'} (set IDV_DATA_DIR)")
    faces = ck.lfw_faces(data_dir, n=8)
    assert len(faces) == 8, "MTCNN found too few faces in LFW"
    crops = np.stack([align(img, lm, ck.SFACE_TEMPLATE, st.SIZE) for _, img, lm in faces])
    return np.concatenate([crops, crops[:, :, ::-1]])


def _embed(net, chips: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(st.preprocess(chips)).numpy()


def test_parity_with_the_onnx_graph_on_lfw(net, reference, chips):
    want = reference.run(["embedding"], {"image": chips.astype(np.float32)})[0]
    got = _embed(net, chips)
    _assert_parity(got, want)
    # different faces give different embeddings (the check is not satisfied by a constant)
    assert float(_cosines(want[:1], want[1:2])[0]) < 0.9
    # and the colour order matters: BGR crops are clearly off
    swapped = _embed(net, np.ascontiguousarray(chips[..., ::-1]))
    assert float(np.abs(swapped - want).max()) > 100 * REL_TOL * float(np.abs(want).max())


def test_batch_norm_is_folded_train_mode_changes_nothing(net, chips):
    assert not [m for m in net.modules() if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm,
                                                            torch.nn.Dropout))]
    assert list(net.buffers()) == []
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = st.preprocess(chips[:4])
    with torch.no_grad():
        ref = net(x)
        net.train()
        try:
            trained_mode = net(x)
            net(st.preprocess(chips[4:]))          # another chip-only batch
        finally:
            net.eval()
        again = net(x)
    assert torch.equal(trained_mode, ref) and torch.equal(again, ref)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_stages_split_and_cover_every_parameter(net, chips):
    assert list(net.stages()) == list(st.STAGES)
    groups = net.stage_parameters()
    ids = [id(p) for _, ps in groups for p in ps]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert all(ps for _, ps in groups)
    x = st.preprocess(chips[:2])
    with torch.no_grad():
        full = net(x)
        for stage in st.STAGES[:-1]:
            assert torch.equal(net.forward_from(stage, net.forward_features(x, stage)), full), stage
    assert net.forward_features(x, "block1").shape == (2, 128, 56, 56)
    assert net.forward_features(x, "block4").shape == (2, 1024, 7, 7)
    assert torch.equal(net.forward_features(x, 1), net.forward_features(x, "block1"))
    for bad in ("level0", 6, -1):
        with pytest.raises(ValueError, match="unknown stage"):
            net.forward_features(x, bad)


def test_param_groups_and_freeze(net):
    mult = {"stem": 0.1, "block1": 0.2, "head": 1.0}
    groups = net.param_groups(1e-3, mult)
    assert [g["name"] for g in groups] == list(st.STAGES)
    assert {g["name"]: g["lr"] for g in groups}["stem"] == pytest.approx(1e-4)
    assert {g["name"]: g["lr"] for g in groups}["block3"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown stages"):
        net.param_groups(1e-3, {"level0": 1.0})
    try:
        net.freeze_upto("block1")
        assert [g["name"] for g in net.param_groups(1e-3)] == ["block2", "block3", "block4", "head"]
    finally:
        for p in net.parameters():
            p.requires_grad_(True)


def test_every_stage_gets_a_gradient(net, chips):
    x = st.preprocess(chips[:2])
    net.zero_grad()
    net(x).pow(2).sum().backward()
    for name, params in net.stage_parameters():
        assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in params), name
    net.zero_grad()


def test_pretrained_state_is_a_copy(net):
    ref = net.pretrained_state()
    assert set(ref) == set(net.state_dict())
    trained = st.copy.deepcopy(net)
    with torch.no_grad():
        trained.body["stem"].conv_1.conv.weight.add_(1.0)
    assert torch.equal(trained.pretrained_state()["body.stem.conv_1.conv.weight"],
                       ref["body.stem.conv_1.conv.weight"])
    assert not torch.equal(trained.state_dict()["body.stem.conv_1.conv.weight"],
                           ref["body.stem.conv_1.conv.weight"])
    with pytest.raises(RuntimeError, match="not made by from_onnx"):
        st.SFaceNet().pretrained_state()


def test_preprocess_forms_agree(chips):
    u8 = st.preprocess(chips[:2])
    assert u8.shape == (2, 3, 112, 112) and u8.dtype == torch.float32
    assert float(u8.min()) >= -1.0 and float(u8.max()) < 1.0
    assert torch.equal(st.preprocess(torch.from_numpy(chips[:2].astype(np.float32))), u8)
    assert torch.equal(st.preprocess(chips[0]), u8[:1])
    with pytest.raises(ValueError, match="NHWC"):
        st.preprocess(np.zeros((2, 3, 112, 112), np.uint8))


def test_to_onnx_round_trip(net, reference, chips, tmp_path):
    path = st.to_onnx(net, tmp_path / "sface_torch.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("image", "embedding")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [112, 112, 3]
    assert [d.dim_value for d in out.type.tensor_type.shape.dim][1:] == [128]
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    sess = _session(path)
    x = chips.astype(np.float32)
    got = sess.run(["embedding"], {"image": x})[0]
    _assert_parity(got, reference.run(["embedding"], {"image": x})[0])
    one = sess.run(["embedding"], {"image": x[3:4]})[0]
    np.testing.assert_allclose(one[0], got[3], atol=REL_TOL * float(np.abs(got).max()), rtol=0)


def test_a_graph_that_is_not_sface_is_refused(baseline_folder):
    dlib = baseline_folder / "backbone.onnx"   # the dlib network
    with pytest.raises(st.SFaceGraphError):
        st.from_onnx(dlib)
