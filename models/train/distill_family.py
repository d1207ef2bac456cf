"""Tower families for chip distillation: all the trainer knows about a network.

A family plugs in with `register(Family(...))`. The chip store's alignment, the teacher
targets, the trainer and the export read only this interface:

  build()     the pretrained network as a torch module: NHWC float32 RGB 0..255 -> (N, dim), its
              input normalisation inside (the tower contract of the ONNX files)
  base        (model name, version) of the served pretrained towers in models/repository: its
              manifest gives the input size, the 5-point template the pipeline aligns to and the
              embedding size, and is the base of the exported manifest
  stages(net) parameter name -> stage ("stem", "level4" .. "level0", "fc"): the key of the
              per-stage step multiplier (`DEFAULT_MULT`)
  early       the stages `--freeze-epochs` keeps frozen at first

The trainer always runs the networks in eval mode (gradients still flow): a family with batch
norm keeps its statistics frozen, so a chip-only batch never re-estimates them. dlib has none.

Registered: `dlib` (models/build/dlib_resnet.py) and `sface` (models/build/sface_torch.py, the
served sface:2 graph ported to torch with batch norm folded).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPOSITORY = Path(__file__).resolve().parents[1] / "repository"
STAGES = ("stem", "level4", "level3", "level2", "level1", "level0", "fc")   # early -> late
DEFAULT_MULT = {"stem": 0.06, "level4": 0.06, "level3": 0.12, "level2": 0.25, "level1": 0.5, "level0": 1.0, "fc": 1.0}


class FamilyUnavailable(RuntimeError):
    """The family is registered but its torch network is not in this checkout."""


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    base: tuple[str, str]
    stages: Callable[[nn.Module], dict[str, str]]
    early: tuple[str, ...] = ("stem", "level4", "level3")

    def manifest(self, models_dir: Path = REPOSITORY) -> dict:
        name, version = self.base
        return json.loads((Path(models_dir) / name / version / "manifest.json").read_text())

    def template(self, models_dir: Path = REPOSITORY) -> tuple[np.ndarray, int]:
        """The 5-point template (size x size chip pixels) the service aligns this family to."""
        tpl = self.manifest(models_dir)["template"]
        return np.asarray(tpl["points"], np.float32), int(tpl["size"])

    def dim(self, models_dir: Path = REPOSITORY) -> int:
        return int(self.manifest(models_dir)["output"]["dim"])


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown tower family {name!r}; registered: {sorted(FAMILIES)}")
    return FAMILIES[name]


# ----------------------------------------------------------------------------- stage maps


def dlib_stages(net: nn.Module) -> dict[str, str]:
    """DlibResNet parameter names: stem_*, stages.<level>.*, fc.*"""
    out = {}
    for n, _ in net.named_parameters():
        out[n] = "stem" if n.startswith("stem") else n.split(".")[1] if n.startswith("stages.") else "fc"
    return out


def depth_stages(net: nn.Module, bounds=(0.1, 0.3, 0.5, 0.7, 0.85, 0.95)) -> dict[str, str]:
    """A stage map for a network without named stages: parameter tensors in definition order,
    cut at fractions of the depth (`bounds`, one per boundary between `STAGES`). A family whose
    stages have names should map them exactly instead."""
    names = [n for n, _ in net.named_parameters()]
    last = max(len(names) - 1, 1)
    return {n: STAGES[int(np.searchsorted(bounds, i / last, side="right"))] for i, n in enumerate(names)}


def parse_mult(text: str | None, flat: bool = False) -> dict[str, float]:
    """`fc=1,level0=1,level1=0.5,...` over DEFAULT_MULT; flat: every stage 1 (layer-wise steps off)."""
    mult = {s: 1.0 for s in STAGES} if flat else dict(DEFAULT_MULT)
    for part in (text or "").split(","):
        if part.strip():
            k, _, v = part.partition("=")
            if k.strip() not in STAGES:
                raise ValueError(f"unknown stage {k!r} in --mult; stages: {STAGES}")
            mult[k.strip()] = float(v)
    return mult


# ----------------------------------------------------------------------------- the served graph


class Centred(nn.Module):
    """What a tower trained in the centred space serves: normalize(net(x)) - mu. The service
    L2-normalises every embedding it compares (and flip-averages unit vectors), so its cosine is
    the training space's cos' = cos(normalize(e - mu), ...) on both towers."""

    def __init__(self, net: nn.Module, mu: np.ndarray | torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mu", torch.as_tensor(np.asarray(mu, np.float32)).view(1, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1) - self.mu


# ----------------------------------------------------------------------------- the two families


def _dlib() -> nn.Module:
    from models.build.dlib_resnet import DlibResNet
    return DlibResNet.from_dat().eval()


SFACE_BASE = ("sface", "2")
# SFaceNet's stages (models/build/sface_torch.STAGES) on the trainer's: 112 px stem, then 56, 28,
# 14 and 7 px blocks, then the 50,176 -> 128 linear head
SFACE_STAGES = {"stem": "stem", "block1": "level4", "block2": "level3", "block3": "level2", "block4": "level1",
                "head": "fc"}


def _sface() -> nn.Module:
    """The served SFace (sface:2) in torch, batch norm folded, behind the tower contract
    (models/build/sface_torch.py: `SFaceTower`)."""
    from models.build import sface_torch

    folder = REPOSITORY.joinpath(*SFACE_BASE)
    path = folder / json.loads((folder / "manifest.json").read_text())["towers"]["live"]["file"]
    return sface_torch.SFaceTower(sface_torch.from_onnx(path)).eval()


def sface_stages(net: nn.Module) -> dict[str, str]:
    """SFaceTower parameter names: net.body.<stage>.*"""
    return {n: SFACE_STAGES[n.split(".")[2]] for n, _ in net.named_parameters()}


register(Family("dlib", _dlib, ("towers", "baseline"), dlib_stages))
register(Family("sface", _sface, SFACE_BASE, sface_stages))
