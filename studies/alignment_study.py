"""Which alignment template and test-time flip give the best LFW accuracy with our MTCNN?

Measured on LFW View-2 folds 1-8 only (folds 9-10 are reserved for evaluation): detection runs
once per image, then each variant re-aligns and re-embeds. Prints an 8-fold accuracy per variant.

    .venv/bin/python -m studies.alignment_study [--folds 1-8] [--jitter]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image
from tqdm import tqdm

from service.face import align as al
from models.eval.metrics import kfold_accuracy
from models.eval.pairs import image_relpath, parse_folds, read_pairs, select_pairs
from service.face.loader import load_pipeline
from service.face.score import normalize
from service.settings import Settings

MTCNN_FITTED = np.array([[47.36, 45.65], [101.79, 45.47], [74.36, 77.08], [50.59, 105.24], [98.31, 105.11]],
                        dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", default="1-8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--jitter", action="store_true", help="test-time jitter of the alignment (scale, shift) with flips")
    args = ap.parse_args()
    s = Settings()
    pipe = load_pipeline(s)
    pairs = select_pairs(read_pairs(s.data_dir / "lfw" / "pairs.txt"), parse_folds(args.folds))
    rels = sorted({image_relpath(p.a) for p in pairs} | {image_relpath(p.b) for p in pairs})
    images, marks = {}, {}
    for rel in tqdm(rels, desc="detect", mininterval=2):
        img = np.asarray(Image.open(s.data_dir / "lfw" / "images" / rel).convert("RGB"))
        faces = pipe.detector.detect(img)
        if faces:
            from service.face.detect import select_face
            images[rel] = img
            marks[rel] = select_face(faces, img.shape).landmarks
    templates = {"derived": al.DLIB_CHIP_TEMPLATE_DERIVED, "fitted_dlib68": al.DLIB_CHIP_TEMPLATE_FITTED,
                 "fitted_mtcnn": MTCNN_FITTED}
    results = {}
    if args.jitter:
        tpl = al.DLIB_CHIP_TEMPLATE_FITTED
        def emb_of(t, flip=False):
            chips = np.stack([al.align(images[r], marks[r], t, 150) for r in marks])
            if flip:
                chips = chips[:, :, ::-1]
            return normalize(np.concatenate([pipe.towers.live.embed(chips[i:i + 64]) for i in range(0, len(chips), 64)]))
        c = np.array([75.0, 75.0], np.float32)
        variants = {"base": tpl}
        for sc in (0.95, 1.05):
            variants[f"scale{sc}"] = (tpl - c) * sc + c
        for dx, dy in ((2, 0), (-2, 0), (0, 2), (0, -2)):
            variants[f"shift{dx},{dy}"] = tpl + np.array([dx, dy], np.float32)
        E = {k: emb_of(t) for k, t in variants.items()}
        F = {k: emb_of(t, True) for k, t in variants.items()}
        combos = {"base+flip": ["base"], "scales+flip": ["base", "scale0.95", "scale1.05"],
                  "shifts+flip": ["base", "shift2,0", "shift-2,0", "shift0,2", "shift0,-2"],
                  "all+flip": list(variants)}
        for name, keys in combos.items():
            e = sum(E[k] + F[k] for k in keys)
            index = {r: normalize(v) for r, v in zip(marks, e)}
            scores = [float(index[image_relpath(p.a)] @ index[image_relpath(p.b)])
                      if image_relpath(p.a) in index and image_relpath(p.b) in index else -2.0 for p in pairs]
            acc = kfold_accuracy(scores, [p.same for p in pairs], [p.fold for p in pairs])
            results[name] = round(acc["mean"], 5)
            print(f"{name:14s} accuracy {acc['mean']:.4f} ± {acc['standard_error']:.4f}", flush=True)
        templates = {}
    for tname, tpl in templates.items():
        chips = np.stack([al.align(images[r], marks[r], tpl, 150) for r in marks])
        emb = np.concatenate([pipe.towers.live.embed(chips[i:i + 64]) for i in range(0, len(chips), 64)])
        flip = np.concatenate([pipe.towers.live.embed(chips[i:i + 64, :, ::-1]) for i in range(0, len(chips), 64)])
        for variant, e in (("plain", emb), ("flip_avg", normalize(emb) + normalize(flip))):
            index = {r: normalize(v) for r, v in zip(marks, e)}
            scores = [float(index[image_relpath(p.a)] @ index[image_relpath(p.b)])
                      if image_relpath(p.a) in index and image_relpath(p.b) in index else -2.0 for p in pairs]
            acc = kfold_accuracy(scores, [p.same for p in pairs], [p.fold for p in pairs])
            results[f"{tname}/{variant}"] = round(acc["mean"], 5)
            print(f"{tname:14s} {variant:9s} accuracy {acc['mean']:.4f} ± {acc['standard_error']:.4f}", flush=True)
    print(json.dumps({"folds": args.folds, "fta": len(rels) - len(marks), "accuracy": results}, indent=1))


if __name__ == "__main__":
    main()
