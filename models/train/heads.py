"""Heterogeneous units: multi-task attribute heads on the 128-D embedding.

Computed attributes (every image, both domains): domain (0 live / 1 chip), yaw, pitch (5-point
landmark ratios), illumination (mean luma of the aligned chip), blur (log variance of the
Laplacian of the aligned chip, i.e. sharpness/resolution), occlusion (synthetic occluder on the
live image). Labelled attributes: gender (UTKFace, LFW gender list), age, race (UTKFace).

Each head is linear on the L2-normalised embedding (scaled by sqrt(D)), and its weight is
group-sparse over embedding units (sum_j ||W[:, j]||_2) plus L1, so that every attribute is
carried by few units. Demographic heads are training/probe tools only: they are never exported
to the service and never reach /verify answers or the audit trail.
"""
from __future__ import annotations

import math

ATTRIBUTES: dict[str, dict] = {
    "domain":       {"kind": "binary", "computed": True},
    "yaw":          {"kind": "regress", "computed": True},
    "pitch":        {"kind": "regress", "computed": True},
    "illumination": {"kind": "regress", "computed": True},
    "blur":         {"kind": "regress", "computed": True},
    "occlusion":    {"kind": "binary", "computed": True},
    "gender":       {"kind": "binary", "computed": False},
    "age":          {"kind": "regress", "computed": False},
    "race":         {"kind": "class", "classes": 5, "computed": False},
}
DEMOGRAPHIC = ("gender", "age", "race")
NUISANCE = ("domain", "yaw", "pitch", "illumination", "blur", "occlusion")


def out_dim(attr: str) -> int:
    spec = ATTRIBUTES[attr]
    return spec.get("classes", 1)


def build_heads(dim: int = 128, attributes=tuple(ATTRIBUTES)):
    import torch
    from torch import nn

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.attributes = list(attributes)
            self.dim = dim
            self.heads = nn.ModuleDict({a: nn.Linear(dim, out_dim(a)) for a in self.attributes})
            for h in self.heads.values():
                nn.init.normal_(h.weight, std=0.01)
                nn.init.zeros_(h.bias)

        def features(self, emb):
            return torch.nn.functional.normalize(emb, dim=-1) * math.sqrt(self.dim)

        def forward(self, emb) -> dict:
            z = self.features(emb)
            return {a: h(z) for a, h in self.heads.items()}

    return Heads()


def head_losses(outputs: dict, targets: dict, stats: dict | None = None):
    """Masked per-attribute losses. targets[attr]: float tensor (B,), NaN where unknown.
    Regression targets are standardised with stats[attr] = (mean, std)."""
    import torch
    import torch.nn.functional as F

    losses = {}
    for attr, out in outputs.items():
        if attr not in targets:
            continue
        t = targets[attr]
        m = ~torch.isnan(t)
        if m.sum() < 2:
            continue
        kind = ATTRIBUTES[attr]["kind"]
        o = out[m]
        y = t[m]
        if kind == "binary":
            losses[attr] = F.binary_cross_entropy_with_logits(o[:, 0], y)
        elif kind == "class":
            losses[attr] = F.cross_entropy(o, y.long())
        else:
            mu, sd = (stats or {}).get(attr, (0.0, 1.0))
            losses[attr] = F.smooth_l1_loss(o[:, 0], (y - mu) / max(sd, 1e-6))
    return losses


def sparsity(heads) -> "torch.Tensor":
    from models.train.losses import group_lasso, l1
    total = 0.0
    for h in heads.heads.values():
        total = total + group_lasso(h.weight) + 0.1 * l1(h.weight)
    return total
