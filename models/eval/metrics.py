"""Verification metrics: accuracy with fold-wise thresholds, TAR at FAR, calibration tables, ROC
points, and all-pairs scores. Plain numpy; every score is `service.face.score.score_from_cosine`."""
from __future__ import annotations

import math

import numpy as np

from service.face.score import score_from_cosine

TAR_FARS = (1e-2, 1e-3, 1e-4)
CALIBRATION_FARS = tuple(m * 10.0 ** -e for e in range(1, 6) for m in (5, 2, 1) if not (e == 1 and m != 1))


def far_key(far: float) -> str:
    """The one spelling of a FAR as a metrics key: 1e-3 -> "1e-03" (manifests, run reports)."""
    return f"{far:.0e}"


def best_threshold(scores, labels) -> tuple[float, float]:
    """Threshold maximising accuracy of `score >= t` -> same. Returns (threshold, accuracy).
    Candidates: midpoints between consecutive distinct finite scores and one beyond each end;
    ties are broken by taking the middle of the best candidates. -inf scores are never accepted."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n = s.size
    if n == 0:
        raise ValueError("no scores")
    uniq = np.unique(s[np.isfinite(s)])
    if uniq.size == 0:
        return math.inf, float((~y).sum() / n)
    cands = np.concatenate([[uniq[0] - 1e-6], (uniq[:-1] + uniq[1:]) / 2.0, [uniq[-1] + 1e-6]])
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    tp = pos.size - np.searchsorted(pos, cands, side="left")
    tn = np.searchsorted(neg, cands, side="left")
    acc = (tp + tn) / n
    best = np.flatnonzero(acc == acc.max())
    i = best[len(best) // 2]
    return float(cands[i]), float(acc[i])


def accuracy_at(scores, labels, threshold: float) -> float:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    return float(((s >= threshold) == y).mean())


def kfold_accuracy(scores, labels, pair_folds, folds: list[int] | None = None) -> dict:
    """Leave-one-fold-out accuracy over `folds` (default: all folds present): each test fold is
    scored at the threshold that is best on the other selected folds (on itself if it is the
    only one: optimistic, flagged)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    fo = np.asarray(pair_folds)
    folds = sorted(set(fo.tolist())) if folds is None else list(folds)
    per_fold = []
    for f in folds:
        test = fo == f
        others = [g for g in folds if g != f]
        train = np.isin(fo, others) if others else test
        thr, train_acc = best_threshold(s[train], y[train])
        per_fold.append({
            "fold": int(f),
            "threshold": thr,
            "threshold_from_folds": [int(g) for g in (others or [f])],
            "train_accuracy": train_acc,
            "accuracy": accuracy_at(s[test], y[test], thr),
            "pairs": int(test.sum()),
        })
    accs = np.array([r["accuracy"] for r in per_fold])
    return {
        "mean": float(accs.mean()),
        "std": float(accs.std(ddof=1)) if accs.size > 1 else 0.0,
        "standard_error": float(accs.std(ddof=1) / math.sqrt(accs.size)) if accs.size > 1 else 0.0,
        "threshold_selection": "other selected folds" if len(folds) > 1 else "self",
        "note": None if len(folds) > 1 else
        "single fold: the threshold was chosen on the test fold itself (optimistic)",
        "per_fold": per_fold,
    }


class ScoreSet:
    """Impostor scores sorted once for repeated threshold look-ups (-inf = FTA, never accepted)."""

    def __init__(self, impostor_scores):
        imp = np.asarray(impostor_scores)
        if imp.dtype not in (np.float32, np.float64):
            imp = imp.astype(np.float64)
        self.n = int(imp.size)
        self.asc = np.sort(imp)

    def accepted(self, threshold: float) -> int:
        return int(self.n - np.searchsorted(self.asc, threshold, side="left"))

    def threshold_at_far(self, far: float) -> dict:
        """Lowest threshold (accept: score >= t) that accepts at most floor(far * N) impostors."""
        n = self.n
        if n == 0:
            return {"far_target": far, "threshold": math.nan, "far": math.nan, "false_accepts": 0,
                    "false_accepts_allowed": 0, "n_impostors": 0, "resolvable": False}
        k = int(math.floor(far * n + 1e-9))
        lowest = float(np.nextafter(-math.inf, 0.0))  # accepts every finite score, never -inf
        if k >= n:
            thr = lowest
        else:
            v = float(self.asc[n - 1 - k])  # the (k+1)-th largest impostor must be rejected
            thr = float(np.nextafter(v, math.inf)) if v > -math.inf else lowest
        fa = self.accepted(thr)
        return {
            "far_target": far,
            "threshold": thr,
            "far": fa / n,
            "false_accepts": fa,
            "false_accepts_allowed": k,
            "n_impostors": n,
            "resolvable": far * n >= 1.0,
        }


def tar_at_far(genuine_scores, impostor_scores, fars=TAR_FARS) -> list[dict]:
    """TAR at each FAR in `fars`. Each row: far_target, threshold, tar, far (observed),
    false_accepts(_allowed), n_genuine, n_impostors, resolvable, note."""
    gen = np.sort(np.asarray(genuine_scores, dtype=np.float64))
    imp = impostor_scores if isinstance(impostor_scores, ScoreSet) else ScoreSet(impostor_scores)
    rows = []
    for f in fars:
        r = imp.threshold_at_far(f)
        thr = r["threshold"]
        tar = float((gen.size - np.searchsorted(gen, thr, side="left")) / gen.size) if gen.size and not math.isnan(thr) else math.nan
        r.update(tar=tar, n_genuine=int(gen.size))
        r["note"] = None if r["resolvable"] else (
            f"FAR {f:g} cannot be resolved with {imp.n} impostor pairs (needs >= {math.ceil(1 / f)}); "
            "the threshold rejects every impostor seen")
        rows.append(r)
    return rows


def calibration_table(impostor_scores, fars=CALIBRATION_FARS) -> list[dict]:
    """Score -> FAR table for the model manifest: for each target FAR (1e-1 .. 1e-5, 1-2-5
    steps) that the impostor count resolves, the lowest threshold meeting it. Rows are
    {"score", "far" (observed, <= target), "far_target", "false_accepts", "n_impostors"},
    sorted by score ascending (FAR descending)."""
    imp = impostor_scores if isinstance(impostor_scores, ScoreSet) else ScoreSet(impostor_scores)
    rows = []
    for f in sorted(fars, reverse=True):
        r = imp.threshold_at_far(f)
        if not r["resolvable"] or not math.isfinite(r["threshold"]):
            continue
        rows.append({"score": r["threshold"], "far": r["far"], "far_target": f,
                     "false_accepts": r["false_accepts"], "n_impostors": r["n_impostors"]})
    rows.sort(key=lambda r: r["score"])
    return rows


def roc_points(genuine_scores, impostor_scores, n_points: int = 400) -> dict:
    """ROC on a log-spaced FAR grid from 1/N to 1: {"far", "tar", "threshold"} lists."""
    gen = np.sort(np.asarray(genuine_scores, dtype=np.float64))
    imp = impostor_scores if isinstance(impostor_scores, ScoreSet) else ScoreSet(impostor_scores)
    if imp.n == 0 or gen.size == 0:
        return {"far": [], "tar": [], "threshold": [], "n_genuine": int(gen.size), "n_impostors": imp.n}
    grid = np.unique(np.concatenate([np.logspace(math.log10(1.0 / imp.n), 0.0, n_points), [1.0 / imp.n]]))
    fars, tars, thrs = [], [], []
    for f in grid:
        r = imp.threshold_at_far(float(f))
        t = r["threshold"]
        tars.append(float((gen.size - np.searchsorted(gen, t, side="left")) / gen.size))
        fars.append(r["far"])
        thrs.append(t)
    return {"far": fars, "tar": tars, "threshold": thrs, "n_genuine": int(gen.size), "n_impostors": imp.n}


def cosine_block(ea, oka, eb, okb, s: int, e: int) -> np.ndarray:
    """Scores of rows s:e of ea against every row of eb (unit vectors), -inf where either side
    failed to acquire."""
    blk = score_from_cosine(ea[s:e] @ eb.T).astype(np.float32)
    blk[~(oka[s:e, None] & okb[None, :])] = -np.inf
    return blk


def cross_scores(ea, oka, ida, fa, eb, okb, idb, fb, symmetric: bool, chunk: int = 1024, block=None):
    """Scores of all (a, b) pairs: impostors (identity differs) and extended genuine (same
    identity, different file), FTA -> -inf. ida/idb identity ids, fa/fb file ids (ints).
    symmetric: a and b are the same list; only i < j is used. `block(start, stop)`: the scores
    of rows start:stop against every b (FTA already -inf), instead of the cosine scores of
    ea/eb (the fused score, say)."""
    imp_parts, gen_parts = [], []
    ida, idb, fa, fb = (np.asarray(x) for x in (ida, idb, fa, fb))
    for s in range(0, len(ea), chunk):
        stop = min(s + chunk, len(ea))
        blk = cosine_block(ea, oka, eb, okb, s, stop) if block is None else np.asarray(block(s, stop), np.float32)
        same = ida[s:s + chunk, None] == idb[None, :]
        if symmetric:
            keep = np.arange(s, s + blk.shape[0])[:, None] < np.arange(len(eb))[None, :]
        else:
            keep = fa[s:s + chunk, None] != fb[None, :]
        imp_parts.append(blk[~same & keep])
        gen_parts.append(blk[same & keep])
    imp = np.concatenate(imp_parts) if imp_parts else np.zeros(0, np.float32)
    gen = np.concatenate(gen_parts) if gen_parts else np.zeros(0, np.float32)
    return imp, gen
