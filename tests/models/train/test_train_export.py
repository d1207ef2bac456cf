"""Export contract of the trained towers: ONNX I/O as the baseline, dynamic batch, manifest
schema, SHA-256s and calibration table of any shipped version."""
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
REPO = ROOT / "models" / "repository" / "towers"


def test_tower_onnx_contract(tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from models.build.dlib_resnet import DlibResNet
    from models.train.export import tower_module, write_onnx
    from models.train.towers import DualTowers

    torch.manual_seed(0)
    model = DualTowers(DlibResNet().eval(), heads=True)
    with torch.no_grad():  # make the towers differ, as after training
        model.id.net.fc.weight.mul_(1.5)
    mask = np.ones(128, np.float32)
    mask[:3] = 0
    for side, m in (("id", None), ("live", mask)):
        path = tmp_path / f"{side}.onnx"
        write_onnx(tower_module(model, side, m), path)   # checks onnxruntime == torch within 1e-4
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
        assert inp.name == "image" and out.name == "embedding"
        assert inp.type == "tensor(float)" and list(inp.shape[1:]) == [150, 150, 3]
        assert not isinstance(inp.shape[0], int)  # dynamic batch
        for n in (1, 4):
            x = np.random.default_rng(n).integers(0, 256, (n, 150, 150, 3)).astype(np.float32)
            y = sess.run(["embedding"], {"image": x})[0]
            assert y.shape == (n, 128) and y.dtype == np.float32
            if m is not None:
                assert np.all(y[:, :3] == 0)
    # heads are never exported: the graph has one output, the embedding
    import onnx
    g = onnx.load(str(tmp_path / "id.onnx")).graph
    assert [o.name for o in g.output] == ["embedding"]


def shipped_versions():
    if not REPO.exists():
        return []
    return [p for p in REPO.iterdir() if p.is_dir() and p.name != "baseline" and (p / "manifest.json").exists()]


@pytest.mark.parametrize("folder", shipped_versions(), ids=lambda p: p.name)
def test_shipped_manifest_schema(folder):
    from service.face.artifacts import sha256_file
    base = json.loads((REPO / "baseline" / "manifest.json").read_text())
    man = json.loads((folder / "manifest.json").read_text())
    assert set(base) - {"calibration"} <= set(man)
    assert man["name"] == "towers" and man["version"] == folder.name
    assert man["input"] == base["input"] and man["output"]["name"] == "embedding"
    assert man["template"]["points"] == base["template"]["points"]
    assert set(man["towers"]) == {"id", "live"}
    for entry in man["towers"].values():
        assert sha256_file(folder / entry["file"]) == entry["sha256"]
    assert man["calibration"] == "calibration.json"
    assert sha256_file(folder / "calibration.json") == man["calibration_sha256"]
    table = json.loads((folder / "calibration.json").read_text())["table"]
    assert table and all({"score", "far"} <= set(r) for r in table)
    scores = [r["score"] for r in table]
    fars = [r["far"] for r in table]
    assert scores == sorted(scores) and fars == sorted(fars, reverse=True)
    size = sum(p.stat().st_size for p in (ROOT / "models").rglob("*") if p.is_file())
    assert size < 100e6
    for key in ("gender", "age", "race"):  # demographic heads are not part of the shipped graphs
        for entry in man["towers"].values():
            import onnx
            g = onnx.load(str(folder / entry["file"])).graph
            assert [o.name for o in g.output] == ["embedding"], key


@pytest.mark.parametrize("folder", shipped_versions(), ids=lambda p: p.name)
def test_shipped_version_loads_in_the_service(folder):
    from service.face.artifacts import load_towers
    towers = load_towers(REPO.parent, "towers", folder.name, ["CPUExecutionProvider"], 1)
    chips = np.zeros((2, 150, 150, 3), np.uint8)
    assert towers.id.embed(chips).shape == (2, 128)
    assert towers.calibration
