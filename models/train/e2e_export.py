"""Unit probe and export for end-to-end runs (`models.train.e2e`).

probe : embeddings of data never trained on (fold-8 LFW crops: chips through `id`, live and
        occluded live through `live`; UTKFace test crops likewise) -> per-unit selectivity for
        every attribute, the units tied to each head (80 % of its group norm, at most 16), the
        scoring-mask trial on fold 8, unit_map.json + unit_map.png.
export: id.onnx / live.onnx (baseline I/O contract, parity checked), unit map, calibration on
        fold 8 through `idverify eval`'s code, metrics on folds 9-10 (rgb and ycc chips) and the
        LFW 10-fold protocol, manifest; CURRENT switches only by the release gate.

    python -m models.train.e2e_export --run .cache/train/runs/e2e-main --version dual-v3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from models.train import crops as C
from models.train import data as D
from models.train.heads import ATTRIBUTES, DEMOGRAPHIC
from models.train.probe import mask_trials, write_unit_map


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_e2e(run: Path):
    from models.train.e2e import E2ETowers, pretrained
    cfg = json.loads((Path(run) / "log.json").read_text())["config"]
    model = E2ETowers(pretrained(), heads=cfg["heads"], freeze_upto=cfg.get("freeze_upto"))
    state = torch.load(Path(run) / "best.pt", weights_only=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state


def probe(model, run: Path, crops_root: Path, settings) -> dict:
    from models.train.cache import occlude, photometrics, tower_template
    from models.train.e2e_data import embed
    reserved = D.reserved_identities(Path(settings.data_dir))
    template, _ = tower_template(settings.models_dir)
    rng = np.random.default_rng(0)
    Z, A = [], {a: [] for a in ATTRIBUTES}
    val_emb = None
    for split in ("val", "utk_test"):
        if not (Path(crops_root) / split / "meta.npz").exists():
            log(f"[probe] no {split} crops; skipped")
            continue
        d = C.load(crops_root, split, reserved)
        lok, cok = d["live_ok"], d["chip_ok"][:, 0]
        live = np.asarray(d["live"])
        occ = np.stack([occlude(x, rng, template) for x in live])
        chips = np.asarray(d["chips"][:, 0])
        for name, imgs, ok, tower, pose in (("chip", chips, cok, model.id, d["chip_pose"][:, 0]),
                                            ("live", live, lok, model.live, d["live_pose"]),
                                            ("occ", occ, lok, model.live, d["live_pose"])):
            e = embed(tower, imgs[ok])
            Z.append(e)
            if split == "val" and name in ("chip", "live"):
                val_emb = (val_emb or {}) | {name: embed(tower, imgs)}
            ph = np.array([photometrics(x) for x in imgs[ok]])
            A["yaw"].append(pose[ok, 0]), A["pitch"].append(pose[ok, 1])
            A["illumination"].append(ph[:, 0]), A["blur"].append(ph[:, 1])
            A["domain"].append(np.full(int(ok.sum()), 1.0 if name == "chip" else 0.0))
            A["occlusion"].append(np.full(int(ok.sum()), 1.0 if name == "occ" else 0.0))
            for a in DEMOGRAPHIC:
                A[a].append(d[a][ok])
        if split == "val":
            val = d
    ei, el = val_emb["chip"], val_emb["live"]
    return write_unit_map(model, np.concatenate(Z), {a: np.concatenate(v).astype(np.float64) for a, v in A.items()},
                          run, lambda ties: mask_trials(ei, val["chip_ok"][:, 0], el, val["live_ok"], val["identity"], ties))


def main(argv=None) -> int:
    from service.settings import get_settings
    ap = argparse.ArgumentParser(description="probe + export an end-to-end run as a towers version")
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--crops", type=Path, default=Path(".cache/train/crops"))
    ap.add_argument("--version", default=None, help="export as models/repository/towers/<version>")
    ap.add_argument("--probe-only", action="store_true")
    ap.add_argument("--no-measure", action="store_true", help="export only: no calibration, no metrics")
    a = ap.parse_args(argv)
    settings = get_settings()
    torch.set_num_threads(2)
    model, cfg, state = load_e2e(a.run)
    pr = probe(model, a.run, a.crops, settings)
    log(f"[probe] ties {pr['ties']}; scoring mask {pr['scoring']['use_mask']}")
    if a.probe_only or not a.version:
        return 0
    from models.train.export import REPO
    export(model, cfg, state, a.run, REPO / a.version, a.version)
    if a.no_measure:
        return 0
    measure(REPO / a.version, settings, a.version)
    switched = maybe_switch(REPO, a.version)
    log(f"[export] CURRENT {'switched to ' + a.version if switched else 'unchanged'}")
    return 0


E2E_KEYS = ("epochs", "steps_per_epoch", "batch", "cross_frac", "lr", "head_lr", "warmup", "lam", "mu", "distill",
            "alpha", "gamma", "hard_k", "heads", "freeze_upto", "utk", "seed", "threads", "best_epoch", "command",
            "train_seconds", "data_terms")


def export(model, cfg: dict, state: dict, run: Path, out: Path, version: str) -> dict:
    """id.onnx / live.onnx, the unit map and the manifest (no calibration yet)."""
    from models.build.export_towers import sha256_file
    from models.train.export import build_manifest, write_onnx
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for side in ("id", "live"):
        net = getattr(model, side).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        diff = write_onnx(net, out / f"{side}.onnx")
        log(f"[export] {out / side}.onnx: onnxruntime vs torch {diff:.1e}")
        files[side] = f"{side}.onnx"
    for name in ("unit_map.json", "unit_map.png"):
        (out / name).write_bytes((Path(run) / name).read_bytes())
    pr = json.loads((out / "unit_map.json").read_text())
    cfg = {**cfg, "best_epoch": state["epoch"],
           "data_terms": "LFW (folds 1-8 identities)" + (" + UTKFace (non-commercial research only)" if cfg["utk"] else "")}
    frozen = f"stem..{cfg['freeze_upto']} frozen" if cfg.get("freeze_upto") else "every layer trained (stem included)"
    desc = ("dual heterogeneous towers trained end to end from the dlib face ResNet on aligned chip/live crops: "
            f"`id` for ID-chip photos, `live` for camera frames ({frozen}; coupling lam {cfg['lam']}, "
            f"distillation {cfg['distill']}; see docs/training.md)")
    extra = {"unit_map": {"file": "unit_map.json", "sha256": sha256_file(out / "unit_map.json"),
                          "scoring_mask": bool(pr["scoring"]["use_mask"])},
             "calibration": None, "test_time": {"flip_average": True},
             "licence": "CC0-1.0 (dlib weights); trained on " + cfg["data_terms"]}
    man = build_manifest(version, files, cfg, {}, extra, description=desc, keys=E2E_KEYS, folder=out)
    man["training"]["reproduce"] = (cfg.get("command") or "") + f" && python -m models.train.e2e_export --run <run> --version {version}"
    man["source"]["converter"] = "models/train/e2e.py + models/build/export_towers.export_onnx"
    (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    return man


def measure(folder: Path, settings, version: str) -> dict:
    """Calibration on fold 8 (LFW-IvS extended impostors; never 9-10), then the evaluation
    protocols recorded in the manifest, all through `idverify eval`'s code."""
    from models.build.calibrate import main as calibrate
    return calibrate(["--version", version, "--folds", "8", "--measure"])


def maybe_switch(repo: Path, version: str, lfw_min: float = 0.9913) -> bool:
    """CURRENT moves to `version` only if it beats the current CURRENT on LFW-IvS folds 9-10 at
    FAR 1e-3 (rgb chips) and its LFW 10-fold accuracy is not below the pretrained network's."""
    from models.eval.metrics import far_key
    cur = (repo / "CURRENT").read_text().strip()
    new = json.loads((repo / version / "manifest.json").read_text())["metrics"]
    old = json.loads((repo / cur / "manifest.json").read_text())["metrics"]
    tar_new = new["lfw_ivs_folds9-10"]["tar_at_far"][far_key(1e-3)]
    tar_old = old["lfw_ivs_folds9-10"]["tar_at_far"][far_key(1e-3)]
    acc = new["lfw_10fold"]["accuracy"]
    log(f"[gate] {version} TAR@1e-3 {tar_new:.4f} vs {cur} {tar_old:.4f}; LFW 10-fold {acc:.4f} (min {lfw_min})")
    if tar_new > tar_old and acc >= lfw_min:
        (repo / "CURRENT").write_text(version + "\n")
        return True
    return False

if __name__ == "__main__":
    sys.exit(main())
