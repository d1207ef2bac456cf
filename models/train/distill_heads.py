"""Attribute heads on the distilled id tower (option `--heads`): the heterogeneous units of the
seed design, reusing `heads.py` (linear heads on the unit embedding, group-sparse over units).

Only chips pass through the id tower here, so the heads that need a live side (domain,
occlusion) are not built; the others learn from each chip: yaw and pitch from its detected
landmarks (ratios, unchanged by the alignment; yaw flips with a mirrored chip), illumination and
blur from the aligned crop, gender / age / race from the labels (LFW gender list, UTKFace).
The heads read the centred embedding e' the towers serve, and are never exported.
"""
from __future__ import annotations

import numpy as np
import torch

from models.train.heads import head_losses, sparsity


def head_targets(chips, idx, cols, crops: np.ndarray, flips: np.ndarray) -> dict[str, np.ndarray]:
    from models.train.cache import photometrics, pose
    p = np.array([pose(chips.lm[i, j]) for i, j in zip(idx, cols)], np.float32).reshape(-1, 2)
    ph = np.array([photometrics(np.ascontiguousarray(c)) for c in crops], np.float32).reshape(-1, 2)
    t = {"yaw": np.where(flips, -p[:, 0], p[:, 0]), "pitch": p[:, 1], "illumination": ph[:, 0], "blur": ph[:, 1]}
    for a in ("gender", "age", "race"):
        if a in chips.labels:
            t[a] = np.asarray(chips.labels[a], np.float32)[idx]
    return t


def head_stats(chips, usable: np.ndarray, template, size: int, seed: int, n: int = 256) -> dict:
    """(mean, std) of the regression targets on a seeded sample of training chips."""
    rng = np.random.default_rng([seed, 7])
    idx = rng.choice(usable, size=min(n, len(usable)), replace=False)
    cols = chips.pick(idx, rng)
    t = head_targets(chips, idx, cols, chips.crops(idx, cols, template, size), np.zeros(len(idx), bool))
    return {a: (float(np.nanmean(t[a])), float(np.nanstd(t[a])) or 1.0)
            for a in ("yaw", "pitch", "illumination", "blur", "age") if a in t and np.isfinite(t[a]).any()}


def head_terms(heads, s: torch.Tensor, chips, idx, cols, crops, flips, stats: dict, cfg: dict):
    """alpha x the summed head losses + gamma x the group sparsity of the head weights."""
    t = {k: torch.from_numpy(np.asarray(v, np.float32)).to(s.device)
         for k, v in head_targets(chips, idx, cols, crops, flips).items()}
    hl = head_losses(heads(s), t, stats)
    sp = sparsity(heads)
    total = cfg["alpha"] * sum(hl.values(), s.new_zeros(())) + cfg["gamma"] * sp
    return total, {**{f"h_{k}": float(v.detach()) for k, v in hl.items()}, "sparsity": float(sp.detach())}
