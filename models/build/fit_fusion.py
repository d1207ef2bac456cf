"""Fit the score fusion of the dlib towers and SFace on LFW fold 8, and ship it.

    .venv/bin/python -m models.build.fit_fusion --towers dual-v2 --sface 1 --folds 8 [--version NAME]
                                                [--sface-flip auto|on|off] [--current] [--no-measure]

One command for any towers version (the lead's `towers/dual-v3` included):

1. SFace flip-averaging (`--sface-flip auto`, the default): SFace alone is measured on the fit
   folds (LFW-IvS rgb, extended impostors, all same-identity pairs) plain and flip-averaged; the
   better mean TAR at FAR 1e-2 and 1e-3 is kept (a tie keeps the plain crop, half the cost) and
   written into the SFace manifest's `test_time`, with the figures.
2. The fusion: each family's score z-normalised (mean, std of the fit folds' pairs.txt genuine
   and extended impostor scores), then class-balanced L2 logistic regression, all same-identity
   pairs vs the extended impostors; fused score = logistic(w . z + b) in [0, 1]
   (service/face/fusion.py, the one function the service and evaluation call).
3. models/repository/fusion/<version>/manifest.json (members by name:version with their tower
   SHA-256s and flip-averaging, normalisation, weights) and calibration.json (fused score -> FAR
   on the fit folds' extended impostors, via `calibrate.write_calibration`); SFace gets its own
   calibration from the same folds (the fallback rule's threshold, and `IDV_SCORING=sface`).
4. Unless --no-measure: `idverify eval`'s protocols on the fused pipeline (LFW-IvS folds 9-10,
   rgb and ycc; LFW 10-fold) into the fusion manifest's `metrics`. Nothing is chosen on 9-10.

Folds 9 and 10 are refused. Embeddings (every family, id and live) are saved to
reports/fusion-<version>/embeddings-<encoding>.npz for the studies (s-norm, demographics).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from models.build.calibrate import RESERVED, record_metrics, write_calibration
from models.eval.embedder import Embedder
from models.eval.metrics import far_key
from models.eval.pairs import parse_folds
from models.eval.protocols import evaluate
from service.face.artifacts import load_towers
from service.face.fusion import NAME, Fusion, member_entry
from service.face.loader import SFACE, load_detector
from service.face.pipeline import Pipeline
from service.runtime import choose_providers
from service.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
FIT_FARS = ("1e-02", "1e-03")


def logistic_fit(xg: np.ndarray, xi: np.ndarray, l2: float = 1e-4) -> tuple[np.ndarray, float]:
    """Class-balanced L2 logistic regression, genuine (xg) = 1 vs impostor (xi) = 0."""
    from scipy.optimize import minimize

    x = np.concatenate([xg, xi])
    y = np.concatenate([np.ones(len(xg)), np.zeros(len(xi))])
    sw = np.concatenate([np.full(len(xg), 0.5 / len(xg)), np.full(len(xi), 0.5 / len(xi))])
    xb = np.hstack([x, np.ones((len(x), 1))])

    def loss(theta):
        t = xb @ theta
        p = 0.5 * (1.0 + np.tanh(0.5 * t))
        grad = xb.T @ (sw * (p - y)) + np.r_[2 * l2 * theta[:-1], 0.0]
        return float(np.sum(sw * (np.logaddexp(0.0, t) - y * t)) + l2 * np.sum(theta[:-1] ** 2)), grad

    res = minimize(loss, np.zeros(xb.shape[1]), jac=True, method="L-BFGS-B")
    return res.x[:-1], float(res.x[-1])


def fit(per_family: dict, labels: np.ndarray, families: list[str]) -> dict:
    """Normalisation and weights from the fit folds' scores (pairs.txt genuine and extended
    impostors for mean/std; all same-identity pairs vs impostors for the regression)."""
    norm, zg, zi = {}, [], []
    for f in families:
        s = per_family[f]
        pool = np.concatenate([s["pairs"][labels], s["imp"]]).astype(np.float64)
        pool = pool[np.isfinite(pool)]
        norm[f] = {"mean": float(pool.mean()), "std": float(pool.std())}
        zg.append((s["ext_genuine"].astype(np.float64) - norm[f]["mean"]) / norm[f]["std"])
        zi.append((s["imp"].astype(np.float64) - norm[f]["mean"]) / norm[f]["std"])
    xg, xi = np.stack(zg, 1), np.stack(zi, 1)
    xg, xi = xg[np.all(np.isfinite(xg), 1)], xi[np.all(np.isfinite(xi), 1)]
    w, b = logistic_fit(xg, xi)
    return {"normalisation": norm, "weights": {f: float(v) for f, v in zip(families, w)}, "bias": b,
            "n_genuine": int(len(xg)), "n_impostors": int(len(xi))}


def save_embeddings(embedder: Embedder, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for f, table in embedder.family_emb.items():
        keys = sorted(table)
        arrays[f"{f}_keys"] = np.array([f"{s}|{r}" for r, s in keys], dtype=str)
        arrays[f"{f}_emb"] = np.stack([table[k] for k in keys]) if keys else np.zeros((0, 128), np.float32)
    arrays["fta"] = np.array([f"{s}|{r}|{c}" for (r, s), c in sorted(embedder.fta.items())], dtype=str)
    np.savez(path, **arrays)


def _mean_tar(report: dict, family: str) -> float:
    rows = report["families"][family]["tar_at_far_extended_genuine"]
    return float(np.mean([r["tar"] for r in rows if far_key(r["far_target"]) in FIT_FARS]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--towers", required=True, help="towers version, e.g. dual-v2")
    ap.add_argument("--sface", default="1", help="sface version")
    ap.add_argument("--folds", default="8", help="fit folds (never 9 or 10)")
    ap.add_argument("--version", default=None, help="fusion version folder (default <towers>-sface<sface>)")
    ap.add_argument("--sface-flip", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--current", action="store_true", help="point models/repository/fusion/CURRENT at it")
    ap.add_argument("--no-measure", action="store_true", help="skip the folds 9-10 / LFW 10-fold metrics")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="at most N pairs per fold (smoke tests only)")
    ap.add_argument("--reports", default=str(ROOT / "reports"), help="where reports and embeddings go")
    args = ap.parse_args(argv)
    folds = parse_folds(args.folds)
    if RESERVED & set(folds):
        ap.error("folds 9 and 10 are reserved for evaluation: never fit the fusion on them")
    version = args.version or f"{args.towers}-sface{args.sface}"
    command = "python -m models.build.fit_fusion " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = get_settings().model_copy(update={"tower_version": args.towers, "sface_version": args.sface,
                                                 "scoring": "towers"})
    providers = choose_providers(settings.providers)
    towers = load_towers(settings.models_dir, settings.towers, args.towers, providers, settings.onnx_threads)
    sface = load_towers(settings.models_dir, SFACE, args.sface, providers, settings.onnx_threads)
    pipeline = Pipeline(settings, load_detector(settings, providers), towers, extra={SFACE: sface})
    pipeline.warmup()
    data_dir, out = Path(settings.data_dir), Path(args.reports) / f"fusion-{version}"

    def fit_pass(flip: bool):
        sface.id.flip_average = sface.live.flip_average = flip
        emb = Embedder(pipeline, data_dir, batch_size=args.batch_size)
        keep: dict = {}
        rep = evaluate("lfw-ivs", folds, pipeline, data_dir, embedder=emb, scores_out=keep, command=command,
                       out=out / f"fit-flip{int(flip)}", limit=args.limit, progress=False)
        print(f"SFace flip_average={flip} on folds {args.folds}: TAR {[(r['far_target'], round(r['tar'], 4)) for r in rep['families'][SFACE]['tar_at_far']]}",
              file=sys.stderr, flush=True)
        return emb, rep, keep

    passes = {flip: fit_pass(flip) for flip in ((False, True) if args.sface_flip == "auto" else
                                              (args.sface_flip == "on",))}
    measured = {str(f).lower(): round(_mean_tar(r, SFACE), 4) for f, (_, r, _) in passes.items()}
    flip = max(passes, key=lambda f: (_mean_tar(passes[f][1], SFACE), not f)) if len(passes) > 1 else next(iter(passes))
    embedder, report, keep = passes[flip]
    sface.id.flip_average = sface.live.flip_average = flip
    sface.manifest["test_time"] = {"flip_average": flip, "note": (
        f"chosen by {command} on LFW-IvS folds {args.folds} (rgb, extended impostors, all same-identity "
        f"pairs): mean SFace TAR at FAR 1e-2 and 1e-3 by flip_average {measured}; see docs/sface.md")}
    (sface.folder / "manifest.json").write_text(json.dumps(sface.manifest, indent=2) + "\n")
    fam = report["families"][SFACE]
    write_calibration(sface.folder, {"calibration": fam["calibration"], "counts": report["counts"], "command": command},
                      f"SFace alone (flip_average {flip}), LFW-IvS (chipsim seed 0) extended impostors of LFW "
                      f"View-2 fold(s) {args.folds}; never folds 9-10")
    sface.manifest.update(json.loads((sface.folder / "manifest.json").read_text()))

    families = list(pipeline.families)
    params = fit(keep["per_family"], keep["labels"], families)
    folder = settings.models_dir / NAME / version
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": NAME, "version": version,
        "description": "score-level fusion: per-family z-normalised scores, logistic regression, logistic map to [0, 1]",
        "kind": "logistic-regression",
        "members": {f: member_entry(t) for f, t in pipeline.families.items()},
        "normalisation": params["normalisation"], "weights": params["weights"], "bias": params["bias"],
        "score": "logistic(bias + sum_f weights[f] * (score_f - mean_f) / std_f); score_f = service.face.score.similarity",
        "fit": {"folds": folds, "protocol": "lfw-ivs", "chip_encoding": "rgb", "genuine": params["n_genuine"],
                "impostors": params["n_impostors"], "l2": 1e-4, "class_weights": "balanced",
                "sface_flip_average": {"chosen": flip, "mean_tar_1e-2_1e-3": measured}, "command": command},
        "licence": "the members' (see their manifests; docs/model-card.md)",
        "metrics": {}, "calibration": None,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    pipeline.fusion = Fusion(manifest, folder)
    fused = evaluate("lfw-ivs", folds, pipeline, data_dir, embedder=embedder, command=command, out=out / "fit-fused",
                     limit=args.limit, progress=False)
    write_calibration(folder, fused, f"fused score, LFW-IvS (chipsim seed 0) extended impostors of LFW View-2 "
                      f"fold(s) {args.folds}; never folds 9-10")
    print(f"fusion {version}: weights {params['weights']} bias {params['bias']:.4f}; fold(s) {args.folds} "
          f"fused TAR {[(r['far_target'], round(r['tar'], 4)) for r in fused['tar_at_far']]}", flush=True)
    if args.current:
        (settings.models_dir / NAME / "CURRENT").write_text(version + "\n")
    if not args.no_measure:
        embedders = {"rgb": embedder}

        def embedder_for(encoding: str) -> Embedder:
            if encoding not in embedders:   # the live side is the same images: reuse the rgb run's
                e = Embedder(pipeline, data_dir, chip_encoding=encoding, batch_size=args.batch_size)
                for f, table in embedder.family_emb.items():
                    e.family_emb[f].update({k: v for k, v in table.items() if k[1] == "live"})
                e.emb.update({k: v for k, v in embedder.emb.items() if k[1] == "live"})
                e.fta.update({k: v for k, v in embedder.fta.items() if k[1] == "live"})
                embedders[encoding] = e
            return embedders[encoding]

        record_metrics(folder, pipeline, data_dir, embedder_for)
        for encoding, e in embedders.items():
            save_embeddings(e, out / f"embeddings-{encoding}.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
