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
        # per-layer weights of the penalties: 1 / ||W_pre||^2, so that every layer's squared
        # difference is measured relative to its own scale (dlib's conv weights are ~1e-3, its
        # folded-BN gains ~10: an unweighted sum would only ever see the gains)
        self.layer_weight = {n: 1.0 / max(float(p.pow(2).sum()), 1e-12) for n, p in self.ref.items()
                             if float(p.pow(2).sum()) > 1e-10}

    def coupling(self) -> torch.Tensor:
        """sum over corresponding layers of ||W_id - W_live||^2 / ||W_pre||^2."""
        if self.shared:
            return torch.zeros(())
        a, b = self.id.trainable(), self.live.trainable()
        return sum(w * (a[n] - b[n]).pow(2).sum() for n, w in self.layer_weight.items())

    def anchor(self, tower: str = "live") -> torch.Tensor:
        """sum over layers of ||W - W_pre||^2 / ||W_pre||^2."""
        t = getattr(self, tower).trainable()
        return sum(w * (t[n] - self.ref[n]).pow(2).sum() for n, w in self.layer_weight.items())

    def param_groups(self, lr: float, head_lr: float) -> list[dict]:
        """Adam with a per-tensor learning rate proportional to the tensor's pretrained RMS
        (`lr` is a relative step); tensors that are ~0 in the pretrained net (dlib's conv biases,
        folded away by the affine layers) stay frozen."""
        groups = []
        towers = [self.id] if self.shared else [self.id, self.live]
        for t in towers:
            for n, p in t.trainable().items():
                rms = float(self.ref[n].pow(2).mean().sqrt())
                if rms < 1e-6:
                    p.requires_grad_(False)
                    continue
                groups.append({"params": [p], "lr": lr * rms, "name": n})
        other = [self.scale, self.bias] + (list(self.heads.parameters()) if self.heads is not None else [])
        groups.append({"params": other, "lr": head_lr})
        return groups
