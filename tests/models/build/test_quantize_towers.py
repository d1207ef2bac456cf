"""The int8 towers (models.build.quantize_towers): calibrated only on people outside folds 8-10,
and close to the fp32 towers they were made from, on real LFW faces through the service's pipeline."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from models.build import quantize_towers
from models.eval.pairs import fold_identities, read_pairs
from service.face.loader import load_pipeline
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
TOWERS = ROOT / "models" / "repository" / "towers"
INT8 = [p.name for p in sorted(TOWERS.iterdir()) if (p / "manifest.json").exists()
        and "quantization" in json.loads((p / "manifest.json").read_text())]


def data_dir() -> Path:
    env = os.environ.get("IDV_DATA_DIR")
    root = Path(env) if env else ROOT.parent / "shared" / "data"
    if not (root / "lfw" / "pairs.txt").exists():
        pytest.skip(f"LFW not found under {root} (set IDV_DATA_DIR to the shared data folder)")
    return root


def test_an_int8_version_ships():
    assert INT8, "no towers version with a quantization record under models/repository/towers"


def test_calibration_people_are_outside_folds_8_to_10():
    root = data_dir()
    people = quantize_towers.calibration_people(root, 300)
    assert len(people) == len(set(people)) == 300
    reserved = fold_identities(read_pairs(root / "lfw" / "pairs.txt"), (8, 9, 10))
    assert reserved and not reserved & set(people)
    assert quantize_towers.calibration_people(root, 300) == people   # seeded


@pytest.mark.parametrize("version", INT8)
def test_manifest_names_its_source_and_calibration(version):
    m = json.loads((TOWERS / version / "manifest.json").read_text())
    q = m["quantization"]
    src = json.loads((TOWERS / q["source_version"] / "manifest.json").read_text())
    for side, spec in m["towers"].items():
        assert spec["source_sha256"] == src["towers"][side]["sha256"]
        assert spec["sha256"] != spec["source_sha256"]
    assert q["format"] == "QDQ" and "reduce_range" in q["weights"]
    assert "8,9,10" in q["calibration"]["identities"]
    assert m["calibration_sha256"] and m["metrics"], "calibrate --measure did not run on this version"
    assert m["test_time"] == src["test_time"] and m["input"] == src["input"]


@pytest.mark.parametrize("version", INT8)
def test_int8_embeddings_follow_the_fp32_towers(version):
    """Same aligned chips, both towers, flip-averaged as served: cosine to the fp32 embedding
    (measured mean 0.9987 on 400 held-out people; full-range int8 weights gave 0.988)."""
    root = data_dir()
    source = json.loads((TOWERS / version / "manifest.json").read_text())["quantization"]["source_version"]
    people = quantize_towers.calibration_people(root, 300)[-24:]   # past the 256 that calibrated it
    fp32 = load_pipeline(Settings(tower_version=source, data_dir=root))
    int8 = load_pipeline(Settings(tower_version=version, data_dir=root))
    chips = quantize_towers.calibration_chips(fp32, root, people)
    for side, field in (("id", "id_photo"), ("live", "live_photo")):
        assert len(chips[side]) >= 20
        a = fp32.tower(field).embed(chips[side])
        b = int8.tower(field).embed(chips[side])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.mean() > 0.997 and cos.min() > 0.99, (side, cos.mean(), cos.min())
    # a cross-domain score moves by far less than the gap between FAR 1e-2 and 1e-3 thresholds
    ea, el = (fp32.tower(f).embed(chips[s]) for s, f in (("id", "id_photo"), ("live", "live_photo")))
    qa, ql = (int8.tower(f).embed(chips[s]) for s, f in (("id", "id_photo"), ("live", "live_photo")))
    n = min(len(ea), len(el))
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)  # noqa: E731
    d = np.abs(unit(ea[:n]) @ unit(el[:n]).T - unit(qa[:n]) @ unit(ql[:n]).T) / 2   # cosine01 scale
    assert d.mean() < 0.005, d.mean()
