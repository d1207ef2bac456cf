"""The evaluation protocols on LFW View 2 (see models/eval/__init__.py for what they measure):
`evaluate(protocol, folds, pipeline, data_dir)` -> the report dict."""
from __future__ import annotations

import datetime as _dt
import hashlib
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from models.eval import PROTOCOLS, chipsim
from models.eval.embedder import Embedder
from models.eval.metrics import (TAR_FARS, ScoreSet, calibration_table, cosine_block, cross_scores, kfold_accuracy, roc_points,
                                 tar_at_far)
from models.eval.pairs import image_relpath, read_pairs, select_pairs
from models.eval.report import git_commit, pipeline_info, write_outputs
from service.face.score import normalize, similarity



def _identity(rel: str) -> str:
    return rel.split("/", 1)[0]


def _matrix(embedder: Embedder, rels: list[str], side: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    e = np.zeros((len(rels), dim), np.float32)
    ok = np.zeros(len(rels), bool)
    for i, r in enumerate(rels):
        v = embedder.emb.get((r, side))
        if v is not None:
            e[i] = v
            ok[i] = True
    return normalize(e), ok


def _pair_scores(embedder: Embedder, pairs, side_a: str, side_b: str):
    """Score of every pairs.txt line (-inf when a side failed to acquire) and its FTA codes."""
    scores, codes = [], []
    for p in pairs:
        ra, rb = image_relpath(p.a), image_relpath(p.b)
        a, b = embedder.emb.get((ra, side_a)), embedder.emb.get((rb, side_b))
        scores.append(similarity(a, b) if a is not None and b is not None else -math.inf)
        codes.append((embedder.fta.get((ra, side_a)), embedder.fta.get((rb, side_b))))
    return np.array(scores, np.float64), codes


class Grid:
    """Every family's embeddings of one image set as matrices (first-column images x second-
    column images), with identity and file ids: the extended sets are scored from it block by
    block, by cosine per family or through the fusion (`fused_sets`)."""

    def __init__(self, embedder: Embedder, rel_a, side_a, rel_b, side_b, dim: int):
        self.symmetric = rel_a is rel_b
        self.rel_a, self.rel_b = rel_a, rel_b
        self.E = {}
        for family, table in embedder.family_emb.items():
            view = SimpleNamespace(emb=table)
            a = _matrix(view, rel_a, side_a, dim)
            self.E[family] = (a, a if self.symmetric else _matrix(view, rel_b, side_b, dim))
        ident: dict[str, int] = {}
        files: dict[str, int] = {}

        def ids(rels):
            return ([ident.setdefault(_identity(r), len(ident)) for r in rels],
                    [files.setdefault(r, len(files)) for r in rels])
        self.ida, self.fa = ids(rel_a)
        self.idb, self.fb = ids(rel_b)

    def sets(self, family: str, block=None):
        """(impostor scores, extended genuine scores): cosine scores of `family`, or `block`'s."""
        (ea, oka), (eb, okb) = self.E[family]
        return cross_scores(ea, oka, self.ida, self.fa, eb, okb, self.idb, self.fb, symmetric=self.symmetric,
                            block=block)

    def cosine_block(self, family: str, s: int, e: int) -> np.ndarray:
        (ea, oka), (eb, okb) = self.E[family]
        return cosine_block(ea, oka, eb, okb, s, e)

    def snorm_stats(self, snorm) -> dict:
        """family -> ((mu, sd) of the first-column images, (mu, sd) of the second-column ones)."""
        out = {}
        for f, ((ea, _), (eb, _)) in self.E.items():
            if f in snorm.cohorts:
                a = snorm.stats(f, ea)
                out[f] = (a, a if self.symmetric else snorm.stats(f, eb))
        return out

    def pair_index(self, pairs) -> tuple[np.ndarray, np.ndarray]:
        ia = {r: i for i, r in enumerate(self.rel_a)}
        ib = {r: i for i, r in enumerate(self.rel_b)}
        return (np.array([ia[image_relpath(p.a)] for p in pairs], int),
                np.array([ib[image_relpath(p.b)] for p in pairs], int))


def _rows(stats: dict, s: int, e: int) -> dict:
    """Block s:e of the first-column statistics against every second-column one, broadcastable."""
    return {f: ((a[0][s:e, None], a[1][s:e, None]), (b[0][None, :], b[1][None, :])) for f, (a, b) in stats.items()}


def _at(stats: dict, ia, ib) -> dict:
    return {f: ((a[0][ia], a[1][ia]), (b[0][ib], b[1][ib])) for f, (a, b) in stats.items()}


def family_scores(embedder: Embedder, pairs, rel_a, side_a, rel_b, side_b, dim: int, extended: bool):
    """Per family of the embedder: {"pairs": pairs.txt scores (-inf on FTA), "imp": impostor
    scores, "ext_genuine": all same-identity pair scores (None unless `extended`)}, in the same
    order for every family; the pairs' FTA codes; and the `Grid` they came from (None unless
    `extended`)."""
    labels = np.array([p.same for p in pairs])
    out, codes = {}, None
    grid = Grid(embedder, rel_a, side_a, rel_b, side_b, dim) if extended else None
    for family, table in embedder.family_emb.items():
        view = SimpleNamespace(emb=table, fta=embedder.fta)
        scores, codes = _pair_scores(view, pairs, side_a, side_b)
        entry = {"pairs": scores, "imp": scores[~labels], "ext_genuine": None}
        if extended:
            entry["imp"], entry["ext_genuine"] = grid.sets(family)
        out[family] = entry
    return out, codes, grid


def fused_sets(fusion, per_family: dict, grid: Grid | None, pairs, labels, normalised: str | None = None) -> dict:
    """Through the one fused-score function (`Fusion.score`, with its s-norm when it has one):
    {"pairs", "imp", "ext_genuine"} of the fused score, or with `normalised=family` that
    family's score as the fusion weighs it (`Fusion.normalised`: what a fit regresses on).
    Without `grid`, impostors are the mismatched pairs.txt lines."""
    stats = grid.snorm_stats(fusion.snorm) if fusion.snorm is not None and grid is not None else None
    pair_stats = None
    if fusion.snorm is not None:
        if grid is None:
            raise ValueError("s-normed scores need the extended sets (their statistics come from the grid)")
        pair_stats = _at(stats, *grid.pair_index(pairs))

    def combine(scores, st):
        if normalised is not None:
            return fusion.normalised(normalised, scores[normalised], st)
        return fusion.score(scores, st)

    with np.errstate(invalid="ignore"):
        fused_pairs = np.asarray(combine({f: per_family[f]["pairs"] for f in fusion.families}, pair_stats), np.float64)
    fused_pairs[~np.isfinite(fused_pairs)] = -np.inf
    if grid is None:
        return {"pairs": fused_pairs, "imp": fused_pairs[~labels].astype(np.float32), "ext_genuine": None}

    def block(s: int, e: int) -> np.ndarray:
        scores = {f: grid.cosine_block(f, s, e) for f in fusion.families}
        with np.errstate(invalid="ignore"):
            out = np.asarray(combine(scores, None if stats is None else _rows(stats, s, e)), np.float64)
        out[~np.isfinite(out)] = -np.inf
        return out.astype(np.float32)

    imp, gen = grid.sets(fusion.families[0], block=block)
    return {"pairs": fused_pairs, "imp": imp, "ext_genuine": gen}


def served_scores(pipeline, per_family: dict, grid: Grid | None = None, pairs=None, labels=None) -> dict:
    """The scores the service decides on: the fusion's of the families' (the one fused-score
    function, `Fusion.score`, fed every image's s-norm statistics when the fusion has them),
    else the primary family's."""
    fusion = getattr(pipeline, "fusion", None)
    if fusion is None:
        return per_family[pipeline.primary]
    return fused_sets(fusion, per_family, grid, pairs, labels)


def _scoring_info(pipeline) -> dict:
    fusion = getattr(pipeline, "fusion", None)
    info = {"families": {f: t.version for f, t in pipeline.families.items()},
            "served": "fused" if fusion is not None else pipeline.primary}
    if fusion is not None:
        info["fusion"] = fusion.version
        info["rule"] = "a pair any family could not score is a reject (FTA = reject)"
    return info


def served_threshold(pipeline) -> dict | None:
    """The threshold the service serves with these models and settings (IDV_THRESHOLD, else
    IDV_FAR_TARGET looked up in the served score's calibration table, as service/face/loader.py
    does); None when the models ship no table to place it."""
    from service.face.decide import Threshold

    settings = getattr(pipeline, "settings", None)
    scored = getattr(pipeline, "fusion", None) or getattr(pipeline, "towers", None)
    if settings is None or scored is None:
        return None
    try:
        t = Threshold.from_settings(settings, scored.calibration)
    except ValueError:
        return None
    setting = (f"IDV_THRESHOLD={settings.threshold:g}" if settings.threshold is not None
               else f"IDV_FAR_TARGET={settings.far_target:g}")
    return {"score": t.score, "far_calibrated": t.far, "setting": setting}


def operating_point(genuine, imp_set: ScoreSet, threshold: float) -> dict:
    """FAR and TAR of this evaluation's scores at one threshold (accept: score >= threshold)."""
    genuine = np.asarray(genuine)
    return {"threshold": threshold, "far": imp_set.accepted(threshold) / max(1, imp_set.n),
            "tar": float((genuine >= threshold).mean()) if genuine.size else math.nan}


def _metrics(scores, labels, imp, ext_genuine, pairs, folds, curves: bool = True, served: dict | None = None) -> dict:
    genuine = scores[labels]
    imp_set = ScoreSet(imp.astype(np.float32, copy=False))
    out = {"genuine": genuine, "imp_set": imp_set, "tar": tar_at_far(genuine, imp_set, TAR_FARS), "tar_ext": None,
           "accuracy": kfold_accuracy(scores, labels, np.array([p.fold for p in pairs]), list(folds)),
           "curves": {}}

    def curve(gen) -> dict:
        c = roc_points(gen, imp_set)
        if served is not None:
            c["served"] = operating_point(gen, imp_set, served["score"])
        return c

    if curves:
        out["curves"][f"pairs.txt genuine ({genuine.size})"] = curve(genuine)
    if ext_genuine is not None and ext_genuine.size:
        out["tar_ext"] = tar_at_far(ext_genuine, imp_set, TAR_FARS)
        if curves:
            out["curves"][f"all same-identity pairs ({ext_genuine.size})"] = curve(ext_genuine)
    return out


def _fta_report(embedder: Embedder, rel_a, side_a, rel_b, codes, labels) -> dict:
    def block(rels, side):
        failed = {r: embedder.fta[(r, side)] for r in rels if (r, side) in embedder.fta}
        by_code: dict[str, int] = {}
        for c in failed.values():
            by_code[c] = by_code.get(c, 0) + 1
        return {"images": len(rels), "failed": len(failed), "rate": len(failed) / max(1, len(rels)),
                "by_code": by_code, "examples": sorted(failed)[:20]}

    fta = {"id": block(rel_a, "id")} if side_a == "id" else {}
    fta["live"] = block(rel_b if side_a == "id" else rel_a, "live")
    pair_fta = [c[0] is not None or c[1] is not None for c in codes]
    fta["pairs_with_fta"] = {"genuine": int(sum(f for f, s in zip(pair_fta, labels) if s)),
                             "mismatched": int(sum(f for f, s in zip(pair_fta, labels) if not s))}
    return fta


def _throughput(embedder: Embedder, n_items: int, analyse_s: float) -> dict:
    t = embedder.timings
    return {
        "items": n_items,
        "analyse_wall_s": round(analyse_s, 2),
        "images_per_s": round(n_items / analyse_s, 2) if analyse_s > 0 else None,
        # per call of the stage (chipsim: per chip; embed: per image, batched)
        "stage_ms_per_image": {k: round(v / max(1, embedder.counts.get(k, 0)), 3) for k, v in sorted(t.items())},
        "stage_total_s": {k: round(v / 1e3, 2) for k, v in sorted(t.items())},
        "batch_size": embedder.batch_size,
    }


def _chip_info(embedder: Embedder) -> dict:
    cb = np.array(embedder.chip_bytes) if embedder.chip_bytes else np.zeros(0)
    return {"version": chipsim.ENCODINGS[embedder.chip_encoding][0], "encoding": embedder.chip_encoding,
            "size": [chipsim.CHIP_W, chipsim.CHIP_H], "target_bytes": chipsim.TARGET_BYTES, "params": chipsim.PARAMS,
            "landmarks": embedder.chip_landmarks, "landmark_fallbacks": embedder.chip_fallbacks,
            "bytes": {"mean": float(cb.mean()) if cb.size else None,
                      "min": int(cb.min()) if cb.size else None,
                      "max": int(cb.max()) if cb.size else None}}


def evaluate(protocol: str, folds: list[int], pipeline, data_dir: Path | str, *,
             limit: int | None = None, extended_impostors: bool = True, seed: int = 0,
             out: Path | str | None = None, batch_size: int = 32, progress: bool = True,
             chip_landmarks: str = "fixed", chip_encoding: str = "rgb", embedder: Embedder | None = None,
             command: str | None = None, scores_out: dict | None = None) -> dict:
    """Run one protocol over `folds`; returns the report dict (and writes it to `out` if given).
    Pass an `embedder` to reuse embeddings across calls (e.g. several protocols/fold sets);
    `scores_out` (a dict) receives the per-family score arrays (`per_family`, `labels`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}")
    data_dir = Path(data_dir)
    pairs_path = data_dir / "lfw" / "pairs.txt"
    pairs = select_pairs(read_pairs(pairs_path), list(folds), limit)
    if not pairs:
        raise ValueError("no pairs selected")
    git = git_commit()  # the code that runs, not what HEAD is when the run ends
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
    analyse_s = time.perf_counter() - t0
    dim = next(iter(embedder.emb.values())).shape[0] if embedder.emb else 128

    labels = np.array([p.same for p in pairs])
    per_family, codes, grid = family_scores(embedder, pairs, rel_a, side_a, rel_b, side_b, dim, extended_impostors)
    served = served_scores(pipeline, per_family, grid, pairs, labels)
    if scores_out is not None:
        scores_out.update(per_family=per_family, labels=labels, grid=grid, pairs=pairs)
    scores, imp, ext_genuine = served["pairs"], served["imp"], served["ext_genuine"]
    if extended_impostors:
        impostor_desc = ("all cross-identity pairs: id side of every distinct first-column image vs live "
                         "side of every distinct second-column image" if side_a == "id" else
                         "all cross-identity unordered pairs among the distinct images (live/live)")
    else:
        impostor_desc = "mismatched pairs of pairs.txt"
    served_at = served_threshold(pipeline)
    m = _metrics(scores, labels, imp, ext_genuine, pairs, folds, served=served_at)
    genuine, imp_set, tar, tar_ext, accuracy, curves = (m[k] for k in ("genuine", "imp_set", "tar", "tar_ext",
                                                                        "accuracy", "curves"))
    families = None
    if len(per_family) > 1:  # each family alone, beside the served score
        families = {}
        for f, sc in per_family.items():
            fm = _metrics(sc["pairs"], labels, sc["imp"], sc["ext_genuine"], pairs, folds, curves=False)
            families[f] = {"model_version": pipeline.families[f].version, "accuracy": fm["accuracy"],
                           "tar_at_far": fm["tar"], "tar_at_far_extended_genuine": fm["tar_ext"],
                           "calibration": calibration_table(fm["imp_set"])}

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
        **pipeline_info(pipeline),
        "sides": {"first_column": side_a, "second_column": side_b},
        "chipsim": _chip_info(embedder) if side_a == "id" else None,
        "counts": {"pairs": len(pairs), "matched": int(labels.sum()), "mismatched": int((~labels).sum()),
                   "images_first_column": len(rel_a), "images_second_column": len(rel_b),
                   "genuine": int(genuine.size), "impostor": imp_set.n,
                   "extended_genuine": int(ext_genuine.size) if ext_genuine is not None else None},
        "impostors": impostor_desc,
        "accuracy": accuracy,
        "tar_at_far": tar,
        "tar_at_far_extended_genuine": tar_ext,
        "calibration": calibration_table(imp_set),
        "served_threshold": served_at and {**served_at, **operating_point(genuine, imp_set, served_at["score"])},
        "scoring": _scoring_info(pipeline),
        "families": families,
        "fta": _fta_report(embedder, rel_a, side_a, rel_b, codes, labels),
        "throughput": _throughput(embedder, len(set(items)), analyse_s),
    }
    if out is not None:
        write_outputs(report, pairs, scores, codes, curves, Path(out))
    return report
