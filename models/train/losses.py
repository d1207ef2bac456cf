"""Loss terms of the dual heterogeneous network (torch).

total = pair_loss(id(chip), live(live))                       binary same/different, hard negatives
      + lam    * sum_l ||W_id[l] - W_live[l]||^2               coupling (DualTowers.coupling)
      + mu     * sum_l ||W_live[l] - W_pre[l]||^2              anchor (DualTowers.anchor)
      + heads  (attribute losses, masked where a label is missing)
      + gamma  * group_lasso(head weights over embedding units) (+ l1)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def binary_pair_loss(e_id: torch.Tensor, e_live: torch.Tensor, ident: torch.Tensor,
                     scale: torch.Tensor, bias: torch.Tensor, hard_k: int = 8,
                     pos_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Binary cross-entropy on cross-domain pairs.

    e_id (B, D): id-tower embeddings of chip images; e_live (B, D): live-tower embeddings of live
    images; row i of both belongs to identity ident[i] (positives: every (i, j) with equal ident,
    the diagonal included). Negatives: for every chip row the `hard_k` most similar live images
    of other identities, and for every live column the `hard_k` most similar chips (mined inside
    the batch on the current scores). logit = scale * cos + bias.
    """
    cos = cosine_matrix(e_id, e_live)
    logits = scale * cos + bias
    same = ident[:, None] == ident[None, :]
    pos = logits[same]
    neg_logits = logits.masked_fill(same, float("-inf"))
    k = max(1, min(hard_k, int((~same).sum(1).min().item()) if (~same).any() else 1))
    rows = neg_logits.topk(k, dim=1).values
    cols = neg_logits.topk(k, dim=0).values
    neg = torch.cat([rows.reshape(-1), cols.reshape(-1)])
    neg = neg[torch.isfinite(neg)]
    l_pos = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
    l_neg = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)) if neg.numel() else pos.sum() * 0
    loss = (pos_weight * l_pos + l_neg) / (1.0 + pos_weight)
    with torch.no_grad():
        stats = {"pos_cos": float(cos[same].mean()), "hardneg_cos": float(cos.masked_fill(same, -2).max(1).values.mean())}
    return loss, stats


def group_lasso(weight: torch.Tensor) -> torch.Tensor:
    """weight (K, D) of a head on D embedding units: sum_j ||weight[:, j]||_2 (unit = group)."""
    return weight.norm(dim=0).sum()


def l1(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().sum()
