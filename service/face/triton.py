"""The towers on a Triton Inference Server (`IDV_TOWER_BACKEND=triton`), through `tritonclient`'s
gRPC client, imported only here and only when that setting asks for it (`pip install
'idverify[triton]'`).

Models as deploy/triton/ builds them: `idverify_id` and `idverify_live`, input `image` FP32
(N, 150, 150, 3) RGB 0..255, output `embedding` FP32 (N, 128), `max_batch_size` 32; the same
contract as the in-process ONNX Runtime session, so a `TritonTower` is a `Tower` whose graph
runs elsewhere (flip-averaging, when the manifest asks for it, stays on this side). The
manifest, template and calibration still come from the local model repository: the tower
version there must be the one Triton serves (deploy/triton/build_repository.py prints it).
"""
from __future__ import annotations

import logging

import numpy as np

from service.face.artifacts import ArtifactError
from service.face.embed import Tower

log = logging.getLogger("idverify.triton")
MODELS = {"id": "idverify_id", "live": "idverify_live"}
INPUT, OUTPUT, MAX_BATCH = "image", "embedding", 32


def grpc_client(url: str):
    try:
        import tritonclient.grpc as grpcclient
    except (ImportError, RuntimeError) as exc:   # RuntimeError: tritonclient without its grpc extra
        raise ArtifactError("IDV_TOWER_BACKEND=triton needs tritonclient[grpc]: pip install 'idverify[triton]'") from exc
    return grpcclient.InferenceServerClient(url=url)


class _Remote:
    """What callers read of a tower's session (Pipeline.providers)."""

    def __init__(self, model: str, url: str):
        self.model, self.url = model, url

    def get_providers(self) -> list[str]:
        return [f"triton:{self.model}@{self.url}"]


class TritonTower(Tower):
    def __init__(self, client, model: str, url: str, flip_average: bool = False, timeout_s: float = 10.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client, self.model, self.timeout_s = client, model, timeout_s
        self.path = None
        self.flip_average = flip_average
        self.centre = None   # load_towers sets the artifact's centring
        self.session = _Remote(model, url)
        self.input_name, self.output_name = INPUT, OUTPUT

    def check(self, size: int) -> None:
        """The model is ready and takes (N, size, size, 3) FP32 `image` -> `embedding`."""
        from tritonclient.utils import InferenceServerException

        try:
            ready = self.client.is_model_ready(self.model)
            meta = self.client.get_model_metadata(self.model, as_json=True) if ready else None
        except InferenceServerException as exc:
            raise ArtifactError(f"Triton at {self.session.url}: {exc}") from exc
        if not ready:
            raise ArtifactError(f"Triton at {self.session.url} does not serve {self.model!r} (not ready)")
        inputs = {i["name"]: i for i in meta.get("inputs", [])}
        outputs = {o["name"] for o in meta.get("outputs", [])}
        shape = [int(d) for d in inputs.get(INPUT, {}).get("shape", [])]
        if INPUT not in inputs or OUTPUT not in outputs or shape[-3:] != [size, size, 3]:
            raise ArtifactError(f"Triton model {self.model!r} has inputs {list(inputs)} {shape}, outputs "
                                f"{sorted(outputs)}; expected {INPUT} [-1, {size}, {size}, 3] -> {OUTPUT}")

    def _run(self, x: np.ndarray) -> np.ndarray:
        parts = []
        for at in range(0, len(x), MAX_BATCH):
            chunk = np.ascontiguousarray(x[at:at + MAX_BATCH], dtype=np.float32)
            inp = self._grpc.InferInput(INPUT, list(chunk.shape), "FP32")
            inp.set_data_from_numpy(chunk)
            res = self.client.infer(self.model, [inp], outputs=[self._grpc.InferRequestedOutput(OUTPUT)],
                                    client_timeout=self.timeout_s)
            parts.append(res.as_numpy(OUTPUT))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def triton_factory(url: str):
    """A `make_tower(side, path, flip, size)` for service.face.artifacts.load_towers: one client,
    one TritonTower per side (checked against the server at load)."""
    client = grpc_client(url)

    def make(side: str, _path, flip: bool, size: int) -> TritonTower:
        tower = TritonTower(client, MODELS[side], url, flip_average=flip)
        tower.check(size)
        log.info("tower %s on Triton %s model %s", side, url, tower.model)
        return tower

    return make
