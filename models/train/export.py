"""Export a trained run as a towers version: two ONNX files with the baseline I/O contract,
the unit-attribute map, a calibration table and a manifest in the baseline schema.

    models/repository/towers/<version>/
        id.onnx, live.onnx        input `image` float32 NHWC (N,150,150,3) RGB 0..255,
                                  output `embedding` float32 (N,128); dynamic batch
        calibration.json          {"table": [{"score", "far", ...}]}: LFW-IvS impostors of
                                  fold-8 identities (inside folds 1-8, never trained on)
        unit_map.json, unit_map.png   the probe (no demographic head weights are shipped)
        manifest.json             baseline schema + "calibration", "calibration_sha256", metrics

CURRENT is switched only by `maybe_switch_current` and only when the version beats the baseline
on LFW-IvS folds 9-10 at FAR 1e-3 with LFW accuracy >= 99.3 %.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.build.calibrate import write_calibration
from models.build.export_towers import OPSET, check_onnx, export_onnx, sha256_file
from models.eval.metrics import far_key
from models.eval.report import summarise
from models.train.paths import REPO, ROOT
from models.train.runs import load_run

LFW_ACC_MIN = 0.993
TRAINING_KEYS = ("variant", "cut", "lam", "mu", "distill", "epochs", "lr", "head_lr", "hard_k", "batch", "cross_frac",
                 "p_occ", "alpha", "gamma", "train_splits", "seed", "threads", "best_epoch", "command", "train_seconds")
CAL_FOLDS = [8]


class Masked(nn.Module):
    """A tower with a fixed per-unit output mask (the scoring-time use of the unit map)."""

    def __init__(self, net: nn.Module, mask: np.ndarray):
        super().__init__()
        self.net = net
        self.register_buffer("mask", torch.from_numpy(np.asarray(mask, np.float32)).view(1, -1))

    def forward(self, x):
        return self.net(x) * self.mask


def tower_module(model, side: str, mask: np.ndarray | None = None) -> nn.Module:
    net = copy.deepcopy(getattr(model, side).net).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return Masked(net, mask).eval() if mask is not None else net


def write_onnx(module: nn.Module, path: Path, size: int = 150, dim: int = 128) -> float:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        t = Path(tmp) / path.name
        export_onnx(module, t, size=size)
        diff = check_onnx(module, t, size=size, dim=dim)
        os.replace(t, path)
    return diff


def build_manifest(version: str, files: dict[str, str], run_cfg: dict, metrics: dict, extra: dict,
                   description: str | None = None, keys=TRAINING_KEYS, folder: Path | None = None) -> dict:
    base = json.loads((REPO / "baseline" / "manifest.json").read_text())
    man = copy.deepcopy(base)
    man["version"] = version
    trained = "level2, level1, level0" if run_cfg.get("cut") == "level3" else "level1, level0"
    man["description"] = description or (
        "dual heterogeneous towers fine-tuned from the dlib face ResNet: `id` for ID-chip "
        f"photos, `live` for camera frames (stages {trained} and the embedding layer "
        f"trained; variant {run_cfg.get('variant')}, lam {run_cfg.get('lam')}; see docs/training.md)")
    folder = folder or REPO / version
    man["towers"] = {side: {"file": f, "sha256": sha256_file(folder / f)} for side, f in files.items()}
    man["source"] = dict(base.get("source", {}))
    man["source"]["converter"] = "models/train (idverify train) + models/build/export_towers.export_onnx"
    man["source"]["exported_with"] = {"torch": torch.__version__, "opset": OPSET}
    man["training"] = {k: run_cfg.get(k) for k in keys}
    import re
    cmd = run_cfg.get("command") or ""
    man["training"]["reproduce"] = " ".join(re.sub(r"--run \S+|--eval-only|--eval\b|--export \S+", "", cmd).split()) + \
        f" --export {version}"
    man["metrics"] = metrics
    man.update(extra)
    return man


def pipeline_for(version: str, threshold: float | None = 0.5):
    """The service pipeline on `version` (evaluation needs no threshold; `threshold` only goes
    into the reported command line)."""
    from service.face.loader import load_pipeline
    from service.settings import Settings
    return load_pipeline(Settings(tower_version=version, threshold=threshold, providers="cpu", onnx_threads=2))


def run_eval(version: str, protocol: str, folds: list[int], data_dir: Path, out: Path, threshold=0.5,
             embedder=None, pipeline=None) -> dict:
    """`idverify eval` in-process (same code path) on the given towers version."""
    from models.eval.protocols import evaluate
    p = pipeline if pipeline is not None else pipeline_for(version, threshold)
    env = f"IDV_TOWER_VERSION={version}" + (f" IDV_THRESHOLD={threshold}" if threshold is not None else "")
    out_arg = os.path.relpath(out, ROOT) if Path(out).resolve().is_relative_to(ROOT) else out  # no machine paths in manifests
    cmd = f"{env} idverify eval --protocol {protocol} --folds {','.join(map(str, folds))} --out {out_arg}"
    return evaluate(protocol, folds, p, data_dir, out=out, progress=False, command=cmd, embedder=embedder)


def export_run(run: Path, version: str, data_dir: Path, cache: Path, full_eval: bool = True) -> dict:
    run = Path(run)
    model, cfg = load_run(run)
    out = REPO / version
    out.mkdir(parents=True, exist_ok=True)
    probe_path = run / "unit_map.json"
    mask = None
    probe = json.loads(probe_path.read_text()) if probe_path.exists() else None
    if probe and probe.get("scoring", {}).get("use_mask"):
        mask = np.asarray(probe["scoring"]["mask"], np.float32)
    files = {}
    sides = ("id",) if cfg.get("shared") else ("id", "live")
    for side in sides:
        f = "tower.onnx" if cfg.get("shared") else f"{side}.onnx"
        diff = write_onnx(tower_module(model, side, mask), out / f)
        print(f"[export] {out / f}: {(out / f).stat().st_size / 1e6:.1f} MB, onnxruntime vs torch {diff:.1e}",
              file=sys.stderr)
        files[side] = f
    if cfg.get("shared"):
        files["live"] = files["id"]
    extra = {}
    if probe:
        for name in ("unit_map.json", "unit_map.png"):
            src = run / name
            if src.exists():
                (out / name).write_bytes(src.read_bytes())
        extra["unit_map"] = {"file": "unit_map.json", "sha256": sha256_file(out / "unit_map.json"),
                             "scoring_mask": bool(mask is not None)}
    extra["calibration"] = None
    man = build_manifest(version, files, cfg, {}, extra)
    (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    if not full_eval:
        return man
    reports = ROOT / "reports" / "towers" / version
    # calibration: LFW-IvS extended impostors of fold-8 identities (within folds 1-8; never trained on)
    cal = run_eval(version, "lfw-ivs", CAL_FOLDS, data_dir, reports / "lfw-ivs-fold8")
    man = write_calibration(out, cal, "LFW-IvS (chipsim seed 0) extended impostors, LFW View-2 fold 8 "
                            "identities (inside folds 1-8, held out of training); never folds 9-10")
    from models.eval.embedder import Embedder
    p = pipeline_for(version, None)
    emb = Embedder(p, data_dir, seed=0, progress=False)  # live embeddings shared by both protocols
    ivs = run_eval(version, "lfw-ivs", [9, 10], data_dir, reports / "lfw-ivs-folds9-10", None, emb, p)
    lfw = run_eval(version, "lfw", [9, 10], data_dir, reports / "lfw-folds9-10", None, emb, p)
    man["metrics"] = {"lfw_ivs_folds9-10": summarise(ivs), "lfw_folds9-10": summarise(lfw),
                      "calibration_fold8_impostors": cal["counts"]["impostor"]}
    (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    print(json.dumps(man["metrics"], indent=1), file=sys.stderr)
    return man


def maybe_switch_current(version: str, baseline_tar_1e3: float) -> bool:
    man = json.loads((REPO / version / "manifest.json").read_text())
    m = man.get("metrics", {})
    tar = m.get("lfw_ivs_folds9-10", {}).get("tar_at_far", {}).get(far_key(1e-3))
    acc = m.get("lfw_folds9-10", {}).get("accuracy")
    if tar is None or acc is None:
        return False
    if tar > baseline_tar_1e3 and acc >= LFW_ACC_MIN:
        (REPO / "CURRENT").write_text(version + "\n")
        return True
    return False


def baseline_metrics(data_dir: Path) -> dict:
    """The pretrained baseline on the same protocols (full pipeline), computed once and kept
    under reports/towers/baseline/."""
    out = ROOT / "reports" / "towers" / "baseline"
    path = out / "metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    from models.eval.embedder import Embedder
    p = pipeline_for("baseline", None)
    emb = Embedder(p, data_dir, seed=0, progress=False)
    ivs = run_eval("baseline", "lfw-ivs", [9, 10], data_dir, out / "lfw-ivs-folds9-10", None, emb, p)
    lfw = run_eval("baseline", "lfw", [9, 10], data_dir, out / "lfw-folds9-10", None, emb, p)
    m = {"lfw_ivs_folds9-10": summarise(ivs), "lfw_folds9-10": summarise(lfw)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m, indent=2) + "\n")
    return m
