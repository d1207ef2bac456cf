"""A training run on disk (weights.pt, config.json, history.json) and the embedding of cached
activations: what the trainer writes and export, probe and adapt read (a leaf of models/train)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def pretrained():
    from models.build.dlib_resnet import DlibResNet
    return DlibResNet.from_dat().eval()


def embed(tower, feats: np.ndarray, ok: np.ndarray | None = None, batch: int = 512) -> np.ndarray:
    out = np.zeros((len(feats), 128), np.float32)
    with torch.no_grad():
        for s in range(0, len(feats), batch):
            out[s:s + batch] = tower(torch.from_numpy(feats[s:s + batch].astype(np.float32))).numpy()
    return out


def save_run(model, run: Path, config: dict, history: list, stats: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    state = {"id": model.id.trainable(), "live": model.live.trainable(),
             "scale": model.scale.detach(), "bias": model.bias.detach()}
    state = {k: ({n: p.detach().clone() for n, p in v.items()} if isinstance(v, dict) else v) for k, v in state.items()}
    if model.heads is not None:
        state["heads"] = model.heads.state_dict()
    torch.save(state, run / "weights.pt")
    (run / "config.json").write_text(json.dumps({**config, "stats": stats}, indent=2) + "\n")
    (run / "history.json").write_text(json.dumps(history, indent=1) + "\n")


def load_run(run: Path, base=None):
    """-> DualTowers with the run's weights (heads too when trained with them), config."""
    from models.train.towers import DualTowers
    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    base = base if base is not None else pretrained()
    model = DualTowers(base, shared=cfg.get("shared", False), heads=cfg.get("heads", False),
                       cut=cfg.get("cut", "level2"))
    if (run / "weights.pt").exists():
        state = torch.load(run / "weights.pt", weights_only=True)
        with torch.no_grad():
            for side in ("id", "live"):
                params = getattr(model, side).trainable()
                for n, v in state[side].items():
                    params[n].copy_(v)
            model.scale.copy_(state["scale"])
            model.bias.copy_(state["bias"])
            if model.heads is not None and "heads" in state:
                model.heads.load_state_dict(state["heads"])
    model.eval()
    return model, cfg
