"""`idverify eval`: verification accuracy on LFW View 2, plain or as ID-chip vs live (lfw-ivs).

Protocols
    lfw      both images of a pair go through the *live* tower (as JPEG bytes, full pipeline).
    lfw-ivs  the first image of each pair becomes a simulated ID-chip photo
             (`service.chipsim`, ~1 KB JPEG2000, 102x126, seeded per image) whose *bytes* go
             through the full pipeline (decode -> detect -> align -> id tower); the second image
             goes through the live tower. Chips are cropped with the fixed LFW eye positions by
             default (`--chip-landmarks fixed`), so the chip population does not change when the
             detector does; `--chip-landmarks detect` crops on the detected landmarks instead.

Metrics
    accuracy      the standard 10-fold protocol over the selected folds: for each test fold the
                  threshold that maximises accuracy on the *other selected* folds is applied to
                  it (ties: the middle of the best candidates; candidates are midpoints between
                  consecutive distinct scores). With a single fold there is nothing else to
                  train on, so the threshold is chosen on that fold itself; this is optimistic
                  and the report says so (`threshold_selection: "self"`). With folds 9,10 the
                  threshold for 9 comes from 10 and vice versa. Mean, std and standard error.
    TAR@FAR       genuine = the matched pairs of the selected folds; impostors = by default the
                  *extended* set: every cross-identity pair among the selected folds' images
                  (lfw-ivs: each distinct first-column image's chip on the id side against each
                  distinct second-column image on the live side; lfw: every unordered pair of
                  distinct images, live/live). `--no-extended-impostors` uses only the
                  mismatched pairs of pairs.txt. A pair is accepted when score >= threshold; the
                  threshold for FAR f is the lowest one that accepts at most floor(f * N)
                  impostors. FAR f is "resolvable" when f * N >= 1; below that the row says so.
                  The TAR on the extended genuine set (all same-identity image pairs) is given
                  too.
    FTA           failure to acquire (no face, face too small, undecodable) per side; a pair
                  with an FTA side gets score -inf: never accepted, counted in every
                  denominator, genuine and impostor alike.
    calibration   `calibration_table(impostor_scores)`: rows {"score", "far"} (plus the target
                  and counts) for FAR 1e-1 .. 1e-5 (1-2-5 steps) where resolvable, the format
                  `service.decide.Threshold.from_calibration` reads.

Outputs (--out, default reports/<protocol>-folds<...>): report.json (numbers, config, model
version, manifest SHA-256, command line, timestamp, git commit), roc.png, det.png,
pair_scores.csv (one row per pairs.txt line).

Throughput: each (image, side) is analysed once; chips are embedded in batches
(`--batch-size`); per-stage times and images/s are printed and reported.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROTOCOLS = ("lfw", "lfw-ivs")
DEFAULT_FOLDS = {"lfw": "1-10", "lfw-ivs": "9,10"}
TAR_FARS = (1e-2, 1e-3, 1e-4)
CALIBRATION_FARS = tuple(m * 10.0 ** -e for e in range(1, 6) for m in (5, 2, 1) if not (e == 1 and m != 1))
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    fold: int            # 1..10
    a: tuple[str, int]   # (name, image number): first column (id side in lfw-ivs)
    b: tuple[str, int]   # second column (live side)
    same: bool


def image_relpath(img: tuple[str, int]) -> str:
    """Path of an LFW image relative to data_dir/lfw/images."""
    name, idx = img
    return f"{name}/{name}_{idx:04d}.jpg"


def read_pairs(path: Path | str) -> list[Pair]:
    """LFW View 2 pairs.txt: header "folds n", then per fold n matched and n mismatched lines."""
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    n_folds, n = int(lines[0][0]), int(lines[0][1])
    rows = lines[1:]
    if len(rows) != n_folds * 2 * n:
        raise ValueError(f"{path}: expected {n_folds * 2 * n} pair lines, found {len(rows)}")
    pairs = []
    for k, r in enumerate(rows):
        fold = k // (2 * n) + 1
        if len(r) == 3:
            pairs.append(Pair(fold, (r[0], int(r[1])), (r[0], int(r[2])), True))
        elif len(r) == 4:
            pairs.append(Pair(fold, (r[0], int(r[1])), (r[2], int(r[3])), False))
        else:
            raise ValueError(f"{path}: bad pair line {' '.join(r)!r}")
        if pairs[-1].same != ((k % (2 * n)) < n):
            raise ValueError(f"{path}: line {k + 2} is not where View 2 puts a {'matched' if len(r) == 3 else 'mismatched'} pair")
    return pairs


def parse_folds(text: str) -> list[int]:
    """'1-10', '9,10', '1,3-5' -> sorted fold numbers in 1..10."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            out.update(range(lo, hi + 1))
        else:
            out.add(int(part))
    if not out or min(out) < 1 or max(out) > 10:
        raise ValueError(f"folds must be within 1..10, got {text!r}")
    return sorted(out)


def select_pairs(pairs: list[Pair], folds: list[int], limit: int | None = None) -> list[Pair]:
    """Pairs of the given folds; with `limit`, at most that many per fold, half matched and half
    mismatched (the first of each, in file order)."""
    out = []
    for f in folds:
        fp = [p for p in pairs if p.fold == f]
        if limit is not None:
            same = [p for p in fp if p.same][: (limit + 1) // 2]
            diff = [p for p in fp if not p.same][: limit // 2]
            fp = same + diff
        out.extend(fp)
    return out


# --------------------------------------------------------------------------- metrics


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


def plot_curves(curves: dict[str, dict], out_dir: Path, title: str) -> dict[str, str]:
    """roc.png (TAR vs FAR, log FAR) and det.png (FNMR vs FMR on normal-deviate axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for label, c in curves.items():
        far = np.asarray(c["far"])
        keep = far > 0
        ax.plot(far[keep], np.asarray(c["tar"])[keep], label=label)
    for f in TAR_FARS:
        ax.axvline(f, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_ylim(0, 1.005)
    ax.grid(True, which="major", alpha=0.4)
    ax.set_title(f"ROC - {title}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    roc = out_dir / "roc.png"
    fig.savefig(roc)
    plt.close(fig)

    # axes down to half the resolution of the counts (FMR 1/N_impostor, FNMR 1/N_genuine)
    x_lo = max(1e-7, min([0.5 / max(1, c.get("n_impostors", 0)) for c in curves.values()] + [1e-3]))
    y_lo = max(1e-7, min([0.5 / max(1, c.get("n_genuine", 0)) for c in curves.values()] + [1e-2]))
    eps = min(x_lo, y_lo)
    all_ticks = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5)
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    for label, c in curves.items():
        far = np.clip(np.asarray(c["far"]), x_lo, 1 - eps)
        fnmr = np.clip(1.0 - np.asarray(c["tar"]), y_lo, 1 - eps)
        ax.plot(norm.ppf(far), norm.ppf(fnmr), label=label)
    xt = [t for t in all_ticks if t >= x_lo]
    yt = [t for t in all_ticks if t >= y_lo]
    ax.set_xticks(norm.ppf(xt), [f"{t:g}" for t in xt])
    ax.set_yticks(norm.ppf(yt), [f"{t:g}" for t in yt])
    ax.set_xlim(norm.ppf(x_lo), norm.ppf(0.5))
    ax.set_ylim(norm.ppf(y_lo), norm.ppf(0.5))
    ax.set_xlabel("FMR (false match rate)")
    ax.set_ylabel("FNMR (false non-match rate)")
    ax.grid(True, alpha=0.4)
    ax.set_title(f"DET - {title}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    det = out_dir / "det.png"
    fig.savefig(det)
    plt.close(fig)
    return {"roc": roc.name, "det": det.name}


# --------------------------------------------------------------------------- embedding


FIELD = {"id": "id_photo", "live": "live_photo"}


class Embedder:
    """Runs (image, side) items through the pipeline once each and keeps the embeddings.

    Uses `Pipeline.prepare` (decode -> detect -> select -> size check -> align) and embeds the
    aligned chips in batches; `tests/test_evaluate.py` checks that the result equals
    `analyse(...).embedding`. The id side gets simulated chip bytes, the live side the file bytes.
    """

    def __init__(self, pipeline, data_dir: Path, *, seed: int = 0, chip_landmarks: str = "fixed",
                 chip_encoding: str = "rgb",
                 batch_size: int = 32, progress: bool = True):
        self.pipeline = pipeline
        self.images_dir = Path(data_dir) / "lfw" / "images"
        self.seed = int(seed)
        self.chip_landmarks = chip_landmarks
        self.chip_encoding = chip_encoding
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self.timings: dict[str, float] = {}   # stage -> total ms
        self.counts: dict[str, int] = {}      # stage -> calls
        self.emb: dict[tuple[str, str], np.ndarray] = {}
        self.fta: dict[tuple[str, str], str] = {}
        self.chip_bytes: list[int] = []
        self.chip_fallbacks = 0
        self.wall_s = 0.0

    # bytes for one item -------------------------------------------------------------------
    def _add(self, stage: str, ms: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + ms
        self.counts[stage] = self.counts.get(stage, 0) + 1

    def chip_for(self, rel: str) -> bytes:
        from PIL import Image

        from service import chipsim
        from service.detect import select_face

        t0 = time.perf_counter()
        with Image.open(self.images_dir / rel) as im:
            img = np.asarray(im.convert("RGB"))
        landmarks = None
        if self.chip_landmarks == "detect":
            faces = self.pipeline.detector.detect(img)
            if faces:
                landmarks = select_face(faces, img.shape).landmarks
            else:
                self.chip_fallbacks += 1
        data = chipsim.simulate_chip(img, landmarks, chipsim.chip_rng(f"lfw/images/{rel}", self.seed),
                                     encoding=self.chip_encoding)
        self._add("chipsim", (time.perf_counter() - t0) * 1e3)
        self.chip_bytes.append(len(data))
        return data

    def prepare(self, data: bytes, field: str) -> np.ndarray:
        """decode -> detect -> select -> size check -> align: `Pipeline.prepare`, timed here."""
        timings: dict[str, float] = {}
        try:
            return self.pipeline.prepare(data, field, timings)[1]
        finally:
            for stage, ms in timings.items():
                self._add(stage, ms)

    def _flush(self, side: str, keys: list, chips: list) -> None:
        if not chips:
            return
        t0 = time.perf_counter()
        out = self.pipeline.tower(FIELD[side]).embed(np.stack(chips))
        self.timings["embed"] = self.timings.get("embed", 0.0) + (time.perf_counter() - t0) * 1e3
        self.counts["embed"] = self.counts.get("embed", 0) + len(chips)
        for k, e in zip(keys, out):
            self.emb[k] = np.asarray(e, dtype=np.float32)
        keys.clear()
        chips.clear()

    def run(self, items: list[tuple[str, str]]) -> None:
        """items: (relpath, side) with side in {"id", "live"}; already-done items are skipped."""
        from tqdm import tqdm

        from service.errors import ApiError

        todo = [it for it in dict.fromkeys(items) if it not in self.emb and it not in self.fta]
        todo.sort(key=lambda it: (it[1], it[0]))
        t_start = time.perf_counter()
        pending: dict[str, tuple[list, list]] = {"id": ([], []), "live": ([], [])}
        bar = tqdm(todo, desc="analyse", unit="img", disable=not self.progress, mininterval=1.0)
        for rel, side in bar:
            try:
                if side == "id":
                    data = self.chip_for(rel)
                else:
                    t0 = time.perf_counter()
                    data = (self.images_dir / rel).read_bytes()
                    self._add("read", (time.perf_counter() - t0) * 1e3)
                chip = self.prepare(data, FIELD[side])
            except ApiError as exc:
                self.fta[(rel, side)] = exc.code
                continue
            keys, chips = pending[side]
            keys.append((rel, side))
            chips.append(chip)
            if len(chips) >= self.batch_size:
                self._flush(side, keys, chips)
        for side, (keys, chips) in pending.items():
            self._flush(side, keys, chips)
        self.wall_s += time.perf_counter() - t_start
        bar.close()


# --------------------------------------------------------------------------- evaluation


def _identity(rel: str) -> str:
    return rel.split("/", 1)[0]


def _matrix(embedder: Embedder, rels: list[str], side: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    from service.score import normalize

    e = np.zeros((len(rels), dim), np.float32)
    ok = np.zeros(len(rels), bool)
    for i, r in enumerate(rels):
        v = embedder.emb.get((r, side))
        if v is not None:
            e[i] = v
            ok[i] = True
    return normalize(e), ok


def _cross_scores(ea, oka, ida, fa, eb, okb, idb, fb, symmetric: bool, chunk: int = 1024):
    """Scores of all (a, b) pairs: impostors (identity differs) and extended genuine (same
    identity, different file), FTA -> -inf. ida/idb identity ids, fa/fb file ids (ints).
    symmetric: a and b are the same list; only i < j is used."""
    imp_parts, gen_parts = [], []
    ida, idb, fa, fb = (np.asarray(x) for x in (ida, idb, fa, fb))
    for s in range(0, len(ea), chunk):
        blk = np.clip((1.0 + ea[s:s + chunk] @ eb.T) / 2.0, 0.0, 1.0).astype(np.float32)
        blk[~(oka[s:s + chunk, None] & okb[None, :])] = -np.inf
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


def _git_commit() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001 - report what we can
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _pipeline_info(pipeline) -> dict:
    info = {"model_version": getattr(pipeline, "model_version", None)}
    towers = getattr(pipeline, "towers", None)
    folder = getattr(towers, "folder", None)
    if folder is not None and (Path(folder) / "manifest.json").exists():
        info["manifest_path"] = str(folder / "manifest.json")
        info["manifest_sha256"] = hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest()
    s = getattr(pipeline, "settings", None)
    if s is not None:
        info["settings"] = {k: getattr(s, k, None) for k in (
            "providers", "onnx_threads", "min_face_px", "detect_max_side", "detect_min_side",
            "towers", "tower_version")}
    return info


def evaluate(protocol: str, folds: list[int], pipeline, data_dir: Path | str, *,
             limit: int | None = None, extended_impostors: bool = True, seed: int = 0,
             out: Path | str | None = None, batch_size: int = 32, progress: bool = True,
             chip_landmarks: str = "fixed", chip_encoding: str = "rgb", embedder: Embedder | None = None,
             command: str | None = None) -> dict:
    """Run one protocol over `folds`; returns the report dict (and writes it to `out` if given).
    Pass an `embedder` to reuse embeddings across calls (e.g. several protocols/fold sets)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}")
    data_dir = Path(data_dir)
    pairs_path = data_dir / "lfw" / "pairs.txt"
    pairs = select_pairs(read_pairs(pairs_path), list(folds), limit)
    if not pairs:
        raise ValueError("no pairs selected")
    git = _git_commit()  # the code that runs, not what HEAD is when the run ends
    side_a = "id" if protocol == "lfw-ivs" else "live"
    side_b = "live"
    if embedder is None:
        embedder = Embedder(pipeline, data_dir, seed=seed, chip_landmarks=chip_landmarks, chip_encoding=chip_encoding,
                            batch_size=batch_size, progress=progress)

    rel_a = sorted({image_relpath(p.a) for p in pairs})
    rel_b = sorted({image_relpath(p.b) for p in pairs})
    if side_a == side_b:  # lfw: one pool of images, all on the live side
        rel_a = rel_b = sorted(set(rel_a) | set(rel_b))
    items = [(r, side_a) for r in rel_a] + [(r, side_b) for r in rel_b]
    t0 = time.perf_counter()
    embedder.run(items)
    n_items = len(set(items))
    analyse_s = time.perf_counter() - t0
    dim = next(iter(embedder.emb.values())).shape[0] if embedder.emb else 128

    # pair scores (pairs.txt lines)
    from service.score import similarity

    def emb(rel, side):
        return embedder.emb.get((rel, side))

    scores, codes = [], []
    for p in pairs:
        ra, rb = image_relpath(p.a), image_relpath(p.b)
        a, b = emb(ra, side_a), emb(rb, side_b)
        scores.append(similarity(a, b) if a is not None and b is not None else -math.inf)
        codes.append((embedder.fta.get((ra, side_a)), embedder.fta.get((rb, side_b))))
    scores = np.array(scores, np.float64)
    labels = np.array([p.same for p in pairs])
    pair_folds = np.array([p.fold for p in pairs])

    accuracy = kfold_accuracy(scores, labels, pair_folds, list(folds))

    # verification sets
    genuine = scores[labels]
    ext_genuine = None
    if extended_impostors:
        ea, oka = _matrix(embedder, rel_a, side_a, dim)
        eb, okb = (ea, oka) if rel_a is rel_b else _matrix(embedder, rel_b, side_b, dim)
        ident: dict[str, int] = {}
        files: dict[str, int] = {}
        def ids(rels):
            return ([ident.setdefault(_identity(r), len(ident)) for r in rels],
                    [files.setdefault(r, len(files)) for r in rels])
        ida, fa = ids(rel_a)
        idb, fb = ids(rel_b)
        imp, gen_x = _cross_scores(ea, oka, ida, fa, eb, okb, idb, fb, symmetric=rel_a is rel_b)
        ext_genuine = gen_x
        impostor_desc = ("all cross-identity pairs: id side of every distinct first-column image vs live "
                         "side of every distinct second-column image" if side_a == "id" else
                         "all cross-identity unordered pairs among the distinct images (live/live)")
    else:
        imp = scores[~labels]
        impostor_desc = "mismatched pairs of pairs.txt"
    imp_set = ScoreSet(imp.astype(np.float32, copy=False))
    tar = tar_at_far(genuine, imp_set, TAR_FARS)
    cal = calibration_table(imp_set)
    curves = {f"pairs.txt genuine ({genuine.size})": roc_points(genuine, imp_set)}
    tar_ext = None
    if ext_genuine is not None and ext_genuine.size:
        tar_ext = tar_at_far(ext_genuine, imp_set, TAR_FARS)
        curves[f"all same-identity pairs ({ext_genuine.size})"] = roc_points(ext_genuine, imp_set)

    # failures to acquire
    def fta_block(rels, side):
        failed = {r: embedder.fta[(r, side)] for r in rels if (r, side) in embedder.fta}
        by_code: dict[str, int] = {}
        for c in failed.values():
            by_code[c] = by_code.get(c, 0) + 1
        return {"images": len(rels), "failed": len(failed), "rate": len(failed) / max(1, len(rels)),
                "by_code": by_code, "examples": sorted(failed)[:20]}

    fta = {"id": fta_block(rel_a, "id")} if side_a == "id" else {}
    fta["live"] = fta_block(rel_b if side_a == "id" else rel_a, "live")
    pair_fta = [c[0] is not None or c[1] is not None for c in codes]
    fta["pairs_with_fta"] = {"genuine": int(sum(f for f, s in zip(pair_fta, labels) if s)),
                            "mismatched": int(sum(f for f, s in zip(pair_fta, labels) if not s))}

    t = embedder.timings
    throughput = {
        "items": n_items,
        "analyse_wall_s": round(analyse_s, 2),
        "images_per_s": round(n_items / analyse_s, 2) if analyse_s > 0 else None,
        # per call of the stage (chipsim: per chip; embed: per image, batched)
        "stage_ms_per_image": {k: round(v / max(1, embedder.counts.get(k, 0)), 3) for k, v in sorted(t.items())},
        "stage_total_s": {k: round(v / 1e3, 2) for k, v in sorted(t.items())},
        "batch_size": embedder.batch_size,
    }

    chip_info = None
    if side_a == "id":
        from service import chipsim
        cb = np.array(embedder.chip_bytes) if embedder.chip_bytes else np.zeros(0)
        chip_info = {"version": chipsim.ENCODINGS[embedder.chip_encoding][0], "encoding": embedder.chip_encoding, "size": [chipsim.CHIP_W, chipsim.CHIP_H],
                     "target_bytes": chipsim.TARGET_BYTES, "params": chipsim.PARAMS,
                     "landmarks": embedder.chip_landmarks, "landmark_fallbacks": embedder.chip_fallbacks,
                     "bytes": {"mean": float(cb.mean()) if cb.size else None,
                               "min": int(cb.min()) if cb.size else None,
                               "max": int(cb.max()) if cb.size else None}}

    report = {
        "protocol": protocol,
        "folds": list(folds),
        "limit": limit,
        "seed": seed,
        "command": command if command is not None else " ".join(sys.argv),
        "argv": list(sys.argv),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git,
        "data_dir": str(data_dir),
        "pairs_sha256": hashlib.sha256(pairs_path.read_bytes()).hexdigest(),
        **_pipeline_info(pipeline),
        "sides": {"first_column": side_a, "second_column": side_b},
        "chipsim": chip_info,
        "counts": {"pairs": len(pairs), "matched": int(labels.sum()), "mismatched": int((~labels).sum()),
                   "images_first_column": len(rel_a), "images_second_column": len(rel_b),
                   "genuine": int(genuine.size), "impostor": imp_set.n,
                   "extended_genuine": int(ext_genuine.size) if ext_genuine is not None else None},
        "impostors": impostor_desc,
        "accuracy": accuracy,
        "tar_at_far": tar,
        "tar_at_far_extended_genuine": tar_ext,
        "calibration": cal,
        "fta": fta,
        "throughput": throughput,
    }
    if out is not None:
        write_outputs(report, pairs, scores, codes, curves, Path(out))
    return report


def _json_default(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _finite(o):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(o, float) and not math.isfinite(o):
        return "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_outputs(report: dict, pairs: list[Pair], scores, codes, curves, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    title = f"{report['protocol']} folds {','.join(map(str, report['folds']))} - {report.get('model_version')}"
    report["plots"] = plot_curves(curves, out, title)
    with open(out / "pair_scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", "name1", "n1", "name2", "n2", "same", "score", "fta1", "fta2"])
        for p, s, c in zip(pairs, scores, codes):
            w.writerow([p.fold, p.a[0], p.a[1], p.b[0], p.b[1], int(p.same),
                        f"{s:.6f}" if math.isfinite(s) else "-inf", c[0] or "", c[1] or ""])
    report["files"] = {"report": "report.json", "pair_scores": "pair_scores.csv", **report["plots"]}
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2, default=_json_default) + "\n")


def summary_lines(report: dict) -> list[str]:
    acc = report["accuracy"]
    c = report["counts"]
    lines = [
        f"protocol {report['protocol']}  folds {','.join(map(str, report['folds']))}  model {report.get('model_version')}",
        f"accuracy {acc['mean'] * 100:.2f}% +- {acc['standard_error'] * 100:.2f}% (s.e.; std {acc['std'] * 100:.2f}%; threshold from {acc['threshold_selection']})",
        f"genuine {c['genuine']}  impostor {c['impostor']} ({report['impostors']})",
    ]
    for r in report["tar_at_far"]:
        note = "" if r["resolvable"] else "  (not resolvable)"
        lines.append(f"TAR@FAR={r['far_target']:g}: {r['tar'] * 100:.2f}%  threshold {r['threshold']:.4f}  observed FAR {r['far']:.2e}{note}")
    if report.get("tar_at_far_extended_genuine"):
        ext = ", ".join(f"{r['tar'] * 100:.2f}%@{r['far_target']:g}" for r in report["tar_at_far_extended_genuine"])
        lines.append(f"TAR, all {c['extended_genuine']} same-identity pairs: {ext}")
    for side, b in report["fta"].items():
        if side != "pairs_with_fta":
            lines.append(f"FTA {side}: {b['failed']}/{b['images']} ({b['rate'] * 100:.2f}%) {b['by_code']}")
    lines.append(f"pairs with an FTA side: {report['fta']['pairs_with_fta']}")
    tp = report["throughput"]
    lines.append(f"throughput {tp['images_per_s']} images/s over {tp['items']} (image, side) items; "
                 f"ms/image {tp['stage_ms_per_image']}")
    return lines


# --------------------------------------------------------------------------- CLI


def load_pipeline(settings=None):
    """The service pipeline for evaluation. Evaluation never uses the decision threshold, so a
    model without a calibration table yet (the table is what evaluation produces) is loaded
    with a placeholder fixed threshold instead of refusing."""
    from service.pipeline import Pipeline
    from service.settings import get_settings

    settings = settings or get_settings()
    try:
        return Pipeline.from_settings(settings)
    except ValueError as exc:
        if "calibration" not in str(exc) or settings.threshold is not None:
            raise
        return Pipeline.from_settings(settings.model_copy(update={"threshold": 0.5}))


def register(sub) -> None:
    p = sub.add_parser("eval", help="verification accuracy on LFW (lfw) or simulated chip vs live (lfw-ivs)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=PROTOCOLS, default="lfw")
    p.add_argument("--folds", default=None, help="e.g. 1-10 or 9,10 (default: lfw 1-10, lfw-ivs 9,10)")
    p.add_argument("--out", default=None, help="report folder (default reports/<protocol>-folds<...>)")
    p.add_argument("--data-dir", default=None, help="data root holding lfw/ (default: settings.data_dir, IDV_DATA_DIR)")
    p.add_argument("--limit", type=int, default=None, help="at most N pairs per fold (half matched, half mismatched)")
    p.add_argument("--extended-impostors", "--extended", dest="extended_impostors",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="impostors = all cross-identity image pairs of the selected folds (default) "
                        "or only the mismatched pairs of pairs.txt")
    p.add_argument("--seed", type=int, default=0, help="global seed of the chip simulator")
    p.add_argument("--chip-landmarks", choices=("fixed", "detect"), default="fixed")
    p.add_argument("--chip-encoding", choices=("rgb", "ycc"), default="rgb",
                   help="JPEG2000 colour handling of simulated chips: rgb (harsher, default) or ycc (see service/chipsim.py)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--write-docs", action="store_true",
                   help="put the summary, command and machine into docs/benchmarks.md (one section per protocol and folds)")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from service.settings import get_settings

    settings = get_settings()
    data_dir = Path(args.data_dir) if args.data_dir else Path(settings.data_dir)
    folds = parse_folds(args.folds or DEFAULT_FOLDS[args.protocol])
    fold_tag = "-".join(map(str, folds)) if len(folds) < 10 else "1-10"
    tag = f"{args.protocol}-folds{fold_tag}" + ("-ycc" if args.protocol == "lfw-ivs" and args.chip_encoding == "ycc" else "")
    out = Path(args.out) if args.out else ROOT / "reports" / tag
    if not (data_dir / "lfw" / "pairs.txt").exists():
        print(f"error: {data_dir / 'lfw' / 'pairs.txt'} not found (set --data-dir or IDV_DATA_DIR)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    pipeline = load_pipeline(settings)
    if hasattr(pipeline, "warmup"):
        pipeline.warmup()
    print(f"loaded {pipeline.model_version} in {time.perf_counter() - t0:.1f}s; onnx threads "
          f"{settings.onnx_threads or 'default'}; cpu count {os.cpu_count()}", file=sys.stderr)
    report = evaluate(args.protocol, folds, pipeline, data_dir, limit=args.limit,
                      extended_impostors=args.extended_impostors, seed=args.seed, out=out,
                      batch_size=args.batch_size, progress=not args.no_progress,
                      chip_landmarks=args.chip_landmarks, chip_encoding=args.chip_encoding,
                      command="idverify " + " ".join(sys.argv[1:]))
    for line in summary_lines(report):
        print(line)
    print(f"report: {out / 'report.json'}")
    if args.write_docs:
        write_docs_section(report, out)
    return 0


def _machine() -> str:
    import platform
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
            f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end (shared machine)")


def write_docs_section(report: dict, out: Path, doc: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Replace (or append) this protocol+folds section of docs/benchmarks.md."""
    enc = (report.get("chipsim") or {}).get("encoding")
    variant = f", {enc} chips" if enc and enc != "rgb" else ""
    tag = f"idverify eval {report['protocol']} folds {','.join(map(str, report['folds']))}{variant}"
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    c, acc = report["counts"], report["accuracy"]
    rows = ["| FAR | TAR (pairs.txt genuine) | TAR (all same-identity pairs) | threshold | observed FAR | note |",
            "| ---: | ---: | ---: | ---: | ---: | --- |"]
    ext = {r["far_target"]: r for r in (report.get("tar_at_far_extended_genuine") or [])}
    for r in report["tar_at_far"]:
        e = ext.get(r["far_target"])
        rows.append(f"| {r['far_target']:g} | {r['tar'] * 100:.2f}% | {e['tar'] * 100:.2f}% | " if e else
                    f"| {r['far_target']:g} | {r['tar'] * 100:.2f}% | - | ")
        rows[-1] += (f"{r['threshold']:.4f} | {r['far']:.2e} | "
                     f"{'' if r['resolvable'] else 'not resolvable'} |")
    fta = "; ".join(f"{k} {v['failed']}/{v['images']}" for k, v in report["fta"].items() if k != "pairs_with_fta")
    tp = report["throughput"]
    chip = report.get("chipsim")
    try:
        out_rel = out.resolve().relative_to(ROOT)
    except ValueError:
        out_rel = out
    body = "\n".join([
        f"Command: `{report['command']}` (commit {(report['git']['commit'] or '?')[:7]}"
        f"{', dirty tree' if report['git']['dirty'] else ''}; {report['timestamp']}; report `{out_rel}/report.json`)",
        "",
        f"Machine: {_machine()}; throughput {tp['images_per_s']} images/s over {tp['items']} (image, side) items.",
        "",
        f"Model `{report.get('model_version')}` (manifest sha256 {str(report.get('manifest_sha256'))[:12]}...)"
        + (f"; chips {chip['version']}, mean {chip['bytes']['mean']:.0f} B" if chip else ""),
        "",
        f"Accuracy ({len(report['folds'])}-fold, threshold from {acc['threshold_selection']}): "
        f"**{acc['mean'] * 100:.2f}%** +- {acc['standard_error'] * 100:.2f}% (s.e.), std {acc['std'] * 100:.2f}%. "
        f"Genuine {c['genuine']}, impostor {c['impostor']:,} ({report['impostors']}); FTA {fta}.",
        "",
        *rows,
    ])
    section = f"{start}\n{body}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + section + text[b:]
    else:
        if "## Verification accuracy" not in text:
            text = text.rstrip("\n") + "\n\n## Verification accuracy (`idverify eval`)\n"
        text = text.rstrip("\n") + f"\n\n### {report['protocol']}, folds {','.join(map(str, report['folds']))}{variant}\n\n{section}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
