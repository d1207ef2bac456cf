"""service/face/triton.py (IDV_TOWER_BACKEND=triton): the tritonclient gRPC adapter, with
Triton's gRPC stub replaced by one that answers from the local ONNX Runtime towers (so
tritonclient's own request and response encoding runs), the loader's wiring, the lazy import,
and a real Triton server where one can run (skipped here with the reason)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from service.face.artifacts import ArtifactError
from service.settings import ROOT, Settings

try:
    import tritonclient.grpc as grpcclient
except (ImportError, RuntimeError) as exc:   # tritonclient without its grpc extra raises RuntimeError
    pytest.skip(f"tritonclient[grpc] is not installed (pip install '.[triton]'): {exc}", allow_module_level=True)
from tritonclient.grpc import service_pb2  # noqa: E402

from service.face import triton  # noqa: E402
from service.face.loader import load_pipeline  # noqa: E402


class FakeStub:
    """The three calls of GRPCInferenceServiceStub that TritonTower makes, answered by local
    ONNX Runtime sessions, one per Triton model name."""

    def __init__(self, sessions: dict, ready: bool = True):
        self.sessions, self.ready, self.infers = sessions, ready, []

    def ModelReady(self, request, metadata=None, timeout=None):  # noqa: N802 - gRPC names
        return service_pb2.ModelReadyResponse(ready=self.ready and request.name in self.sessions)

    def ModelMetadata(self, request, metadata=None, timeout=None):  # noqa: N802
        return service_pb2.ModelMetadataResponse(
            name=request.name, platform="onnxruntime_onnx",
            inputs=[service_pb2.ModelMetadataResponse.TensorMetadata(name="image", datatype="FP32", shape=[-1, 150, 150, 3])],
            outputs=[service_pb2.ModelMetadataResponse.TensorMetadata(name="embedding", datatype="FP32", shape=[-1, 128])])

    def ModelInfer(self, request, metadata=None, timeout=None, compression=None):  # noqa: N802
        [inp] = request.inputs
        assert inp.name == "image" and inp.datatype == "FP32" and [o.name for o in request.outputs] == ["embedding"]
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(inp.shape))
        assert len(x) <= triton.MAX_BATCH
        self.infers.append((request.model_name, len(x)))
        y = self.sessions[request.model_name].run(["embedding"], {"image": x})[0].astype(np.float32)
        out = service_pb2.ModelInferResponse.InferOutputTensor(name="embedding", datatype="FP32", shape=list(y.shape))
        return service_pb2.ModelInferResponse(model_name=request.model_name, outputs=[out],
                                              raw_output_contents=[y.tobytes()])


@pytest.fixture(scope="module")
def local():
    return load_pipeline(Settings(onnx_threads=1))


@pytest.fixture
def fake_triton(local, monkeypatch):
    stub = FakeStub({"idverify_id": local.towers.id.session, "idverify_live": local.towers.live.session})

    def client(url):
        c = grpcclient.InferenceServerClient(url=url)   # the channel connects lazily: never here
        c._client_stub = stub
        return c

    monkeypatch.setattr(triton, "grpc_client", client)
    return stub


def test_triton_towers_give_the_local_embeddings(local, fake_triton):
    remote = load_pipeline(Settings(onnx_threads=1, tower_backend="triton", triton_url="127.0.0.1:1"))
    assert remote.providers == ["triton:idverify_id@127.0.0.1:1"]
    assert remote.model_version == local.model_version and remote.template.tolist() == local.template.tolist()
    x = np.random.default_rng(0).integers(0, 256, (40, local.chip_size, local.chip_size, 3)).astype(np.uint8)
    for side in ("id", "live"):
        want = getattr(local.towers, side).embed(x)
        got = getattr(remote.towers, side).embed(x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    flip = 2 if local.towers.id.flip_average else 1
    # 40 chips (x2 with flip-averaging) go in requests of at most max_batch_size 32
    assert [n for _, n in fake_triton.infers if _ == "idverify_id"] == [32] * (40 * flip // 32) + (
        [40 * flip % 32] if 40 * flip % 32 else [])


def test_not_ready_model_refused_at_load(fake_triton):
    fake_triton.ready = False
    with pytest.raises(ArtifactError, match="does not serve 'idverify_id'"):
        load_pipeline(Settings(onnx_threads=1, tower_backend="triton", triton_url="127.0.0.1:1"))


def test_unknown_backend_refused():
    with pytest.raises(ValueError, match="tower_backend"):   # refused by the settings
        load_pipeline(Settings(onnx_threads=1, tower_backend="tensorrt"))


def test_tritonclient_imported_only_when_asked_for():
    code = ("import sys; from service.settings import Settings; from service.face.loader import load_pipeline; "
            "import service.app; load_pipeline(Settings(onnx_threads=1)); print(sorted(m for m in sys.modules "
            "if m.startswith(('tritonclient', 'service.face.triton'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_real_triton_server(tmp_path):
    """The served towers through a real tritonserver (deploy/triton's repository) against the
    local sessions. Needs a tritonserver with the onnxruntime backend and a GPU (the configs
    ask for KIND_GPU); elsewhere skipped with the reason (tests/test_deploy_k8s.py starts it)."""
    import test_deploy_k8s as k8s

    with k8s.triton_server(tmp_path) as (_builder, _plan, _http_port, grpc_port):
        url = f"127.0.0.1:{grpc_port}"
        assert grpcclient.InferenceServerClient(url=url).is_server_ready()
        local = load_pipeline(Settings(onnx_threads=1))
        remote = load_pipeline(Settings(onnx_threads=1, tower_backend="triton", triton_url=url))
        x = np.random.default_rng(1).integers(0, 256, (5, local.chip_size, local.chip_size, 3)).astype(np.uint8)
        for side in ("id", "live"):
            np.testing.assert_allclose(getattr(remote.towers, side).embed(x), getattr(local.towers, side).embed(x),
                                       rtol=1e-3, atol=1e-3)
