"""SFace alone, dlib dual-v2 alone, and the two fused, on LFW-IvS and LFW (a measurement).

    cd <repo> && .venv/bin/python -m studies.sface_fusion [--data-dir DIR] [--lfw-folds 1-10]
                                                          [--no-lfw] [--no-docs]

Protocol: `service/evaluate.py`'s lfw-ivs (pairs.txt of the selected folds; the first image of
each pair becomes a simulated chip (service.chipsim, fixed LFW eye positions, seed 0) whose bytes
go through decode -> MTCNN -> select -> size check -> align; the second image's file bytes go
through the same on the live side; extended impostors = every cross-identity (chip, live) pair
among the folds' images; FTA = score -inf, i.e. rejected) and lfw (live/live, 10-fold accuracy).
Both families share decode and detection (`Pipeline.prepare`, run once per item); the landmarks
are aligned twice: to the dlib template (150 px, towers/dual-v2 id/live towers, flip-averaged as
its manifest says) and to SFace's template (112 px, models/repository/sface/2, embedded plain and
mirrored: `sface` is the plain crop, `sface_flip` the mean of the two unit vectors).

Fusion (parameters fit on fold 8 only, reported on folds 9-10; nothing is tuned on 9-10):
  zsum  per family z = (s - mean) / std, mean and std over fold 8's finite impostor (extended)
        and genuine (pairs.txt) scores together; fused = z_dlib + z_sface
  lr    logistic regression on (z_dlib, z_sface), fold 8 genuine (pairs.txt and all other
        same-identity pairs) vs extended impostors, classes weighted equally, L2 1e-4;
        fused = the logit
For LFW 10-fold accuracy the fusion of each test fold is fit on the other nine folds' pairs.txt
scores (then the threshold as in kfold_accuracy), so no test fold sees its own labels.

Metrics come from service.evaluate (tar_at_far, ScoreSet, kfold_accuracy, _cross_scores,
_matrix). Embeddings are cached in .cache/sface_study/ (one .npz per side/encoding, keyed by
the model manifests and chip settings; checkpointed every --checkpoint items), so an interrupted
run resumes and a rerun only recomputes the metrics. Single-threaded: onnxruntime 1 thread, cv2
1 thread. Results go to .cache/sface_study/results.json and, unless --no-docs, docs/sface.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "sface_study"
SFACE_DIR = ROOT / "models" / "repository" / "sface" / "2"
DLIB_VERSION = "dual-v2"
FIT_FOLD = 8
TEST_FOLDS = (9, 10)
ENCODINGS = ("rgb", "ycc")
FAMILIES = ("dlib", "sface", "sface_flip")
FARS = (1e-2, 1e-3, 1e-4)
DOC = ROOT / "docs" / "sface.md"


# --------------------------------------------------------------------------- embedding


def load_models(threads: int = 1):
    """(pipeline with towers/dual-v2 on `threads` onnxruntime threads, SFace Tower, SFace manifest)."""
    from service.face.artifacts import load_manifest, verify_file
    from service.face.embed import Tower
    from service.face.loader import load_pipeline
    from service.settings import get_settings

    settings = get_settings().model_copy(update={"onnx_threads": threads, "tower_version": DLIB_VERSION,
                                                 "providers": "cpu"})
    pipeline = load_pipeline(settings)
    manifest = load_manifest(SFACE_DIR)
    sface = Tower(verify_file(SFACE_DIR, manifest["towers"]["live"]), ["CPUExecutionProvider"], threads)
    return pipeline, sface, manifest


def make_embedder(pipeline, sface, sface_manifest, data_dir: Path, encoding: str, batch_size: int):
    """service.evaluate.Embedder that aligns each detected face for both families."""
    from service.face.align import align
    from service.face.decode import decode_image
    from models.eval.embedder import Embedder
    from service.face.score import normalize

    template = np.asarray(sface_manifest["template"]["points"], np.float32)
    size = int(sface_manifest["template"]["size"])

    class TwoFamilyEmbedder(Embedder):
        def __init__(self):
            super().__init__(pipeline, data_dir, chip_encoding=encoding, batch_size=batch_size, progress=False)
            self.families = {f: {} for f in FAMILIES}

        def prepare(self, data: bytes, field: str):
            timings: dict[str, float] = {}
            try:
                side, chip = self.pipeline.prepare(data, field, timings)
                t0 = time.perf_counter()
                image = decode_image(data, field, self.pipeline.settings)  # prepare does not hand it out
                sf = align(image, side.face.landmarks, template, size)
                timings["align_sface"] = (time.perf_counter() - t0) * 1e3
            finally:
                for stage, ms in timings.items():
                    self._add(stage, ms)
            return chip, sf

        def _flush(self, side: str, keys: list, chips: list) -> None:
            if not chips:
                return
            from models.eval.embedder import FIELD

            t0 = time.perf_counter()
            dl = self.pipeline.tower(FIELD[side]).embed(np.stack([c[0] for c in chips]))
            t1 = time.perf_counter()
            x = np.stack([c[1] for c in chips])
            out = normalize(sface.embed(np.concatenate([x, x[:, :, ::-1]])))
            n = len(x)
            self._add("embed_dlib", (t1 - t0) * 1e3)
            self._add("embed_sface_x2", (time.perf_counter() - t1) * 1e3)
            for k, a, p, q in zip(keys, dl, out[:n], normalize(out[:n] + out[n:])):
                self.emb[k] = a
                self.families["dlib"][k] = a
                self.families["sface"][k] = p
                self.families["sface_flip"][k] = q
            keys.clear()
            chips.clear()

    return TwoFamilyEmbedder()


def cache_key(pipeline, sface_manifest, encoding: str | None) -> str:
    from models.eval import chipsim

    h = hashlib.sha256()
    h.update(json.dumps(pipeline.towers.manifest["towers"], sort_keys=True).encode())
    h.update(json.dumps(sface_manifest["towers"], sort_keys=True).encode())
    h.update(json.dumps([pipeline.settings.min_face_px, pipeline.settings.detect_min_side,
                         pipeline.settings.detect_max_side]).encode())
    if encoding:
        h.update(json.dumps([chipsim.ENCODINGS[encoding], chipsim.PARAMS], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def cache_path(side: str, encoding: str | None) -> Path:
    return CACHE / (f"{side}-{encoding}.npz" if side == "id" else "live.npz")


def load_cache(emb, side: str, encoding: str | None, key: str) -> None:
    path = cache_path(side, encoding)
    if not path.exists():
        return
    z = np.load(path, allow_pickle=False)
    if str(z["key"]) != key:
        print(f"{path.name}: models or chip settings changed, recomputing", file=sys.stderr)
        return
    for rel, a, p, q in zip(z["rels"], z["dlib"], z["sface"], z["sface_flip"]):
        k = (str(rel), side)
        emb.emb[k] = a
        for f, v in zip(FAMILIES, (a, p, q)):
            emb.families[f][k] = v
    for rel, code in zip(z["fta_rels"], z["fta_codes"]):
        emb.fta[(str(rel), side)] = str(code)


def save_cache(emb, side: str, encoding: str | None, key: str) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    keys = sorted(k for k in emb.families["dlib"] if k[1] == side)
    fta = sorted((k, c) for k, c in emb.fta.items() if k[1] == side)
    path = cache_path(side, encoding)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, key=key, rels=np.array([k[0] for k in keys], dtype=str),
             **{f: np.stack([emb.families[f][k] for k in keys]) if keys else np.zeros((0, 128), np.float32)
                for f in FAMILIES},
             fta_rels=np.array([k[0] for k, _ in fta], dtype=str), fta_codes=np.array([c for _, c in fta], dtype=str))
    tmp.replace(path)


def run_items(emb, rels: list[str], side: str, encoding: str | None, key: str, checkpoint: int) -> None:
    todo = [r for r in rels if (r, side) not in emb.emb and (r, side) not in emb.fta]
    t0 = time.perf_counter()
    for s in range(0, len(todo), checkpoint):
        emb.run([(r, side) for r in todo[s:s + checkpoint]])
        save_cache(emb, side, encoding, key)
        done = min(s + checkpoint, len(todo))
        rate = done / max(1e-9, time.perf_counter() - t0)
        print(f"  {side}{'-' + encoding if encoding else ''}: {done}/{len(todo)} new items "
              f"({rate:.1f}/s, ~{(len(todo) - done) / max(rate, 1e-9) / 60:.1f} min left)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- scores


def fold_images(pairs) -> tuple[list[str], list[str]]:
    from models.eval.pairs import image_relpath

    return sorted({image_relpath(p.a) for p in pairs}), sorted({image_relpath(p.b) for p in pairs})


def family_scores(families: dict, pairs, rel_a, side_a, rel_b, side_b) -> dict:
    """Per family: pairs.txt scores (-inf on FTA) and, for the chip/live case, the extended
    impostor and extended genuine scores (same order across families)."""
    from models.eval.metrics import cross_scores as _cross_scores
    from models.eval.pairs import image_relpath
    from models.eval.protocols import _identity, _matrix
    from service.face.score import similarity

    both = list(rel_a) + list(rel_b)
    ident = np.unique([_identity(r) for r in both], return_inverse=True)[1]
    files = np.unique(both, return_inverse=True)[1]
    n = len(rel_a)
    ida, idb, fa, fb = ident[:n], ident[n:], files[:n], files[n:]
    out = {}
    for f, table in families.items():
        holder = SimpleNamespace(emb=table)
        pair_scores = []
        for p in pairs:
            a, b = table.get((image_relpath(p.a), side_a)), table.get((image_relpath(p.b), side_b))
            pair_scores.append(similarity(a, b) if a is not None and b is not None else -math.inf)
        entry = {"pairs": np.array(pair_scores)}
        if side_a != side_b:
            ea, oka = _matrix(holder, rel_a, side_a, 128)
            eb, okb = _matrix(holder, rel_b, side_b, 128)
            entry["imp"], entry["gen_x"] = _cross_scores(ea, oka, ida, fa, eb, okb, idb, fb, symmetric=False)
        out[f] = entry
    return out


class Fusion:
    """Score-level fusion of two families, fit on one set of scores, applied to others."""

    def __init__(self, kind: str, fams: tuple[str, str]):
        self.kind, self.fams = kind, fams

    def fit(self, gen: dict, imp: dict, gen_extra: dict | None = None) -> "Fusion":
        """gen/imp: family -> scores (same pair order across families); gen_extra: further
        genuine scores for the regression (extended genuine)."""
        self.mu, self.sd = {}, {}
        for f in self.fams:
            s = np.concatenate([gen[f], imp[f]]).astype(np.float64)
            s = s[np.isfinite(s)]
            self.mu[f], self.sd[f] = float(s.mean()), float(s.std())
        self.w = np.ones(len(self.fams))
        self.b = 0.0
        if self.kind == "lr":
            g = {f: np.concatenate([gen[f], (gen_extra or {}).get(f, np.zeros(0))]) for f in self.fams}
            xg, xi = self._z(g), self._z(imp)
            xg, xi = xg[np.all(np.isfinite(xg), 1)], xi[np.all(np.isfinite(xi), 1)]
            self.w, self.b = logistic_fit(xg, xi)
        return self

    def _z(self, scores: dict) -> np.ndarray:
        return np.stack([(np.asarray(scores[f], np.float64) - self.mu[f]) / self.sd[f] for f in self.fams], 1)

    def __call__(self, scores: dict) -> np.ndarray:
        z = self._z(scores)
        out = z @ self.w + self.b
        out[~np.all(np.isfinite(z), 1)] = -np.inf   # an FTA side stays rejected
        return out

    def params(self) -> dict:
        return {"kind": self.kind, "families": list(self.fams), "mean": self.mu, "std": self.sd,
                "weights": np.round(self.w, 5).tolist(), "bias": round(float(self.b), 5)}


def logistic_fit(xg: np.ndarray, xi: np.ndarray, l2: float = 1e-4) -> tuple[np.ndarray, float]:
    """Class-balanced L2 logistic regression (the one the shipped fusion is fit with)."""
    from models.build.fit_fusion import logistic_fit as fit

    return fit(xg, xi, l2)


def tar_row(gen: np.ndarray, imp) -> dict:
    from models.eval.metrics import ScoreSet, tar_at_far

    rows = tar_at_far(gen, imp if isinstance(imp, ScoreSet) else ScoreSet(imp), FARS)
    return {f"{r['far_target']:g}": round(r["tar"], 4) for r in rows}


# --------------------------------------------------------------------------- protocols


def ivs_results(families: dict, all_pairs, encoding: str) -> dict:
    from models.eval.metrics import kfold_accuracy
    from models.eval.pairs import select_pairs

    fit_pairs = select_pairs(all_pairs, [FIT_FOLD])
    test_pairs = select_pairs(all_pairs, list(TEST_FOLDS))
    fit = family_scores(families, fit_pairs, *interleave(fold_images(fit_pairs)))
    test = family_scores(families, test_pairs, *interleave(fold_images(test_pairs)))
    fit_lab = np.array([p.same for p in fit_pairs])
    test_lab = np.array([p.same for p in test_pairs])
    test_folds = np.array([p.fold for p in test_pairs])

    def view(s, lab):
        return {f: v["pairs"][lab] for f, v in s.items()}

    rows = {}
    for f in FAMILIES:
        t = test[f]
        acc = kfold_accuracy(t["pairs"], test_lab, test_folds, list(TEST_FOLDS))["mean"]
        rows[f] = {"tar": tar_row(t["pairs"][test_lab], t["imp"]), "accuracy": round(acc, 5)}
    fusions = {}
    for sf in ("sface", "sface_flip"):
        for kind in ("zsum", "lr"):
            fu = Fusion(kind, ("dlib", sf)).fit(view(fit, fit_lab), {f: v["imp"] for f, v in fit.items()},
                                                {f: v["gen_x"] for f, v in fit.items()})
            pair_scores = fu({f: v["pairs"] for f, v in test.items()})
            acc = kfold_accuracy(pair_scores, test_lab, test_folds, list(TEST_FOLDS))["mean"]
            name = f"fused_{kind}(dlib+{sf})"
            rows[name] = {"tar": tar_row(pair_scores[test_lab], fu({f: v["imp"] for f, v in test.items()})),
                          "accuracy": round(acc, 5)}
            fusions[name] = fu.params()
    rel_a, rel_b = fold_images(test_pairs)
    counts = {"genuine": int(test_lab.sum()), "impostors": int(test["dlib"]["imp"].size),
              "fta_id": sum((r, "id") not in families["dlib"] for r in rel_a), "images_id": len(rel_a),
              "fta_live": sum((r, "live") not in families["dlib"] for r in rel_b), "images_live": len(rel_b),
              "fit_genuine": int(fit_lab.sum()), "fit_extended_genuine": int(fit["dlib"]["gen_x"].size),
              "fit_impostors": int(fit["dlib"]["imp"].size)}
    return {"encoding": encoding, "rows": rows, "fusion_params": fusions, "counts": counts}


def interleave(rel_ab):
    rel_a, rel_b = rel_ab
    return rel_a, "id", rel_b, "live"


def lfw_results(families: dict, pairs) -> dict:
    """10-fold (leave-one-fold-out) accuracy, live/live; fusion refit without the test fold."""
    from models.eval.metrics import kfold_accuracy
    from models.eval.pairs import image_relpath

    rels = sorted({image_relpath(p.a) for p in pairs} | {image_relpath(p.b) for p in pairs})
    s = family_scores(families, pairs, rels, "live", rels, "live")
    lab = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    fold_list = sorted(set(folds.tolist()))
    rows = {f: round(kfold_accuracy(s[f]["pairs"], lab, folds, fold_list)["mean"], 5) for f in FAMILIES}
    for sf in ("sface", "sface_flip"):
        for kind in ("zsum", "lr"):
            accs = []
            for k in fold_list:
                tr = folds != k
                fu = Fusion(kind, ("dlib", sf)).fit({f: v["pairs"][tr & lab] for f, v in s.items()},
                                                    {f: v["pairs"][tr & ~lab] for f, v in s.items()})
                fused = fu({f: v["pairs"] for f, v in s.items()})
                per = kfold_accuracy(fused, lab, folds, fold_list)["per_fold"]
                accs.append(next(r["accuracy"] for r in per if r["fold"] == k))
            rows[f"fused_{kind}(dlib+{sf})"] = round(float(np.mean(accs)), 5)
    fta = sum(1 for r in rels if (r, "live") not in families["dlib"])
    return {"folds": fold_list, "accuracy": rows, "pairs": len(pairs), "images": len(rels), "fta_live": fta}


# --------------------------------------------------------------------------- docs


def write_doc(results: dict, doc: Path = DOC) -> None:
    start, end = "<!-- sface_fusion:start -->", "<!-- sface_fusion:end -->"
    lines = [f"Command: `{results['command']}` (commit {results['git'][:7]}; {results['timestamp']}; "
             f"results `.cache/sface_study/results.json`)", "",
             f"Machine: {results['machine']}; the 2 cores were shared with a long training job the whole time; "
             f"onnxruntime and OpenCV single-threaded.", ""]
    for enc, r in results["ivs"].items():
        c = r["counts"]
        lines += [f"#### LFW-IvS folds 9-10, {enc} chips (full pipeline, extended impostors, FTA = reject)", "",
                  f"Genuine {c['genuine']}, impostors {c['impostors']:,}; FTA id {c['fta_id']}/{c['images_id']}, "
                  f"live {c['fta_live']}/{c['images_live']}; fusion fit on fold 8 "
                  f"({c['fit_genuine']} genuine pairs + {c['fit_extended_genuine']} other same-identity pairs, "
                  f"{c['fit_impostors']:,} impostors).", "",
                  "| scores | TAR@1e-2 | TAR@1e-3 | TAR@1e-4 | accuracy (2-fold 9/10) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, row in r["rows"].items():
            t = row["tar"]
            lines.append(f"| {name} | {t['0.01']:.4f} | {t['0.001']:.4f} | {t['0.0001']:.4f} | {row['accuracy'] * 100:.2f} % |")
        lines.append("")
    if results.get("lfw"):
        lf = results["lfw"]
        lines += [f"#### LFW {len(lf['folds'])}-fold accuracy, live/live ({lf['pairs']} pairs, {lf['images']} images, "
                  f"live FTA {lf['fta_live']})", "", "| scores | accuracy |", "| --- | ---: |"]
        lines += [f"| {k} | {v * 100:.2f} % |" for k, v in lf["accuracy"].items()]
        lines.append("")
    section = "\n".join([start, *lines, end])
    text = doc.read_text() if doc.exists() else "# SFace\n"
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    import cv2

    from models.eval.docs import _machine
    from models.eval.pairs import parse_folds, read_pairs, select_pairs
    from models.eval.report import git_commit as _git_commit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--lfw-folds", default="1-10", help="folds of the live/live accuracy")
    parser.add_argument("--no-lfw", action="store_true", help="skip the live/live LFW accuracy")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="at most N pairs per fold (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoint", type=int, default=400, help="save the cache every N items")
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    t_start = time.perf_counter()
    pipeline, sface, sface_manifest = load_models(threads=1)
    data_dir = args.data_dir or Path(pipeline.settings.data_dir)
    all_pairs = read_pairs(data_dir / "lfw" / "pairs.txt")
    if args.limit:  # smoke runs: the first N pairs of each fold (half matched)
        all_pairs = select_pairs(all_pairs, list(range(1, 11)), args.limit)
    ivs_pairs = select_pairs(all_pairs, [FIT_FOLD, *TEST_FOLDS])
    rel_a, rel_b = fold_images(ivs_pairs)
    lfw_pairs = [] if args.no_lfw else select_pairs(all_pairs, parse_folds(args.lfw_folds))
    live_rels = set(rel_b) | set(sum(fold_images(lfw_pairs), []))

    embedders = {}
    for enc in ENCODINGS:
        emb = make_embedder(pipeline, sface, sface_manifest, data_dir, enc, args.batch_size)
        key = cache_key(pipeline, sface_manifest, enc)
        load_cache(emb, "id", enc, key)
        run_items(emb, rel_a, "id", enc, key, args.checkpoint)
        embedders[enc] = emb
    live = embedders["rgb"]
    key = cache_key(pipeline, sface_manifest, None)
    load_cache(live, "live", None, key)
    # the IvS live images first, then the rest of the LFW images
    run_items(live, sorted(set(rel_b)) + sorted(set(live_rels) - set(rel_b)), "live", None, key, args.checkpoint)

    results = {"command": " ".join(["python -m studies.sface_fusion", *(argv if argv is not None else sys.argv[1:])]),
               "git": _git_commit()["commit"] or "?",
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "ivs": {}, "lfw": None}
    for enc in ENCODINGS:
        fams = {f: {**embedders[enc].families[f], **{k: v for k, v in live.families[f].items() if k[1] == "live"}}
                for f in FAMILIES}
        results["ivs"][enc] = ivs_results(fams, all_pairs, enc)
        for name, row in results["ivs"][enc]["rows"].items():
            print(f"ivs {enc:3s} {name:28s} TAR {row['tar']}  acc {row['accuracy']:.4f}")
    if lfw_pairs:
        results["lfw"] = lfw_results(live.families, lfw_pairs)
        for name, acc in results["lfw"]["accuracy"].items():
            print(f"lfw {name:28s} accuracy {acc * 100:.2f} %")
    results["timings_ms_per_item"] = {k: round(v / max(1, live.counts.get(k, 1)), 2) for k, v in live.timings.items()}
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["machine"] = _machine()
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    if not args.no_docs:
        write_doc(results)
    print(f"done in {results['wall_s']} s; results {CACHE / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
