"""Data side of end-to-end training: the crop store as batches of cross-domain pairs, live
augmentation drawn afresh every step, the distillation targets and head targets."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.train import crops as C
from models.train.cache import occlude, photometrics


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def embed(net, imgs, batch: int = 128, flip: bool = False) -> np.ndarray:
    out = np.zeros((len(imgs), 128), np.float32)
    with torch.no_grad():
        for s in range(0, len(imgs), batch):
            x = np.asarray(imgs[s:s + batch], np.float32)
            e = F.normalize(net(torch.from_numpy(x)), dim=-1)
            if flip:
                e = F.normalize(e + F.normalize(net(torch.from_numpy(np.ascontiguousarray(x[:, :, ::-1]))), dim=-1), dim=-1)
            out[s:s + batch] = e.numpy()
    return out


# ----------------------------------------------------------------------------- augmentation


def augment_live(img: np.ndarray, rng: np.random.Generator, template: np.ndarray) -> tuple[np.ndarray, bool]:
    """A camera-frame variant of an aligned live crop (uint8 RGB 150x150)."""
    s = img.shape[0]
    x = img
    if rng.random() < 0.7:  # small scale / shift / rotation (alignment jitter)
        ang = rng.uniform(-4, 4)
        sc = rng.uniform(0.94, 1.06)
        m = cv2.getRotationMatrix2D((s / 2, s / 2), ang, sc)
        m[:, 2] += rng.uniform(-3, 3, size=2)
        x = cv2.warpAffine(x, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    x = x.astype(np.float32)
    if rng.random() < 0.8:  # colour: brightness, contrast, saturation, white balance
        x = x * rng.uniform(0.75, 1.25) + rng.uniform(-20, 20)
        x = (x - x.mean()) * rng.uniform(0.75, 1.25) + x.mean()
        g = x.mean(axis=2, keepdims=True)
        x = g + (x - g) * rng.uniform(0.6, 1.3)
        x = x * rng.uniform(0.9, 1.1, size=3)
    if rng.random() < 0.3:  # defocus / motion softness
        sig = rng.uniform(0.5, 1.8)
        x = cv2.GaussianBlur(x, (0, 0), sig)
    if rng.random() < 0.15:  # low-resolution camera
        f = rng.uniform(0.35, 0.7)
        small = cv2.resize(x, (max(8, int(s * f)), max(8, int(s * f))), interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, (s, s), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.3:  # sensor noise
        x = x + rng.normal(0, rng.uniform(2, 8), size=x.shape).astype(np.float32)
    x = np.clip(x, 0, 255).astype(np.uint8)
    if rng.random() < 0.4:  # camera-quality JPEG
        ok, buf = cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 90))])
        if ok:
            x = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    occ = False
    if rng.random() < 0.15:
        x = occlude(x, rng, template)
        occ = True
    return x, occ


# ----------------------------------------------------------------------------- data


class CropSet:
    def __init__(self, root: Path, split: str, reserved: set[str], utk: bool = True):
        d = C.load(root, split, reserved)
        self.d = d
        keep = np.ones(len(d["key"]), bool) if utk else (d["source"] == "lfw")
        self.rows = np.flatnonzero(keep)
        self.identity = d["identity"]
        _, self.ident = np.unique(self.identity, return_inverse=True)
        self.live_ok, self.chip_ok = d["live_ok"], d["chip_ok"]
        any_chip = self.chip_ok.any(1)
        self.self_rows = self.rows[self.live_ok[self.rows] & any_chip[self.rows]]
        groups: dict[int, list[int]] = {}
        for i in self.rows:
            if self.live_ok[i] or any_chip[i]:
                groups.setdefault(int(self.ident[i]), []).append(int(i))
        self.multi = [np.array(g) for g in groups.values()
                      if len(g) >= 2 and any_chip[g].any() and self.live_ok[g].sum() >= 1]
        log(f"[data] {split}: {len(self.rows)} images, {len(self.self_rows)} with chip+live, "
            f"{len(self.multi)} identities with >= 2 images, {self.chip_ok.shape[1]} chips per image")

    def sample(self, rng, batch: int, cross_frac: float):
        chip_rows, live_rows = [], []
        for g in rng.choice(len(self.multi), size=min(int(round(batch * cross_frac)), len(self.multi)), replace=False):
            rows = self.multi[g]
            a = rng.choice(rows[self.chip_ok[rows].any(1)])
            cand = rows[(rows != a) & self.live_ok[rows]]
            if cand.size:
                chip_rows.append(a)
                live_rows.append(rng.choice(cand))
        s = rng.choice(self.self_rows, size=batch - len(chip_rows), replace=False)
        chip_rows = np.array(chip_rows + list(s))
        live_rows = np.array(live_rows + list(s))
        variant = np.array([rng.choice(np.flatnonzero(self.chip_ok[r])) for r in chip_rows])
        return chip_rows, variant, live_rows


def batch_tensors(ds: CropSet, rng, chip_rows, variant, live_rows, template):
    chips = np.stack([ds.d["chips"][r, v] for r, v in zip(chip_rows, variant)])
    lives, occ = [], []
    for r in live_rows:
        x, o = augment_live(np.asarray(ds.d["live"][r]), rng, template)
        lives.append(x)
        occ.append(o)
    lives = np.stack(lives)
    flip_c = rng.random(len(chips)) < 0.5
    flip_l = rng.random(len(lives)) < 0.5
    chips[flip_c] = chips[flip_c, :, ::-1]
    lives[flip_l] = lives[flip_l, :, ::-1]
    t = {}
    cp = ds.d["chip_pose"][chip_rows, variant]
    lp = ds.d["live_pose"][live_rows]
    t["yaw"] = np.concatenate([np.where(flip_c, -cp[:, 0], cp[:, 0]), np.where(flip_l, -lp[:, 0], lp[:, 0])])
    t["pitch"] = np.concatenate([cp[:, 1], lp[:, 1]])
    ph = np.array([photometrics(x) for x in np.concatenate([chips, lives])])
    t["illumination"], t["blur"] = ph[:, 0], ph[:, 1]
    t["domain"] = np.concatenate([np.ones(len(chips)), np.zeros(len(lives))])
    t["occlusion"] = np.concatenate([np.zeros(len(chips)), np.array(occ, float)])
    for k in ("gender", "age", "race"):
        t[k] = np.concatenate([ds.d[k][chip_rows], ds.d[k][live_rows]])
    targets = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in t.items()}
    return (torch.from_numpy(chips.astype(np.float32)), torch.from_numpy(lives.astype(np.float32)), targets)


def teacher_embeddings(ds: CropSet, net, path: Path) -> np.ndarray:
    """Flip-averaged pretrained embedding of every clean live crop (the distillation target)."""
    if path.exists():
        return np.load(path)
    log(f"[teacher] embedding {len(ds.live_ok)} live crops with the pretrained network")
    t = embed(net, ds.d["live"], flip=True)
    np.save(path, t)
    return t


def stats_of(ds: CropSet, rng, template) -> dict:
    st = {}
    rows = rng.choice(ds.self_rows, size=min(1000, len(ds.self_rows)), replace=False)
    ph = np.array([photometrics(np.asarray(ds.d["live"][r])) for r in rows]
                  + [photometrics(np.asarray(ds.d["chips"][r, 0])) for r in rows])
    st["illumination"] = (float(ph[:, 0].mean()), float(ph[:, 0].std()) or 1.0)
    st["blur"] = (float(ph[:, 1].mean()), float(ph[:, 1].std()) or 1.0)
    for i, a in enumerate(("yaw", "pitch")):
        v = ds.d["live_pose"][:, i]
        st[a] = (float(np.nanmean(v)), float(np.nanstd(v)) or 1.0)
    st["age"] = (float(np.nanmean(ds.d["age"])), float(np.nanstd(ds.d["age"])) or 1.0)
    return st
