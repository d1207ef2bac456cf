"""Losses of chip distillation and the early signals, all in the centred space.

Every embedding compared here is e' = normalize(normalize(e) - mu) (mu: the mean teacher view of
the bank), and every target is the served, flip-averaged teacher embedding of a clean live crop
(`distill_data.served`). For a batch of chips s (student) of images i with targets t:

  (a) distillation   1 - cos'(s_i, t_i)
  (b) binary         BCE(scale * (cos' - b), y) with b the teacher's own FAR 1e-3 point on the
                     bank's impostor cos' distribution (`thresholds`); y = 1 for the bank entries
                     of the chip's identity (its own clean image first of all), y = 0 for the
                     top-k hardest + k random entries of other identities, never those the
                     teacher itself scores above its FAR 1e-4 point (probable duplicates)
  (c) relational     max(0, cos'(s_i, t_j) - cos'(t_i, t_j) - margin) over the mined j: a chip no
                     closer to an impostor than its clean source is
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.eval.metrics import ScoreSet, far_key, tar_at_far


@dataclass
class LossConfig:
    distill: float = 1.0
    binary: float = 1.0
    relational: float = 0.0
    margin: float = 0.05
    scale: float = 24.0
    hard_k: int = 32
    rand_k: int = 32


def thresholds(targets: np.ndarray, ident: np.ndarray, rows: np.ndarray, fars=(1e-3, 1e-4), sample: int = 4000,
               seed: int = 0) -> dict[str, float]:
    """cos' at which the teacher accepts `far` of the bank's impostors (pairs of different
    identities among up to `sample` bank entries, seeded)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(rows, size=min(sample, len(rows)), replace=False)
    t, idn = targets[pick], ident[pick]
    iu = np.triu_indices(len(pick), 1)
    s = (t @ t.T)[iu]
    s = s[idn[iu[0]] != idn[iu[1]]]
    return {far_key(f): float(np.quantile(s, 1.0 - f)) for f in fars}


def student_space(e: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Raw network output -> e' (the centred unit embedding the served graph leads to)."""
    return F.normalize(F.normalize(e, dim=1) - mu, dim=1)


def mine_negatives(sims: torch.Tensor, tt: torch.Tensor, same: torch.Tensor, valid: torch.Tensor, b_duplicate: float,
                   hard_k: int, rand_k: int, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bank negatives per chip: the `hard_k` entries the student scores highest, then `rand_k`
    drawn uniformly, among entries of other identities that the teacher scores below its FAR
    1e-4 point against the chip's own clean image. -> (indices (B, hard_k + rand_k), usable mask):
    a row with fewer allowed entries than asked marks the surplus unusable."""
    allowed = ~same & valid[None, :] & (tt < b_duplicate)
    k = min(hard_k, sims.shape[1])
    hard = sims.masked_fill(~allowed, -float("inf")).topk(k, dim=1).indices
    w = allowed.float()
    w[w.sum(1) == 0] = 1.0
    rand = torch.multinomial(w, rand_k, replacement=True, generator=gen) if rand_k else hard[:, :0]
    neg = torch.cat([hard, rand], 1)
    return neg, allowed.gather(1, neg)


def losses(s: torch.Tensor, own: torch.Tensor, bank: torch.Tensor, ident: torch.Tensor, valid: torch.Tensor,
           b_accept: float, b_duplicate: float, cfg: LossConfig, gen: torch.Generator | None = None):
    """s: (B, D) student e' of the chips; own: (B,) bank rows of their clean images; bank: (M, D)
    targets; ident: (M,) identities; valid: (M,) entries in this run. Returns (loss, parts)."""
    t = bank[own]
    cos_own = (s * t).sum(1)
    parts = {"own_cos": float(cos_own.mean().detach())}
    loss = s.new_zeros(())
    if cfg.distill:
        d = (1.0 - cos_own).mean()
        loss = loss + cfg.distill * d
        parts["distill"] = float(d.detach())
    if not (cfg.binary or cfg.relational):
        return loss, parts
    sims = s @ bank.T                                        # (B, M)
    same = ident[own][:, None] == ident[None, :]
    with torch.no_grad():
        tt = t @ bank.T                                      # teacher-teacher cos'
        neg, neg_ok = mine_negatives(sims.detach(), tt, same, valid, b_duplicate, cfg.hard_k, cfg.rand_k, gen)
        neg_mask = neg_ok.float()
    s_neg = sims.gather(1, neg)
    k = min(cfg.hard_k, bank.shape[0])
    parts["hard_neg_cos"] = float((s_neg.detach()[:, :k] * neg_mask[:, :k]).sum() / neg_mask[:, :k].sum().clamp(min=1))
    if cfg.binary:
        pos = (same & valid[None, :]).float()
        lp = (F.binary_cross_entropy_with_logits(cfg.scale * (sims - b_accept), torch.ones_like(sims), reduction="none")
              * pos).sum(1) / pos.sum(1).clamp(min=1)
        ln = (F.binary_cross_entropy_with_logits(cfg.scale * (s_neg - b_accept), torch.zeros_like(s_neg), reduction="none")
              * neg_mask).sum() / neg_mask.sum().clamp(min=1)
        b = lp.mean() + ln
        loss = loss + cfg.binary * b
        parts.update(binary=float(b.detach()), neg_accepted=float(((s_neg.detach() > b_accept).float() * neg_mask).sum()
                                                                  / neg_mask.sum().clamp(min=1)))
    if cfg.relational:
        r = (F.relu(s_neg - tt.gather(1, neg) - cfg.margin) * neg_mask).sum() / neg_mask.sum().clamp(min=1)
        loss = loss + cfg.relational * r
        parts["relational"] = float(r.detach())
    return loss, parts


# ----------------------------------------------------------------------------- early signals


def chip_live_signals(chip_emb: np.ndarray, chip_ok: np.ndarray, live_emb: np.ndarray, live_ok: np.ndarray,
                      ident: np.ndarray) -> dict:
    """Fold-8 signals for one coder: every chip x live pair of different images; genuine = same
    identity, impostors = different identities; a chip or live face not found scores -inf (a
    reject). TAR at FAR 1e-2 / 1e-3, the FAR 1e-3 impostor cos', the mean own-image cos'."""
    s = chip_emb @ live_emb.T
    s[~(chip_ok[:, None] & live_ok[None, :])] = -np.inf
    same = ident[:, None] == ident[None, :]
    gen = s[same & ~np.eye(len(ident), dtype=bool)]
    rows = tar_at_far(gen, ScoreSet(s[~same].astype(np.float32)), (1e-2, 1e-3))
    own = np.diag(s)[chip_ok & live_ok]
    return {"tar": {far_key(r["far_target"]): r["tar"] for r in rows},
            "far_1e-03_cos": rows[1]["threshold"], "own_cos": float(own.mean()) if own.size else float("nan"),
            "n_genuine": int(gen.size), "n_impostors": int((~same).sum())}


def stop_reason(evals: list[dict], m: int, rise: float = 0.01, flat: float = 0.005, codec: str = "rgb") -> str | None:
    """Run A's signature: over the last `m` evaluations TAR@1e-2 rose by >= `rise` while the
    best TAR@1e-3 among them is within `flat` of where it was (or lower)."""
    if m <= 0 or len(evals) < m + 1:
        return None
    start, window = evals[-(m + 1)][codec]["tar"], [e[codec]["tar"] for e in evals[-m:]]
    d2 = window[-1]["1e-02"] - start["1e-02"]
    d3 = max(w["1e-03"] for w in window) - start["1e-03"]
    if d2 >= rise and d3 <= flat:
        return (f"{codec} TAR@1e-2 rose {d2:+.4f} while TAR@1e-3 moved at most {d3:+.4f} over the last {m} "
                f"evaluations")
    return None
