"""The dual towers: `id` (chip photos) and `live` (camera frames), both initialised from the
pretrained dlib ResNet; the stem..CUT stages stay frozen (their activations are cached), the
stages after CUT and the embedding layer (fc) train."""
from __future__ import annotations

import copy

import torch
from torch import nn

from models.build.dlib_resnet import STAGES, DlibResNet
from models.train.cache import CUT
from models.train.heads import build_heads


def trainable_names(net: DlibResNet, cut: str = CUT) -> list[str]:
    after = STAGES[STAGES.index(cut) + 1:]
    return [n for n, _ in net.named_parameters() if n.startswith("fc.") or any(n.startswith(f"stages.{s}.") for s in after)]


class Tower(nn.Module):
    """A full DlibResNet whose trainable part is the stages after `cut` + fc."""

    def __init__(self, net: DlibResNet, cut: str = CUT):
        super().__init__()
        self.net = net
        self.cut = cut
        net.freeze_upto(cut)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net.forward_from(self.cut, feats)

    def trainable(self) -> dict[str, nn.Parameter]:
        names = set(trainable_names(self.net, self.cut))
        return {n: p for n, p in self.net.named_parameters() if n in names}


class DualTowers(nn.Module):
    """id / live towers (shared=True: one siamese network for both), optional attribute heads,
    and the pair-loss scale/bias."""

    def __init__(self, pretrained: DlibResNet, shared: bool = False, heads: bool = False, cut: str = CUT):
        super().__init__()
        self.shared = shared
        self.id = Tower(copy.deepcopy(pretrained), cut)
        self.live = self.id if shared else Tower(copy.deepcopy(pretrained), cut)
        self.heads = build_heads(128) if heads else None
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(-7.0))
        ref = Tower(copy.deepcopy(pretrained), cut).trainable()
        self.ref = {n: p.detach().clone() for n, p in ref.items()}

    def coupling(self) -> torch.Tensor:
        if self.shared:
            return torch.zeros(())
        a, b = self.id.trainable(), self.live.trainable()
        return sum((a[n] - b[n]).pow(2).sum() for n in a)

    def anchor(self, tower: str = "live") -> torch.Tensor:
        t = getattr(self, tower).trainable()
        return sum((t[n] - self.ref[n]).pow(2).sum() for n in t)

    def param_groups(self, lr: float, head_lr: float) -> list[dict]:
        backbone = list(self.id.trainable().values())
        if not self.shared:
            backbone += list(self.live.trainable().values())
        other = [self.scale, self.bias] + (list(self.heads.parameters()) if self.heads is not None else [])
        return [{"params": backbone, "lr": lr}, {"params": other, "lr": head_lr}]
