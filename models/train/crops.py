"""Aligned-crop store for end-to-end training: images, not activations.

For every image of a split, as the service sees it:
  live  : decode -> MTCNN -> select_face -> align to the towers' 150 px template
  chip k: chip simulator (seed, encoding) -> JPEG2000 bytes -> decode -> detect -> align,
          for each of the K (seed, encoding) variants of the split
stored as uint8 (N, 150, 150, 3) / (N, K, 150, 150, 3) arrays (memory-mapped .npy) with the
5-point landmarks' pose (yaw, pitch) and the labels. Augmentation of the live side (blur, noise,
camera JPEG, colour, small geometry, occlusion) happens at training time on these crops.

Layout: <root>/<split>/{live,chips}.npy + meta.npz, built in resumable shards
(<root>/<split>/part-NNNN.npz) by `python -m models.train.crops --split train --workers 2`.
Reserved identities (LFW folds 9-10) never enter a training or validation split
(`assert_no_reserved` before any image is read, and again on load).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

from models.train.data import Item, assert_no_reserved, lfw_split, reserved_identities, utk_split

SHARD = 128
SIZE = 150
# (chip seed, encoding) per split; the evaluation protocol uses seed 0 on folds 9-10 only
VARIANTS = {
    "train": [(11, "rgb"), (12, "rgb"), (13, "ycc"), (14, "rgb")],
    "val": [(0, "rgb"), (0, "ycc")],
    "utk_test": [(0, "rgb")],
}


def split_items(data_dir: Path, split: str) -> list[Item]:
    lfw = lfw_split(data_dir)
    if split == "train":
        items = lfw.train + utk_split(data_dir).train
    elif split == "val":
        items = lfw.val
    elif split == "utk_test":  # attribute probe only
        items = utk_split(data_dir).test
    elif split == "tiny":  # tests: a handful of fold 1-8 images
        items = lfw.train[:6] + utk_split(data_dir).train[:2]
    else:
        raise ValueError(f"unknown split {split!r}")
    assert_no_reserved(items, lfw.reserved)
    return items


def _variants(split: str):
    return VARIANTS.get(split, [VARIANTS["train"][0], VARIANTS["train"][2]])


def build_shard(items: list[Item], data_dir: Path, variants, frontend) -> dict:
    from models.train.cache import decode_bytes, pose, read_rgb
    from models.eval.chipsim import chip_rng, simulate_chip
    n, k = len(items), len(variants)
    out = {
        "live": np.zeros((n, SIZE, SIZE, 3), np.uint8), "live_ok": np.zeros(n, bool),
        "chips": np.zeros((n, k, SIZE, SIZE, 3), np.uint8), "chip_ok": np.zeros((n, k), bool),
        "live_pose": np.full((n, 2), np.nan, np.float32), "chip_pose": np.full((n, k, 2), np.nan, np.float32),
    }
    for i, it in enumerate(items):
        path = Path(data_dir) / it.key
        try:
            img = read_rgb(path)
            live_img = decode_bytes(path.read_bytes(), frontend.settings, "live_photo")
        except Exception:  # noqa: BLE001 - unreadable: FTA
            continue
        face, _ = frontend.face(live_img)
        if face is None:
            continue
        out["live"][i] = frontend.aligned(live_img, face)
        out["live_ok"][i] = True
        out["live_pose"][i] = pose(face.landmarks)
        lm = None if it.source == "lfw" else face.landmarks
        for j, (seed, enc) in enumerate(variants):
            try:
                data = simulate_chip(img, lm, chip_rng(it.key, seed), encoding=enc)
                cimg = decode_bytes(data, frontend.settings)
            except Exception as exc:  # noqa: BLE001 - a failed chip is an FTA
                print(f"chip failed for {it.key}: {exc}", file=sys.stderr)
                continue
            cface, _ = frontend.face(cimg)
            if cface is None:
                continue
            out["chips"][i, j] = frontend.aligned(cimg, cface)
            out["chip_ok"][i, j] = True
            out["chip_pose"][i, j] = pose(cface.landmarks)
    return out


def _worker(args) -> None:
    wid, nworkers, split, data_dir, root, items, settings = args
    from models.train.cache import Frontend
    frontend = Frontend(settings, threads=1)
    variants = _variants(split)
    n_sh = (len(items) + SHARD - 1) // SHARD
    t0 = time.time()
    done = 0
    for s in range(wid, n_sh, nworkers):
        part = root / f"part-{s:04d}.npz"
        if part.exists():
            continue
        d = build_shard(items[s * SHARD:(s + 1) * SHARD], data_dir, variants, frontend)
        tmp = root / f"part-{s:04d}.tmp.npz"
        np.savez(tmp, **d)
        tmp.rename(part)
        done += 1
        el = time.time() - t0
        print(f"[crops {split} w{wid}] shard {s + 1}/{n_sh} {el:.0f}s live ok {d['live_ok'].mean():.3f} "
              f"chip ok {d['chip_ok'].mean():.3f}", file=sys.stderr, flush=True)


def build(split: str, settings, root: Path, workers: int = 1) -> Path:
    """Build (or resume) one split under root/split; `settings` gives the data and models dirs
    and the decode/detect limits the service uses."""
    data_dir = Path(settings.data_dir)
    out = Path(root) / split
    if (out / "meta.npz").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    items = split_items(data_dir, split)
    jobs = [(w, workers, split, data_dir, out, items, settings) for w in range(workers)]
    if workers == 1:
        _worker(jobs[0])
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_worker, jobs)
    n_sh = (len(items) + SHARD - 1) // SHARD
    k = len(_variants(split))
    live = np.lib.format.open_memmap(out / "live.npy.tmp", "w+", np.uint8, (len(items), SIZE, SIZE, 3))
    chips = np.lib.format.open_memmap(out / "chips.npy.tmp", "w+", np.uint8, (len(items), k, SIZE, SIZE, 3))
    meta: dict[str, list] = {"live_ok": [], "chip_ok": [], "live_pose": [], "chip_pose": []}
    for s in range(n_sh):
        with np.load(out / f"part-{s:04d}.npz") as z:
            sl = slice(s * SHARD, s * SHARD + len(z["live_ok"]))
            live[sl] = z["live"]
            chips[sl] = z["chips"]
            for key in meta:
                meta[key].append(z[key])
    live.flush()
    chips.flush()
    del live, chips
    (out / "live.npy.tmp").rename(out / "live.npy")
    (out / "chips.npy.tmp").rename(out / "chips.npy")
    labels = {lab: np.array([it.labels.get(lab, np.nan) for it in items], np.float32) for lab in ("gender", "age", "race")}
    np.savez(out / "meta.npz.tmp.npz", key=np.array([it.key for it in items]), identity=np.array([it.identity for it in items]),
             source=np.array([it.source for it in items]), variants=np.array([f"{s}:{e}" for s, e in _variants(split)]),
             **{k2: np.concatenate(v) for k2, v in meta.items()}, **labels)
    (out / "meta.npz.tmp.npz").rename(out / "meta.npz")
    for s in range(n_sh):
        (out / f"part-{s:04d}.npz").unlink()
    return out


def load(root: Path, split: str, reserved: set[str], arrays=("live", "chips")) -> dict:
    """Memory-mapped crops (`arrays`: the .npy files beside meta.npz) + metadata; every key
    re-checked against the reserved identities. The distillation chip store loads through it too."""
    d = Path(root) / split
    with np.load(d / "meta.npz") as z:
        meta = {k: z[k] for k in z.files}
    assert_no_reserved([str(k) for k in meta["key"]], reserved)
    for name in arrays:
        meta[name] = np.load(d / f"{name}.npy", mmap_mode="r")
    return meta


def main(argv=None) -> None:
    from service.settings import get_settings
    ap = argparse.ArgumentParser(description="build the aligned-crop store for end-to-end training")
    ap.add_argument("--split", default="train", choices=["train", "val", "utk_test", "tiny"])
    ap.add_argument("--root", type=Path, default=Path(".cache/train/crops"))
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    settings = get_settings()
    reserved_identities(Path(settings.data_dir))  # fail early without pairs.txt
    print(build(a.split, settings, a.root, a.workers))


if __name__ == "__main__":
    main()
