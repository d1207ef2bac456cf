"""Chip store for distillation: K simulated ID-chip photos per image, as the service decodes them.

For every image of a split (`models.train.crops.split_items`: train = LFW identities outside
folds 8-10 + UTKFace train; val = the fold-8 identities; reserved identities are refused before
any image is read and again on load):
  live : file bytes -> decode -> detect -> select_face -> its 5 landmarks (the crop itself is
         aligned per family, with the family's template, when the teacher runs)
  chip : chipsim (seed, coder, byte target) -> file bytes -> decode -> detect -> the decoded
         126x102 chip, its 5 landmarks and its bytes (LFW: the fixed eye positions, as
         `idverify eval`; UTKFace: the detected landmarks)
Chips are kept before alignment, so one store serves every family (dlib 150 px, SFace 112 px)
and the trainer jitters the alignment itself. Variants (`seed:coder:bytes`): training mixes
JPEG2000 rgb and ycc and JPEG at 800-1,400 bytes (`train_variants`); validation (fold 8) holds the
evaluation's own chips (seed 0, 1,000 bytes) in rgb, ycc and the held-out coder webp, which no
training variant uses.

Layout <root>/<split>/: chips.npy (N, K, 126, 102, 3) uint8 (memory-mapped), chipdata.npy (every
chip file, concatenated), meta.npz; built in resumable shards (part-NNNN.npz). Beside them, per
family, teacher-<family>.npz: the pretrained network's unit embeddings of every live crop and of
its mirror image (`teacher_views`).
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

from models.eval.chipsim import CHIP_H, CHIP_W, chip_rng, simulate_chip
from models.train.data import Item, assert_no_reserved

SHARD = 64
TRAIN_CODECS = ("rgb", "ycc", "rgb", "jpeg")        # cycled over the K training chips
HELD_OUT = "webp"                                   # evaluation only
TRAIN_BYTES = "800-1400"
VAL_VARIANTS = ("0:rgb:1000", "0:ycc:1000", f"0:{HELD_OUT}:1000")


def train_variants(k: int = 8, codecs=TRAIN_CODECS, first_seed: int = 100, nbytes: str = TRAIN_BYTES) -> list[str]:
    if k < 1 or HELD_OUT in codecs:
        raise ValueError(f"need k >= 1 training chips and no {HELD_OUT} (the held-out coder) among {codecs}")
    return [f"{first_seed + j}:{codecs[j % len(codecs)]}:{nbytes}" for j in range(k)]


def parse_variant(spec: str) -> tuple[int, str, str]:
    seed, codec, nbytes = str(spec).split(":")
    return int(seed), codec, nbytes


def codec_of(spec: str) -> str:
    return parse_variant(spec)[1]


def target_bytes(key: str, seed: int, nbytes: str) -> int:
    """The byte target of one chip: fixed, or drawn per (image, seed) from a `lo-hi` range."""
    if "-" not in nbytes:
        return int(nbytes)
    lo, hi = (int(v) for v in nbytes.split("-"))
    return int(chip_rng(key, seed + 7919).integers(lo, hi + 1))


# ----------------------------------------------------------------------------- building


def build_shard(items: list[Item], data_dir: Path, variants: list[str], frontend) -> dict:
    from models.train.cache import decode_bytes, read_rgb
    n, k = len(items), len(variants)
    out = {"chips": np.zeros((n, k, CHIP_H, CHIP_W, 3), np.uint8), "chip_ok": np.zeros((n, k), bool),
           "chip_lm": np.full((n, k, 5, 2), np.nan, np.float32), "chip_len": np.zeros((n, k), np.int32),
           "live_ok": np.zeros(n, bool), "live_lm": np.full((n, 5, 2), np.nan, np.float32)}
    blobs: list[bytes] = []
    for i, it in enumerate(items):
        files = [b""] * k
        path = Path(data_dir) / it.key
        try:
            img = read_rgb(path)
            live = decode_bytes(path.read_bytes(), frontend.settings, "live_photo")
            face, _ = frontend.face(live)
        except Exception:  # noqa: BLE001 - unreadable: a failure to acquire
            face = None
        if face is not None:
            out["live_ok"][i], out["live_lm"][i] = True, face.landmarks[:5]
            lm = None if it.source == "lfw" else face.landmarks
            for j, spec in enumerate(variants):
                seed, codec, nbytes = parse_variant(spec)
                try:
                    data = simulate_chip(img, lm, chip_rng(it.key, seed), encoding=codec,
                                         target_bytes=target_bytes(it.key, seed, nbytes))
                    cimg = decode_bytes(data, frontend.settings)
                    cface, _ = frontend.face(cimg)
                except Exception as exc:  # noqa: BLE001 - a failed chip is a failure to acquire
                    print(f"chip {spec} failed for {it.key}: {exc}", file=sys.stderr)
                    continue
                files[j] = data
                if cface is not None and cimg.shape == (CHIP_H, CHIP_W, 3):
                    out["chips"][i, j], out["chip_lm"][i, j], out["chip_ok"][i, j] = cimg, cface.landmarks[:5], True
        out["chip_len"][i] = [len(b) for b in files]
        blobs += files
    out["chipdata"] = np.frombuffer(b"".join(blobs), np.uint8).copy()
    return out


def _worker(job) -> None:
    wid, workers, split, data_dir, out, items, variants, settings = job
    from models.train.cache import Frontend
    frontend = Frontend(settings, threads=1)
    n_sh = (len(items) + SHARD - 1) // SHARD
    t0 = time.time()
    for s in range(wid, n_sh, workers):
        part = out / f"part-{s:04d}.npz"
        if part.exists():
            continue
        d = build_shard(items[s * SHARD:(s + 1) * SHARD], data_dir, variants, frontend)
        np.savez(out / f"part-{s:04d}.tmp.npz", **d)
        (out / f"part-{s:04d}.tmp.npz").rename(part)
        print(f"[chips {split} w{wid}] shard {s + 1}/{n_sh} {time.time() - t0:.0f}s live ok {d['live_ok'].mean():.3f} "
              f"chip ok {d['chip_ok'].mean():.3f}", file=sys.stderr, flush=True)


def subset(split: str, settings, n: int, seed: int = 0) -> list[Item] | None:
    """A seeded subset of `n` items of the split (in the split's order), or None (all) for n <= 0."""
    from models.train.crops import split_items
    if n <= 0:
        return None
    items = split_items(Path(settings.data_dir), split)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=min(n, len(items)), replace=False))
    return [items[i] for i in keep]


def build_store(split: str, settings, root: Path, workers: int = 1, items: list[Item] | None = None,
                variants: list[str] | None = None) -> Path:
    """Build (or resume) one split under root/split. `items` (tests: a handful) replaces the
    split's own list; either way it is checked against the reserved identities first."""
    from models.train.crops import split_items
    from models.train.data import reserved_identities
    data_dir = Path(settings.data_dir)
    out = Path(root) / split
    if (out / "meta.npz").exists():
        return out
    items = split_items(data_dir, split) if items is None else list(items)
    assert_no_reserved(items, reserved_identities(data_dir))
    variants = list(variants or (VAL_VARIANTS if split == "val" else train_variants()))
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(w, workers, split, data_dir, out, items, variants, settings) for w in range(workers)]
    if workers == 1:
        _worker(jobs[0])
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_worker, jobs)
    _merge(out, items, variants)
    return out


def _merge(out: Path, items: list[Item], variants: list[str]) -> None:
    n_sh = (len(items) + SHARD - 1) // SHARD
    chips = np.lib.format.open_memmap(out / "chips.npy.tmp", "w+", np.uint8, (len(items), len(variants), CHIP_H, CHIP_W, 3))
    meta: dict[str, list] = {k: [] for k in ("chip_ok", "chip_lm", "chip_len", "live_ok", "live_lm", "chipdata")}
    for s in range(n_sh):
        with np.load(out / f"part-{s:04d}.npz") as z:
            chips[s * SHARD:s * SHARD + len(z["live_ok"])] = z["chips"]
            for k in meta:
                meta[k].append(z[k])
    chips.flush()
    del chips
    np.save(out / "chipdata.npy", np.concatenate(meta.pop("chipdata")))
    labels = {lab: np.array([it.labels.get(lab, np.nan) for it in items], np.float32) for lab in ("gender", "age", "race")}
    np.savez(out / "meta.tmp.npz", key=np.array([it.key for it in items]), identity=np.array([it.identity for it in items]),
             source=np.array([it.source for it in items]), variants=np.array(variants),
             **{k: np.concatenate(v) for k, v in meta.items()}, **labels)
    (out / "chips.npy.tmp").rename(out / "chips.npy")
    (out / "meta.tmp.npz").rename(out / "meta.npz")
    for s in range(n_sh):
        (out / f"part-{s:04d}.npz").unlink()


def load_store(root: Path, split: str, reserved: set[str]) -> dict:
    """Memory-mapped chips + metadata; every key re-checked against the reserved identities."""
    from models.train.crops import load
    out = load(root, split, reserved, arrays=("chips", "chipdata"))
    out["chip_off"] = np.concatenate([[0], np.cumsum(out["chip_len"].ravel())[:-1]]).reshape(out["chip_len"].shape)
    out["dir"] = Path(root) / split
    return out


def chip_file(store: dict, i: int, j: int) -> bytes:
    off, n = int(store["chip_off"][i, j]), int(store["chip_len"][i, j])
    return bytes(store["chipdata"][off:off + n])


# ----------------------------------------------------------------------------- teacher targets


def teacher_views(store: dict, family, settings, device: str = "cpu", batch: int = 64) -> dict:
    """{"v": (N, 2, D) unit embeddings of each live crop and its mirror, "ok": (N,)} from the
    family's pretrained network, the crop aligned to the family's template; cached per family."""
    path = Path(store["dir"]) / f"teacher-{family.name}.npz"
    if path.exists():
        with np.load(path) as z:
            return {"v": z["v"], "ok": z["ok"]}
    import torch

    from models.train.cache import decode_bytes
    from models.train.distill_data import embed_views
    from service.face.align import align
    tpl, size = family.template(settings.models_dir)
    net = family.build().to(device).eval()
    n = len(store["key"])
    views = np.zeros((n, 2, family.dim(settings.models_dir)), np.float32)
    ok = np.array(store["live_ok"], bool)
    rows = np.flatnonzero(ok)
    t0 = time.time()
    for s in range(0, len(rows), batch):
        idx = rows[s:s + batch]
        crops = []
        for i in idx:
            img = decode_bytes((Path(settings.data_dir) / str(store["key"][i])).read_bytes(), settings, "live_photo")
            crops.append(align(img, store["live_lm"][i], tpl, size))
        with torch.no_grad():
            views[idx] = embed_views(net, np.stack(crops), device)
        if s // batch % 20 == 0:
            print(f"[teacher {family.name}] {min(s + batch, len(rows))}/{len(rows)} live crops {time.time() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    np.savez(path.with_suffix(".tmp.npz"), v=views, ok=ok)
    path.with_suffix(".tmp.npz").rename(path)
    return {"v": views, "ok": ok}


# ----------------------------------------------------------------------------- pack (distill_data.load_pack reads it)


def _chip_files(store: dict, idx: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray]:
    files = [chip_file(store, int(i), j) for i in idx for j in range(cols)]
    return np.frombuffer(b"".join(files), np.uint8), np.array([len(f) for f in files], np.int32).reshape(len(idx), cols)


def write_pack(path: Path, family: str, train: tuple[dict, dict], val: tuple[dict, dict], n_images: int,
               k_chips: int, seed: int = 0, pixels: bool = False) -> dict:
    """One .npz to train elsewhere: the whole bank (teacher views fp16, identities), `n_images`
    training images (seeded) with their first `k_chips` chips, all fold-8 validation chips, and
    the fold-8 teacher views. Chips travel as their ~1 KB files (decoded on load, as the store
    decoded them) or, with `pixels`, as decoded uint8. Returns the sizes."""
    from models.train.distill_data import from_store
    bank, chips = from_store(*train)
    vbank, _ = from_store(*val)
    usable = chips.usable(bank.ok)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(usable, size=min(n_images, len(usable)), replace=False))
    k = min(k_chips, len(chips.variants))
    st, vst = train[0], val[0]
    arrays = {"family": np.array(family), "variants": np.array(chips.variants[:k]),
              "val_variants": np.array([str(v) for v in vst["variants"]]),
              "bank_views": bank.views.astype(np.float16), "bank_ok": bank.ok, "bank_ident": bank.ident,
              "bank_utk": bank.utk, "bank_key": bank.keys, "rows": pick, "chip_ok": st["chip_ok"][pick, :k],
              "chip_lm": st["chip_lm"][pick, :k], **{f"label_{a}": st[a][pick] for a in ("gender", "age", "race")},
              "val_views": vbank.views.astype(np.float16), "val_ok": vbank.ok, "val_ident": vbank.ident,
              "val_key": vbank.keys, "val_chip_ok": vst["chip_ok"], "val_chip_lm": vst["chip_lm"]}
    if pixels:
        arrays["chips"] = np.asarray(st["chips"][pick, :k])
    else:
        arrays["chip_data"], arrays["chip_len"] = _chip_files(st, pick, k)
    arrays["val_chip_data"], arrays["val_chip_len"] = _chip_files(vst, np.arange(len(vst["key"])), len(vst["variants"]))
    path = Path(path)
    np.savez_compressed(path, **arrays)
    chip_bytes = int(arrays["chips"].nbytes if pixels else arrays["chip_data"].nbytes)
    return {"path": str(path), "bytes": path.stat().st_size, "images": int(len(pick)), "chips_per_image": k,
            "chip_bytes_per_image": round(chip_bytes / max(len(pick), 1)),
            "bank_bytes_per_image": int(arrays["bank_views"][0].nbytes + 16),
            "fixed_bytes": int(sum(v.nbytes for n, v in arrays.items() if n.startswith("val_")))}
