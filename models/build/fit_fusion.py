"""Fit the score fusion of the dlib towers and SFace on LFW fold 8, with adaptive s-norm, and ship it.

    .venv/bin/python -m models.build.fit_fusion --towers dual-v2-int8 --sface 2 --folds 8 [--version NAME]
                                                [--snorm auto|off|K] [--current] [--no-measure]

The members are used as they are exported (flip-averaging, runtime options and their own
calibration come with each version; nothing of theirs is rewritten here):

1. One pass over the fit folds (LFW-IvS rgb chips, extended impostors, all same-identity
   pairs) through the full pipeline of both families.
2. S-norm cohort (unless `--snorm off`): live embeddings of every LFW image outside pairs.txt
   whose person is outside View-2 folds 8-10 (no image any protocol scores), per family, unit
   length, stored as float16 (`cohort.npz`); the fit runs on the stored values.
3. For each candidate (no s-norm, and s-norm with K in `SNORM_KS`), each family's score as the
   fusion weighs it (`Fusion.normalised`), z-normalised (mean, std of the fit folds' pairs.txt
   genuine and extended impostor scores), then class-balanced L2 logistic regression, all
   same-identity pairs vs the extended impostors; fused score = logistic(w . z + b) in [0, 1]
   (service/face/fusion.py, the one function the service and evaluation call). The candidate
   with the best mean fused TAR at FAR 1e-2 and 1e-3 on the fit folds is kept.
4. models/repository/fusion/<version>/: manifest.json (members by name:version with their tower
   SHA-256s and flip-averaging, s-norm, normalisation, weights, every candidate's fit-fold TARs),
   cohort.npz, calibration.json (fused score -> FAR on the fit folds' extended impostors).
5. Unless --no-measure: `idverify eval`'s protocols on the fused pipeline (LFW-IvS folds 9-10,
   rgb and ycc; LFW 10-fold) into the fusion manifest's `metrics`. Nothing is chosen on 9-10.

Folds 9 and 10 are refused. Embeddings (every family, id and live) are saved to
reports/fusion-<version>/embeddings-<encoding>.npz for the studies (demographics).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from models.build.calibrate import RESERVED, record_metrics, write_calibration
from models.eval.embedder import Embedder
from models.eval.metrics import TAR_FARS, ScoreSet, far_key, tar_at_far
from models.eval.pairs import fold_identities, image_relpath, parse_folds, read_pairs
from models.eval.protocols import evaluate, fused_sets
from service.face.artifacts import load_towers, sha256_file
from service.face.fusion import NAME, Fusion, SNorm, load_fusion, member_entry
from service.face.score import normalize
from service.face.loader import SFACE, load_detector
from service.face.pipeline import Pipeline
from service.runtime import choose_providers
from service.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
FIT_FARS = ("1e-02", "1e-03")
SNORM_KS = (50, 100, 200, 500)
COHORT_EXCLUDED_FOLDS = (8, 9, 10)


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


def cohort_images(data_dir: Path) -> list[str]:
    """LFW images (relpaths) outside pairs.txt whose person is outside View-2 folds 8-10."""
    pairs = read_pairs(data_dir / "lfw" / "pairs.txt")
    scored = {image_relpath(x) for p in pairs for x in (p.a, p.b)}
    reserved = fold_identities(pairs, COHORT_EXCLUDED_FOLDS)
    images = data_dir / "lfw" / "images"
    return sorted(f"{person}/{f}" for person in os.listdir(images) if person not in reserved
                  for f in os.listdir(images / person) if f"{person}/{f}" not in scored)


def build_cohort(pipeline, data_dir: Path, batch_size: int, limit: int | None = None) -> dict[str, np.ndarray]:
    """family -> (N, D) unit live embeddings of the cohort images every family embedded, as
    float16 values (what cohort.npz stores)."""
    rels = cohort_images(data_dir)[:limit]
    emb = Embedder(pipeline, data_dir, batch_size=batch_size, progress=False)
    emb.run([(r, "live") for r in rels])
    keys = sorted(set.intersection(*(set(t) for t in emb.family_emb.values())))
    return {f: normalize(np.stack([t[k] for k in keys])).astype(np.float16) for f, t in emb.family_emb.items()}


def _tars(sets: dict, labels) -> dict:
    """TAR per FAR (impostors: the extended set) with all same-identity pairs and with pairs.txt's."""
    imp = ScoreSet(sets["imp"][np.isfinite(sets["imp"])])
    out = {}
    for name, gen in (("extended_genuine", sets["ext_genuine"]), ("pairs_txt_genuine", sets["pairs"][labels])):
        out[name] = {far_key(r["far_target"]): round(float(r["tar"]), 4)
                     for r in tar_at_far(gen[np.isfinite(gen)], imp, TAR_FARS)}
    return out


def _mean_tar(tars: dict) -> float:
    """The choice: mean TAR at FAR 1e-2 and 1e-3 over all same-identity pairs of the fit folds."""
    return float(np.mean([tars["extended_genuine"][k] for k in FIT_FARS]))


def fit_candidate(keep: dict, families: list[str], members: dict, snorm: SNorm | None) -> tuple[Fusion, dict, dict]:
    """The fusion fit on the kept fit-fold scores with this s-norm (or none): (fusion, fit
    parameters, fused TARs on the fit folds)."""
    stub = Fusion({"name": NAME, "version": "fit", "members": members}, Path("."), snorm)
    normalised = {f: fused_sets(stub, keep["per_family"], keep["grid"], keep["pairs"], keep["labels"], normalised=f)
                  for f in families}
    params = fit(normalised, keep["labels"], families)
    fusion = Fusion({**stub.manifest, **{k: params[k] for k in ("normalisation", "weights", "bias")}}, Path("."), snorm)
    fused = fused_sets(fusion, keep["per_family"], keep["grid"], keep["pairs"], keep["labels"])
    return fusion, params, _tars(fused, keep["labels"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--towers", required=True, help="towers version, e.g. dual-v2-int8")
    ap.add_argument("--sface", default="2", help="sface version")
    ap.add_argument("--folds", default="8", help="fit folds (never 9 or 10)")
    ap.add_argument("--version", default=None, help="fusion version folder (default <towers>-sface<sface>)")
    ap.add_argument("--snorm", default="auto", help="auto (choose K on the fit folds, or none), off, or a K")
    ap.add_argument("--current", action="store_true", help="point models/repository/fusion/CURRENT at it")
    ap.add_argument("--no-measure", action="store_true", help="skip the folds 9-10 / LFW 10-fold metrics")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="at most N pairs per fold and N cohort images (smoke tests only)")
    ap.add_argument("--reports", default=str(ROOT / "reports"), help="where reports and embeddings go")
    args = ap.parse_args(argv)
    folds = parse_folds(args.folds)
    if RESERVED & set(folds):
        ap.error("folds 9 and 10 are reserved for evaluation: never fit the fusion on them")
    if args.snorm not in ("auto", "off") and not args.snorm.isdigit():
        ap.error("--snorm takes auto, off or a cohort size K")
    version = args.version or f"{args.towers}-sface{args.sface}"
    command = "python -m models.build.fit_fusion " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = get_settings().model_copy(update={"tower_version": args.towers, "sface_version": args.sface,
                                                 "scoring": "towers"})
    folder = settings.models_dir / NAME / version
    if (folder / "manifest.json").exists():
        ap.error(f"{folder} exists: a shipped fusion is never rewritten; choose another --version")
    providers = choose_providers(settings.providers)
    towers = load_towers(settings.models_dir, settings.towers, args.towers, providers, settings.onnx_threads)
    sface = load_towers(settings.models_dir, SFACE, args.sface, providers, settings.onnx_threads)
    pipeline = Pipeline(settings, load_detector(settings, providers), towers, extra={SFACE: sface})
    pipeline.warmup()
    data_dir, out = Path(settings.data_dir), Path(args.reports) / f"fusion-{version}"
    families = list(pipeline.families)
    members = {f: member_entry(t) for f, t in pipeline.families.items()}

    embedder = Embedder(pipeline, data_dir, batch_size=args.batch_size)
    keep: dict = {}
    evaluate("lfw-ivs", folds, pipeline, data_dir, embedder=embedder, scores_out=keep, command=command,
             out=out / "fit", limit=args.limit, progress=False)
    cohort = None if args.snorm == "off" else build_cohort(pipeline, data_dir, args.batch_size, args.limit)
    ks = [] if cohort is None else (SNORM_KS if args.snorm == "auto" else (int(args.snorm),))
    candidates = {"off": fit_candidate(keep, families, members, None)} if args.snorm in ("auto", "off") else {}
    for k in ks:
        candidates[str(k)] = fit_candidate(keep, families, members, SNorm(cohort, k))
    for name, (_, _, tars) in candidates.items():
        print(f"s-norm {name}: fold(s) {args.folds} fused TAR {tars}", file=sys.stderr, flush=True)
    chosen = max(candidates, key=lambda c: (_mean_tar(candidates[c][2]), c == "off"))
    fusion, params, _ = candidates[chosen]

    folder.mkdir(parents=True, exist_ok=True)
    snorm_entry = None
    if fusion.snorm is not None:
        np.savez(folder / "cohort.npz", **cohort)
        snorm_entry = {"file": "cohort.npz", "sha256": sha256_file(folder / "cohort.npz"), "k": fusion.snorm.k,
                       "kind": "adaptive symmetric s-norm: s' = ((s - mu_a)/sd_a + (s - mu_b)/sd_b)/2 over each "
                               "side's k highest cohort scores",
                       "cohort": {"images": int(len(next(iter(cohort.values())))), "dtype": "float16 unit vectors",
                                  "source": f"live embeddings of LFW images outside pairs.txt, people outside View-2 "
                                            f"folds {','.join(map(str, COHORT_EXCLUDED_FOLDS))}"}}
    manifest = {
        "name": NAME, "version": version,
        "description": "score-level fusion: per-family s-normed (adaptive, against a live cohort) and "
                       "z-normalised scores, logistic regression, logistic map to [0, 1]"
                       if snorm_entry else
                       "score-level fusion: per-family z-normalised scores, logistic regression, logistic map to [0, 1]",
        "kind": "logistic-regression",
        "members": members,
        "snorm": snorm_entry,
        "normalisation": params["normalisation"], "weights": params["weights"], "bias": params["bias"],
        "score": "logistic(bias + sum_f weights[f] * (n_f - mean_f) / std_f); n_f = score_f s-normed when `snorm` is "
                 "set, else score_f; score_f = service.face.score.similarity",
        "fit": {"folds": folds, "protocol": "lfw-ivs", "chip_encoding": "rgb", "genuine": params["n_genuine"],
                "impostors": params["n_impostors"], "l2": 1e-4, "class_weights": "balanced",
                "snorm_candidates": {c: v[2] for c, v in candidates.items()},
                "snorm_choice": "the best mean fused TAR at FAR 1e-2 and 1e-3 (all same-identity pairs, extended "
                                "impostors) on the fit folds; a tie keeps no s-norm",
                "snorm_chosen": chosen, "command": command},
        "licence": "the members' (see their manifests; docs/model-card.md); the cohort is derived from LFW images",
        "metrics": {}, "calibration": None,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    pipeline.fusion = Fusion(manifest, folder, fusion.snorm)   # no calibration yet: this run places it
    fused = evaluate("lfw-ivs", folds, pipeline, data_dir, embedder=embedder, command=command, out=out / "fit-fused",
                     limit=args.limit, progress=False)
    write_calibration(folder, fused, f"fused score, LFW-IvS (chipsim seed 0) extended impostors of LFW View-2 "
                      f"fold(s) {args.folds}; never folds 9-10")
    print(f"fusion {version}: s-norm {chosen}, weights {params['weights']} bias {params['bias']:.4f}; fold(s) "
          f"{args.folds} fused TAR {[(r['far_target'], round(r['tar'], 4)) for r in fused['tar_at_far']]}", flush=True)
    if args.current:
        (settings.models_dir / NAME / "CURRENT").write_text(version + "\n")
    if not args.no_measure:
        pipeline.fusion = load_fusion_folder(folder)
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


def load_fusion_folder(folder: Path) -> Fusion:
    return load_fusion(folder.parent.parent, folder.name)


if __name__ == "__main__":
    sys.exit(main())
