"""Activation cache: the expensive, frozen part of training, done once.

For every image of a split, as the service would see it:
  live  : read -> MTCNN detect -> select_face -> align to the tower template (150 px)
  chip  : chip simulator (seeded per image key) -> JPEG2000 bytes -> decode -> detect (small
          images upsampled as in the service) -> align
  occ   : the aligned live chip with a synthetic occluder (sunglasses band / lower-face mask /
          random patch), for a seeded fraction of the images
then the frozen early layers of the pretrained dlib ResNet (stem..`CUT`) run once, and the
activation at the cut is stored as float16, with the pretrained embedding and the computed
attributes (yaw, pitch, illumination, blur, domain, occlusion).

Layout: .cache/train/<cache-name>/<split>.npz (one file per split; a split is built in shards
<split>.part-NNNN.npz that are reused when a run is interrupted, then merged).
Progress goes to stderr. Reserved (folds 9-10) identities only ever go to the split named
"eval", which training code refuses to load (see `load_split`).
"""
from __future__ import annotations

import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.train.data import Item, assert_no_reserved
from service.settings import Settings

CUT = "level2"            # default cut: output of level2 (128 x 8 x 8) -> level1+level0+fc train
CUTS = ("level2", "level3")  # both activations are cached; level3 lets level2 train too
SHARD = 256
VARIANTS = ("live", "chip", "occ")
EVAL_SPLIT = "eval"


@dataclass
class CacheConfig:
    data_dir: Path
    root: Path
    chip_seed: int = 1          # training chips; the evaluation protocol uses its own seed
    occ_frac: float = 0.35      # fraction of images that get an occluded live variant
    threads: int = 2
    settings: Settings = field(default_factory=Settings)   # models_dir, detector, decode limits


class Frontend:
    """Detection + alignment + chip simulation exactly as the service composes them."""

    def __init__(self, settings: Settings, threads: int = 1):
        from service.face.loader import load_detector
        self.detector = load_detector(settings, providers=["CPUExecutionProvider"], threads=threads)
        self.settings = settings
        self.template, self.size = tower_template(settings.models_dir)

    def face(self, img: np.ndarray):
        from service.face.detect import select_face
        faces = self.detector.detect(img)
        if not faces:
            return None, 0
        f = select_face(faces, img.shape)
        if float(f.box[2] - f.box[0]) < self.settings.min_face_px:
            return None, len(faces)
        return f, len(faces)

    def aligned(self, img: np.ndarray, face) -> np.ndarray:
        from service.face.align import align
        return align(img, face.landmarks, self.template, self.size)


def tower_template(models_dir: Path) -> tuple[np.ndarray, int]:
    """The chip template the pipeline aligns to: the one in the baseline towers manifest (the
    pretrained backbone's), which every exported version keeps."""
    import json
    man = json.loads((Path(models_dir) / "towers" / "baseline" / "manifest.json").read_text())
    tpl = man["template"]
    return np.asarray(tpl["points"], dtype=np.float32), int(tpl["size"])


def read_rgb(path: Path) -> np.ndarray:
    """The source image as the chip simulator gets it in `idverify eval` (PIL, RGB)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def decode_bytes(data: bytes, settings: Settings, field: str = "id_photo") -> np.ndarray:
    """Bytes -> RGB as the service decodes them (service.face.decode when present, else PIL)."""
    try:
        from service.face.decode import decode_image
    except ImportError:
        from PIL import Image
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return decode_image(data, field, settings)


def pose(landmarks: np.ndarray) -> tuple[float, float]:
    """yaw: nose offset along the eye axis / eye distance; pitch: nose position between the eye
    line and the mouth line along the perpendicular (0 = at the eyes, 1 = at the mouth)."""
    le, re_, nose, lm, rm = (np.asarray(p, dtype=np.float64) for p in landmarks[:5])
    d = float(np.linalg.norm(re_ - le)) or 1.0
    ax = (re_ - le) / d
    perp = np.array([-ax[1], ax[0]])
    eyes = (le + re_) / 2
    mouth = (lm + rm) / 2
    yaw = float(np.dot(nose - eyes, ax) / d)
    span = float(np.dot(mouth - eyes, perp)) or 1.0
    pitch = float(np.dot(nose - eyes, perp) / span)
    return yaw, pitch


def photometrics(chip: np.ndarray) -> tuple[float, float]:
    import cv2
    grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)
    return float(grey.mean()) / 255.0, float(np.log1p(cv2.Laplacian(grey, cv2.CV_64F).var()))


def occlude(chip: np.ndarray, rng: np.random.Generator, template: np.ndarray) -> np.ndarray:
    """Synthetic occluder on an aligned chip, placed from the template landmarks."""
    out = chip.copy()
    s = chip.shape[0]
    pts = template.reshape(-1, 2)
    eyes_y = float(pts[:2, 1].mean()) if len(pts) >= 2 else 0.4 * s
    kind = rng.integers(3)
    colour = rng.integers(0, 256, size=3) if rng.random() < 0.5 else np.full(3, rng.integers(0, 80))
    if kind == 0:      # sunglasses band over the eyes
        h = rng.uniform(0.14, 0.22) * s
        y0 = int(max(0, eyes_y - h / 2 + rng.uniform(-3, 3)))
        out[y0:int(y0 + h), int(0.08 * s):int(0.92 * s)] = colour
    elif kind == 1:    # lower-face mask from under the nose
        y0 = int(min(s - 1, eyes_y + rng.uniform(0.22, 0.30) * s))
        out[y0:, int(0.10 * s):int(0.90 * s)] = colour
    else:              # random patch
        w = int(rng.uniform(0.25, 0.40) * s)
        x0, y0 = (int(v) for v in rng.integers(0, s - w, size=2))
        out[y0:y0 + w, x0:x0 + w] = colour
    return out


def _backbone(threads: int):
    import torch
    from models.build.dlib_resnet import DlibResNet
    torch.set_num_threads(threads)
    return DlibResNet.from_dat().eval()


def _empty(n: int) -> dict:
    d = {}
    for v in VARIANTS:
        d[f"{v}_ok"] = np.zeros(n, bool)
        d[f"{v}_feat"] = np.zeros((n, 128, 8, 8), np.float16)      # after level2 (default cut)
        d[f"{v}_feat3"] = np.zeros((n, 64, 17, 17), np.float16)    # after level3 (deeper fine-tuning)
        d[f"{v}_emb0"] = np.zeros((n, 128), np.float32)
        for a in ("yaw", "pitch", "illumination", "blur"):
            d[f"{v}_{a}"] = np.full(n, np.nan, np.float32)
    return d


def build_shard(items: list[Item], cfg: CacheConfig, frontend: Frontend, net, with_chip=True,
                with_occ=True, chip_seed: int | None = None, flip: bool = False) -> dict:
    """flip=True: the aligned chips are mirrored before the frozen layers (the service's
    test-time flip-averaging embeds both)."""
    import torch
    from models.eval.chipsim import chip_rng, simulate_chip
    n = len(items)
    out = _empty(n)
    chips: dict[str, list[tuple[int, np.ndarray]]] = {v: [] for v in VARIANTS}
    seed = cfg.chip_seed if chip_seed is None else chip_seed
    for i, it in enumerate(items):
        path = Path(cfg.data_dir) / it.key
        try:
            img = read_rgb(path)                                   # chip simulator input
            live_img = decode_bytes(path.read_bytes(), cfg.settings, "live_photo")  # what /verify decodes
        except Exception:  # noqa: BLE001 - unreadable: FTA
            continue
        face, _ = frontend.face(live_img)
        if face is None:
            continue
        live = frontend.aligned(live_img, face)
        if flip:
            live = np.ascontiguousarray(live[:, ::-1])
        chips["live"].append((i, live))
        out["live_yaw"][i], out["live_pitch"][i] = pose(face.landmarks)
        out["live_illumination"][i], out["live_blur"][i] = photometrics(live)
        if with_occ:
            rng = np.random.default_rng(abs(hash_key(it.key, seed)))
            if rng.random() < cfg.occ_frac:
                occ = occlude(live, rng, frontend.template)
                chips["occ"].append((i, occ))
                out["occ_yaw"][i], out["occ_pitch"][i] = out["live_yaw"][i], out["live_pitch"][i]
                out["occ_illumination"][i], out["occ_blur"][i] = photometrics(occ)
        if with_chip:
            try:
                # LFW (deep-funneled): fixed eye positions, as `idverify eval --chip-landmarks fixed`;
                # other sources: the detected landmarks
                lm = None if it.source == "lfw" else face.landmarks
                data = simulate_chip(img, lm, chip_rng(it.key, seed))
                cimg = decode_bytes(data, cfg.settings)
            except Exception as exc:  # noqa: BLE001 - a failed chip is an FTA, counted
                print(f"chip failed for {it.key}: {exc}", file=sys.stderr)
                continue
            cface, _ = frontend.face(cimg)
            if cface is None:
                continue
            chip = frontend.aligned(cimg, cface)
            if flip:
                chip = np.ascontiguousarray(chip[:, ::-1])
            chips["chip"].append((i, chip))
            out["chip_yaw"][i], out["chip_pitch"][i] = pose(cface.landmarks)
            out["chip_illumination"][i], out["chip_blur"][i] = photometrics(chip)
    with torch.no_grad():
        for v, lst in chips.items():
            if not lst:
                continue
            idx = np.array([i for i, _ in lst])
            x = torch.from_numpy(np.stack([c for _, c in lst]).astype(np.float32))
            f3 = net.forward_features(x, "level3")
            f = net.stages["level2"](f3)
            e = net.forward_from("level2", f)
            out[f"{v}_feat3"][idx] = f3.numpy().astype(np.float16)
            out[f"{v}_feat"][idx] = f.numpy().astype(np.float16)
            out[f"{v}_emb0"][idx] = e.numpy()
            out[f"{v}_ok"][idx] = True
    return out


def hash_key(key: str, seed: int) -> int:
    import hashlib
    return int.from_bytes(hashlib.sha256(f"occ:{seed}:{key}".encode()).digest()[:7], "little")


def split_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}.npz"


def build_split(split: str, items: list[Item], cfg: CacheConfig, reserved: set[str] | None = None,
                with_chip=True, with_occ=True, chip_seed: int | None = None, flip: bool = False) -> Path:
    """Build (or resume) one split of the cache. Non-eval splits are checked against the
    reserved identities before any image is read."""
    if not split.startswith(EVAL_SPLIT):
        assert reserved is not None, "training splits must be checked against the reserved identities"
        assert_no_reserved(items, reserved)
    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    final = split_path(root, split)
    if final.exists():
        return final
    lock = root / f"{split}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = lock.read_text().strip() or "?"
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            lock.unlink()  # stale: its builder is gone; the shards it finished are reused
            return build_split(split, items, cfg, reserved, with_chip, with_occ, chip_seed, flip)
        raise RuntimeError(f"{split} is being built by process {pid} ({lock}); wait for it") from None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        return _build_split(split, items, cfg, root, final, with_chip, with_occ, chip_seed, flip)
    finally:
        lock.unlink(missing_ok=True)


def _build_split(split, items, cfg, root, final, with_chip, with_occ, chip_seed, flip=False) -> Path:
    frontend = Frontend(cfg.settings, threads=1)
    net = _backbone(cfg.threads)
    parts = []
    t0 = time.time()
    n_sh = (len(items) + SHARD - 1) // SHARD
    for k in range(n_sh):
        part = root / f"{split}.part-{k:04d}.npz"
        parts.append(part)
        if part.exists():
            continue
        chunk = items[k * SHARD:(k + 1) * SHARD]
        d = build_shard(chunk, cfg, frontend, net, with_chip, with_occ, chip_seed, flip)
        tmp = part.with_suffix(".tmp.npz")
        np.savez(tmp, **d)
        tmp.rename(part)
        el = time.time() - t0
        print(f"[cache {split}] shard {k + 1}/{n_sh} ({min(len(items), (k + 1) * SHARD)}/{len(items)} images) "
              f"{el:.0f}s, live ok {d['live_ok'].mean():.3f} chip ok {d['chip_ok'].mean():.3f}", file=sys.stderr, flush=True)
    merged: dict[str, list] = {}
    for p in parts:
        with np.load(p) as z:
            for k in z.files:
                merged.setdefault(k, []).append(z[k])
    arrays = {k: np.concatenate(v) for k, v in merged.items()}
    arrays["key"] = np.array([it.key for it in items])
    arrays["identity"] = np.array([it.identity for it in items])
    for lab in ("gender", "age", "race"):
        arrays[lab] = np.array([it.labels.get(lab, np.nan) for it in items], np.float32)
    tmp = final.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.rename(final)
    for p in parts:
        p.unlink()
    return final


def load_split(root: Path, split: str, reserved: set[str] | None = None, allow_eval: bool = False,
               cut: str = CUT) -> dict:
    """Load a cached split into memory. Training code passes the reserved set and never
    allow_eval; every key is re-checked against the reserved identities. `cut`: which cached
    activation to return as `<variant>_feat` (level2 default, or level3)."""
    if split.startswith(EVAL_SPLIT) and not allow_eval:
        raise PermissionError("the eval split (folds 9-10) is for evaluation only")
    with np.load(split_path(root, split)) as z:
        d = {}
        for k in z.files:
            if k.endswith("_feat3") and cut != "level3":
                continue
            if k.endswith("_feat") and cut == "level3":
                continue
            d[k[:-1] if k.endswith("_feat3") else k] = z[k]
    if reserved is not None and not split.startswith(EVAL_SPLIT):
        assert_no_reserved([str(k) for k in d["key"]], reserved)
    return d
