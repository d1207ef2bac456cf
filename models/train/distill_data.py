"""What the distillation loop reads: the bank of teacher embeddings, the chips, and their batches.

Import-light on purpose (numpy, torch, cv2, PIL; no service settings, detector or data folder):
a pack (`distill_store.write_pack`, one .npz) trains on an accelerator machine that has only those.

Spaces. A teacher view v is the unit embedding of the pretrained network (one view; the store
keeps each live crop and its mirror). mu is the mean of the bank's views. The served towers
output normalize(e) - mu (`distill_family.Centred`), the service normalises and flip-averages,
so the served live embedding of an image is `served(views, mu)` = normalize(c0 + c1) with
c = normalize(v - mu): the targets and the bank are exactly what the exported live tower serves.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

JITTER_SCALE = 0.03     # alignment jitter: +-3 % scale about the crop centre
JITTER_SHIFT = 2.0      # +-2 px at 150 px (scaled with the crop size)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def served(views: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """(N, 2, D) single-view unit embeddings -> the flip-averaged embedding in the centred space."""
    c = unit(np.asarray(views, np.float32) - mu)
    return unit(c[:, 0] + c[:, 1])


def embed_views(net, crops: np.ndarray, device="cpu") -> np.ndarray:
    """(B, S, S, 3) uint8 crops -> (B, 2, D) unit embeddings of each crop and its mirror (no grad)."""
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(np.ascontiguousarray(crops, np.float32)).to(device)
    with torch.no_grad():
        a = F.normalize(net(x), dim=1)
        b = F.normalize(net(torch.flip(x, dims=[2])), dim=1)
    return torch.stack([a, b], 1).float().cpu().numpy()


@dataclass
class Bank:
    """Teacher views of every image of a split (training: the negative bank)."""
    views: np.ndarray            # (M, 2, D) float32
    ok: np.ndarray               # (M,) a live face was found
    ident: np.ndarray            # (M,) int identity index (UTKFace: one per image)
    utk: np.ndarray              # (M,) bool
    keys: np.ndarray             # (M,) data-relative paths

    def mean(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.views[rows], np.float64).mean(axis=(0, 1)).astype(np.float32)


@dataclass
class ChipSet:
    """K decoded chips per image (before alignment) with their landmarks; `rows` maps each image
    to its bank row (its teacher views)."""
    chips: np.ndarray            # (n, K, 126, 102, 3) uint8 (memory-mapped from a store, or in memory)
    ok: np.ndarray               # (n, K)
    lm: np.ndarray               # (n, K, 5, 2)
    variants: list[str]          # "seed:coder:bytes" per column
    rows: np.ndarray             # (n,) -> bank row
    labels: dict = field(default_factory=dict)   # gender / age / race (n,), NaN where unknown

    def columns(self, codecs=None) -> np.ndarray:
        return np.array([codecs is None or v.split(":")[1] in codecs for v in self.variants])

    def usable(self, bank_ok: np.ndarray, codecs=None) -> np.ndarray:
        """Images with a teacher target and at least one chip of the allowed coders."""
        return np.flatnonzero(bank_ok[self.rows] & (self.ok & self.columns(codecs)).any(1))

    def pick(self, idx: np.ndarray, rng: np.random.Generator, codecs=None) -> np.ndarray:
        """One allowed, detected chip column per image, uniformly."""
        allowed = self.ok[idx] & self.columns(codecs)
        return np.array([rng.choice(np.flatnonzero(a)) for a in allowed])

    def crops(self, idx, cols, template: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Aligned crops (B, size, size, 3) uint8 as the service aligns them; with `rng`, the
        template is jittered (scale about the centre, shift)."""
        from service.face.align import align
        out = np.zeros((len(idx), size, size, 3), np.uint8)
        c = np.float32(size / 2.0)
        for b, (i, j) in enumerate(zip(idx, cols)):
            tpl = template
            if rng is not None:
                s = 1.0 + rng.uniform(-JITTER_SCALE, JITTER_SCALE)
                tpl = (c + s * (template - c) + rng.uniform(-1, 1, size=2) * JITTER_SHIFT * size / 150.0).astype(np.float32)
            out[b] = align(np.asarray(self.chips[i, j]), self.lm[i, j], tpl, size)
        return out


def from_store(store: dict, teacher: dict) -> tuple[Bank, ChipSet]:
    """A store split (distill_store.load_store) and its teacher views -> (bank, chips)."""
    _, ident = np.unique(store["identity"], return_inverse=True)
    bank = Bank(teacher["v"], np.asarray(teacher["ok"], bool) & store["live_ok"], ident.astype(np.int64),
                store["source"] == "utk", store["key"])
    n = len(store["key"])
    chips = ChipSet(store["chips"], store["chip_ok"], store["chip_lm"], [str(v) for v in store["variants"]],
                    np.arange(n), {k: store[k] for k in ("gender", "age", "race")})
    return bank, chips


# ----------------------------------------------------------------------------- pack


def _decode(data: np.ndarray, lengths: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The chip files decoded (Pillow, as the store decoded them); zeros where no face was found."""
    from PIL import Image
    out = np.zeros((*lengths.shape, 126, 102, 3), np.uint8)
    offs = np.concatenate([[0], np.cumsum(lengths.ravel())]).astype(np.int64)
    for f, (a, b) in enumerate(zip(offs[:-1], offs[1:])):
        if b > a and ok.ravel()[f]:
            with Image.open(io.BytesIO(data[a:b].tobytes())) as im:
                out.reshape(-1, 126, 102, 3)[f] = np.asarray(im.convert("RGB"))
    return out


def load_pack(path: Path) -> tuple[Bank, ChipSet, Bank, ChipSet, dict]:
    """(bank, training chips, fold-8 bank, fold-8 chips, info) from `distill_store.write_pack`'s file."""
    z = dict(np.load(path))
    bank = Bank(z["bank_views"].astype(np.float32), z["bank_ok"], z["bank_ident"], z["bank_utk"], z["bank_key"])
    chips_px = z["chips"] if "chips" in z else _decode(z["chip_data"], z["chip_len"], z["chip_ok"])
    chips = ChipSet(chips_px, z["chip_ok"], z["chip_lm"], [str(v) for v in z["variants"]], z["rows"],
                    {a: z[f"label_{a}"] for a in ("gender", "age", "race")})
    n_val = len(z["val_key"])
    vbank = Bank(z["val_views"].astype(np.float32), z["val_ok"], z["val_ident"], np.zeros(n_val, bool), z["val_key"])
    vchips = ChipSet(_decode(z["val_chip_data"], z["val_chip_len"], z["val_chip_ok"]), z["val_chip_ok"], z["val_chip_lm"],
                     [str(v) for v in z["val_variants"]], np.arange(n_val))
    return bank, chips, vbank, vchips, {"family": str(z["family"]), "path": str(path)}
