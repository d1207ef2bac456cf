"""Two measurements on the shipped fusion: adaptive s-norm, and demographic differentials.

    .venv/bin/python -m studies.fusion_study [--fusion current] [--part snorm|demographics|all]

Reads the embeddings `python -m models.build.fit_fusion` saved (reports/fusion-<version>/
embeddings-{rgb,ycc}.npz: every family, id side = simulated chips of that encoding, live side =
LFW files, through the full pipeline), so no image is analysed again. Scores are the served ones:
`service.face.score.score_from_cosine` per family, `Fusion.score` for the fusion.

s-norm (adaptive, symmetric): cohort = live embeddings of the images of LFW View-2 folds 1-7
(never 8-10). For a pair (a, b) with raw score s: s' = ((s - mu_a) / sd_a + (s - mu_b) / sd_b) / 2,
mu/sd over the K highest cohort scores of each side (K chosen on fold 8). Each family is
normalised; the fusion of normalised scores is refit on fold 8 (`fit_fusion.fit`). Shipped only if
it helps on fold 8 and holds on folds 9-10.

Demographics: TAR and FAR at the served threshold (the fusion's, IDV_FAR_TARGET 1e-3, and each
family alone at its own) per gender (/work/shared/data/lfw/gender_labels.csv, one label per
identity) on LFW-IvS folds 9-10, with Wilson 95 % intervals.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from models.eval.metrics import ScoreSet, tar_at_far
from models.eval.pairs import fold_identities, image_relpath, read_pairs, select_pairs
from service.face.decide import Threshold
from service.face.fusion import Fusion, load_fusion
from service.face.score import normalize, score_from_cosine
from service.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
FARS = (1e-2, 1e-3, 1e-4)
KS = (10, 50, 200, 1000)


def load_embeddings(path: Path) -> dict[str, dict[tuple[str, str], np.ndarray]]:
    z = np.load(path)
    out = {}
    for name in z.files:
        if name.endswith("_keys"):
            family = name[:-5]
            out[family] = {tuple(k.split("|", 1)[::-1]): v for k, v in zip(z[name], z[f"{family}_emb"])}
    return out


def matrix(table: dict, rels: list[str], side: str) -> tuple[np.ndarray, np.ndarray]:
    e = np.zeros((len(rels), 128), np.float32)
    ok = np.array([(r, side) in table for r in rels])
    for i, r in enumerate(rels):
        if ok[i]:
            e[i] = table[(r, side)]
    return normalize(e), ok


class FoldSet:
    """Chip (id) vs live score matrices of one fold set, per family, and which cells are what."""

    def __init__(self, emb: dict, pairs):
        self.pairs = pairs
        self.rel_a = sorted({image_relpath(p.a) for p in pairs})
        self.rel_b = sorted({image_relpath(p.b) for p in pairs})
        ida = np.array([r.split("/")[0] for r in self.rel_a])
        idb = np.array([r.split("/")[0] for r in self.rel_b])
        self.id_a, self.id_b = ida, idb
        self.same = ida[:, None] == idb[None, :]
        self.diff_file = np.array(self.rel_a)[:, None] != np.array(self.rel_b)[None, :]
        ia = {r: i for i, r in enumerate(self.rel_a)}
        ib = {r: i for i, r in enumerate(self.rel_b)}
        self.pair_ix = (np.array([ia[image_relpath(p.a)] for p in pairs]), np.array([ib[image_relpath(p.b)] for p in pairs]))
        self.labels = np.array([p.same for p in pairs])
        self.E = {f: (matrix(t, self.rel_a, "id"), matrix(t, self.rel_b, "live")) for f, t in emb.items()}

    def raw(self, family: str) -> np.ndarray:
        (ea, oka), (eb, okb) = self.E[family]
        s = score_from_cosine(ea @ eb.T).astype(np.float64)
        s[~(oka[:, None] & okb[None, :])] = -np.inf
        return s

    def sets(self, s: np.ndarray) -> dict:
        """pairs.txt scores, impostors (cross-identity), all same-identity pairs."""
        return {"pairs": s[self.pair_ix], "imp": s[~self.same], "ext_genuine": s[self.same & self.diff_file]}


def tar_row(gen, imp) -> dict:
    return {f"{r['far_target']:g}": round(r["tar"], 4) for r in tar_at_far(gen, ScoreSet(imp), FARS)}


def cohort_stats(e: np.ndarray, ok: np.ndarray, cohort: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    c = score_from_cosine(e @ cohort.T)
    top = -np.sort(-c, axis=1)[:, :k]
    mu, sd = top.mean(1), top.std(1)
    mu[~ok], sd[~ok] = 0.0, 1.0
    return mu, np.maximum(sd, 1e-6)


def snorm(fs: FoldSet, family: str, cohort: np.ndarray, k: int) -> np.ndarray:
    (ea, oka), (eb, okb) = fs.E[family]
    mua, sda = cohort_stats(ea, oka, cohort, k)
    mub, sdb = cohort_stats(eb, okb, cohort, k)
    s = fs.raw(family)
    with np.errstate(invalid="ignore"):
        return 0.5 * ((s - mua[:, None]) / sda[:, None] + (s - mub[None, :]) / sdb[None, :])


def refit(fit_sets: dict, labels, families) -> Fusion:
    from models.build.fit_fusion import fit

    p = fit(fit_sets, labels, list(families))
    return Fusion({"name": "fusion", "version": "snorm", "members": {f: {} for f in families},
                   "normalisation": p["normalisation"], "weights": p["weights"], "bias": p["bias"]}, Path("."))


def snorm_part(fusion: Fusion, emb: dict, all_pairs) -> dict:
    fams = fusion.families
    cohort_ids = fold_identities(all_pairs, range(1, 8)) - fold_identities(all_pairs, range(8, 11))
    live = emb["rgb"]
    cohort = {f: normalize(np.stack([v for (r, s), v in live[f].items() if s == "live" and r.split("/")[0] in cohort_ids]))
              for f in fams}
    fit_fs = FoldSet(emb["rgb"], select_pairs(all_pairs, [8]))
    test = {enc: FoldSet(emb[enc], select_pairs(all_pairs, [9, 10])) for enc in ("rgb", "ycc")}

    def evaluate(fs: FoldSet, k: int | None, fusion_k: Fusion) -> dict:
        per = {f: fs.sets(fs.raw(f) if k is None else snorm(fs, f, cohort[f], k)) for f in fams}
        rows = {f: tar_row(v["pairs"][fs.labels], v["imp"]) for f, v in per.items()}
        fused = {key: fusion_k.score({f: per[f][key] for f in fams}) for key in ("pairs", "imp")}
        rows["fused"] = tar_row(fused["pairs"][fs.labels], fused["imp"])
        return rows

    fusions = {None: fusion}
    for k in KS:
        sets = {f: fit_fs.sets(snorm(fit_fs, f, cohort[f], k)) for f in fams}
        fusions[k] = refit(sets, fit_fs.labels, fams)
    fold8 = {str(k): evaluate(fit_fs, k, fusions[k]) for k in fusions}
    best = max(KS, key=lambda k: sum(fold8[str(k)]["fused"][f] for f in ("0.01", "0.001")))
    held = {enc: {str(k): evaluate(fs, k, fusions[k]) for k in (None, best)} for enc, fs in test.items()}
    return {"cohort_images": {f: int(len(c)) for f, c in cohort.items()}, "cohort_identities": len(cohort_ids),
            "fold8": fold8, "best_k_on_fold8": best, "folds9-10": held}


def wilson(k: int, n: int, z: float = 1.959964) -> list[float | None]:
    if n == 0:
        return [None, None]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def rate(accepted: np.ndarray) -> dict:
    k, n = int(accepted.sum()), int(accepted.size)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci95": wilson(k, n)}


def demographics_part(fusion: Fusion, emb: dict, all_pairs, far: float) -> dict:
    import csv

    gender_path = Path(get_settings().data_dir) / "lfw" / "gender_labels.csv"
    with open(gender_path) as f:
        gender = {row["name"]: row["gender"] for row in csv.DictReader(f)}
    fams = fusion.families
    fused_thr = Threshold.from_calibration(fusion.calibration, score=None, far_target=far)
    from service.face.artifacts import artifact_calibration, load_manifest, resolve_version

    def own_calibration(family: str) -> list[dict]:   # each member's own table (the fallback's)
        folder = resolve_version(get_settings().models_dir, family, fusion.manifest["members"][family]["version"])
        return artifact_calibration(load_manifest(folder), folder)

    thr = {"fused": fused_thr, **{f: Threshold.from_calibration(own_calibration(f), score=None, far_target=far)
                                  for f in fams}}
    out = {"gender_labels": str(gender_path), "far_target": far,
           "thresholds": {k: {"score": v.score, "far": v.far} for k, v in thr.items()}}
    for enc in ("rgb", "ycc"):
        fs = FoldSet(emb[enc], select_pairs(all_pairs, [9, 10]))
        ga, gb = np.array([gender.get(i, "unknown") for i in fs.id_a]), np.array([gender.get(i, "unknown") for i in fs.id_b])
        raw = {f: fs.raw(f) for f in fams}
        scores = {**raw, "fused": fusion.score(raw)}
        res = {}
        for name, s in scores.items():
            acc = s >= thr[name].score
            pair_acc, pair_g = acc[fs.pair_ix], ga[fs.pair_ix[0]]
            rows = {}
            for g in ("male", "female", "unknown"):   # unknown: the identity is not in the labels
                rows[g] = {"tar_pairs_txt": rate(pair_acc[fs.labels & (pair_g == g)]),
                           "tar_all_same_identity": rate(acc[fs.same & fs.diff_file & (ga[:, None] == g)]),
                           "far_same_gender": rate(acc[~fs.same & (ga[:, None] == g) & (gb[None, :] == g)])}
            known = (ga[:, None] != "unknown") & (gb[None, :] != "unknown")
            rows["mixed"] = {"far": rate(acc[~fs.same & known & (ga[:, None] != gb[None, :])])}
            rows["all"] = {"tar_pairs_txt": rate(pair_acc[fs.labels]), "far": rate(acc[~fs.same])}
            res[name] = rows
        ids = set(fs.id_a) | set(fs.id_b)
        res["identities"] = {g: sum(gender.get(i) == g for i in ids) for g in ("male", "female")}
        res["identities"]["unlabelled"] = sum(i not in gender for i in ids)
        out[enc] = res
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fusion", default="current")
    ap.add_argument("--part", choices=("snorm", "demographics", "all"), default="all")
    ap.add_argument("--far", type=float, default=1e-3)
    ap.add_argument("--embeddings", default=None, help="folder of embeddings-{rgb,ycc}.npz (default: the fit's reports)")
    args = ap.parse_args(argv)
    settings = get_settings()
    fusion = load_fusion(settings.models_dir, args.fusion)
    folder = Path(args.embeddings) if args.embeddings else ROOT / "reports" / f"fusion-{fusion.manifest['version']}"
    emb = {enc: load_embeddings(folder / f"embeddings-{enc}.npz") for enc in ("rgb", "ycc")}
    all_pairs = read_pairs(Path(settings.data_dir) / "lfw" / "pairs.txt")
    results = {"fusion": fusion.version}
    if args.part in ("snorm", "all"):
        results["snorm"] = snorm_part(fusion, emb, all_pairs)
    if args.part in ("demographics", "all"):
        results["demographics"] = demographics_part(fusion, emb, all_pairs, args.far)
    (folder / f"study-{args.part}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
