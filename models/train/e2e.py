"""End-to-end dual towers: every layer of both towers trains, on aligned crops (not activations).

    id tower   : the pretrained dlib ResNet, every layer trainable (stem included), fed chips
    live tower : the same start, trainable, held near the pretrained net by the anchor term
    loss       : binary same/different on cross-domain pairs (in-batch hard negatives, both ways)
               + lam   * sum_l ||W_id,l - W_live,l||^2 / ||W_pre,l||^2    (coupling, the core)
               + mu    * sum_l ||W_live,l - W_pre,l||^2 / ||W_pre,l||^2   (anchor)
               + distill * (1 - cos(tower(x), f_pre(clean live source of x)))
               + alpha * attribute heads + gamma * group sparsity          (heterogeneous units)

Data (`models.train.crops`): LFW identities outside folds 9-10 and fold 8, UTKFace train; K
precomputed chips per image in both encodings, one drawn per step; the live side is augmented
afresh every step (blur, sensor noise, camera JPEG, colour, scale/shift/rotation, occlusion,
mirror). Selection on fold 8 only. Seeded; a checkpoint per epoch, so a run resumes.

    python -m models.train.e2e --run .cache/train/runs/e2e-main --epochs 8
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.eval.metrics import far_key
from models.train import data as D
from models.train.e2e_data import CropSet, batch_tensors, embed, log, stats_of, teacher_embeddings
from models.train.heads import build_heads, head_losses, sparsity
from models.train.losses import binary_pair_loss

DEFAULTS = dict(epochs=8, steps_per_epoch=300, batch=64, cross_frac=0.5, lr=1.5e-3, head_lr=2e-3, warmup=50,
                lam=1.0, mu=1.0, distill=1.0, alpha=0.1, gamma=2e-3, hard_k=8, heads=True, freeze_upto=None,
                utk=True, seed=0, threads=2)


# ----------------------------------------------------------------------------- model


class E2ETowers(nn.Module):
    def __init__(self, pretrained: nn.Module, heads: bool = True, freeze_upto: str | None = None):
        super().__init__()
        self.id = copy.deepcopy(pretrained)
        self.live = copy.deepcopy(pretrained)
        if freeze_upto:  # the old recipe's frozen early layers (ablation)
            self.id.freeze_upto(freeze_upto)
            self.live.freeze_upto(freeze_upto)
        self.heads = build_heads(128) if heads else None
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(-7.0))
        self.ref = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
        self.layer_weight = {n: 1.0 / float(p.pow(2).sum()) for n, p in self.ref.items() if float(p.pow(2).sum()) > 1e-10}

    def _trainable(self, net) -> dict:
        return {n: p for n, p in net.named_parameters() if p.requires_grad}

    def coupling(self) -> torch.Tensor:
        a, b = dict(self.id.named_parameters()), dict(self.live.named_parameters())
        return sum(w * (a[n] - b[n]).pow(2).sum() for n, w in self.layer_weight.items() if a[n].requires_grad)

    def anchor(self) -> torch.Tensor:
        t = dict(self.live.named_parameters())
        return sum(w * (t[n] - self.ref[n]).pow(2).sum() for n, w in self.layer_weight.items() if t[n].requires_grad)

    def param_groups(self, lr: float, head_lr: float) -> list[dict]:
        """Per-tensor step proportional to the tensor's pretrained RMS; ~0 tensors stay frozen."""
        groups = []
        for net in (self.id, self.live):
            for n, p in net.named_parameters():
                if not p.requires_grad:
                    continue
                rms = float(self.ref[n].pow(2).mean().sqrt())
                if rms < 1e-6:
                    p.requires_grad_(False)
                    continue
                groups.append({"params": [p], "lr": lr * rms})
        other = [self.scale, self.bias] + (list(self.heads.parameters()) if self.heads is not None else [])
        groups.append({"params": other, "lr": head_lr})
        return groups


def pretrained():
    from models.build.dlib_resnet import DlibResNet
    return DlibResNet.from_dat().eval()


# ----------------------------------------------------------------------------- validation (fold 8)


def validate(model, val: CropSet) -> dict:
    from models.train.fasteval import identity_verification
    d = val.d
    el = embed(model.live, d["live"])
    out = {}
    for j, name in enumerate(str(v) for v in d["variants"]):
        ei = embed(model.id, d["chips"][:, j])
        r = identity_verification(ei, d["chip_ok"][:, j], el, d["live_ok"], val.identity)
        out[name.split(":")[1]] = r["ivs"]
        out["live"] = r["live"]
    return out


# ----------------------------------------------------------------------------- loop


def train(cfg: dict, run: Path, crops_root: Path, settings) -> dict:
    from tqdm import tqdm
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    reserved = D.reserved_identities(Path(settings.data_dir))
    ds = CropSet(crops_root, "train", reserved, utk=cfg["utk"])
    val = CropSet(crops_root, "val", reserved)
    D.assert_no_reserved([str(k) for k in ds.d["key"]], reserved)
    from models.train.cache import tower_template
    template, _ = tower_template(settings.models_dir)
    base = pretrained()
    teacher = torch.from_numpy(teacher_embeddings(ds, base, crops_root / "train" / "teacher.npy"))
    model = E2ETowers(base, heads=cfg["heads"], freeze_upto=cfg["freeze_upto"])
    opt = torch.optim.Adam(model.param_groups(cfg["lr"], cfg["head_lr"]))
    total = cfg["epochs"] * cfg["steps_per_epoch"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng = np.random.default_rng(cfg["seed"])
    stats = stats_of(ds, np.random.default_rng(cfg["seed"] + 1), template)
    history: list = []
    start_epoch, best = 1, {"key": -1.0, "epoch": 0}
    ck = run / "checkpoint.pt"
    if ck.exists():  # resume
        state = torch.load(ck, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
        log(f"[e2e] resumed from {ck} after epoch {state['epoch']}")
    else:
        v0 = validate(model.eval(), val)
        history.append({"epoch": 0, "val": v0})
        log(f"[e2e] epoch 0 val {json.dumps(v0)}")
    t0 = time.time()
    for epoch in range(start_epoch, cfg["epochs"] + 1):
        model.train()
        agg: dict[str, float] = {}
        bar = tqdm(range(cfg["steps_per_epoch"]), desc=f"epoch {epoch}/{cfg['epochs']}", file=sys.stderr,
                   mininterval=30, ascii=True)
        for _ in bar:
            cr, var, lr_ = ds.sample(rng, cfg["batch"], cfg["cross_frac"])
            xc, xl, targets = batch_tensors(ds, rng, cr, var, lr_, template)
            e_id, e_live = model.id(xc), model.live(xl)
            l_pair, st = binary_pair_loss(e_id, e_live, torch.from_numpy(ds.ident[cr]), model.scale, model.bias,
                                          cfg["hard_k"])
            loss = l_pair
            parts = {"pair": float(l_pair.detach()), **st}
            if cfg["distill"]:
                okc = torch.from_numpy(ds.live_ok[cr]).float()
                dist = ((1 - F.cosine_similarity(e_id, teacher[cr])) * okc).sum() / okc.sum().clamp(min=1) + \
                    (1 - F.cosine_similarity(e_live, teacher[lr_])).mean()
                loss = loss + cfg["distill"] * dist
                parts["distill"] = float(dist.detach())
            if cfg["lam"]:
                c = model.coupling()
                loss = loss + cfg["lam"] * c
                parts["coupling"] = float(c.detach())
            if cfg["mu"]:
                a = model.anchor()
                loss = loss + cfg["mu"] * a
                parts["anchor"] = float(a.detach())
            if model.heads is not None:
                hl = head_losses(model.heads(torch.cat([e_id, e_live])), targets, stats)
                sp = sparsity(model.heads)
                loss = loss + cfg["alpha"] * sum(hl.values()) + cfg["gamma"] * sp
                parts.update({f"h_{k}": float(x.detach()) for k, x in hl.items()}, sparsity=float(sp.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, x in parts.items():
                agg[k] = agg.get(k, 0.0) + x / cfg["steps_per_epoch"]
            bar.set_postfix(pair=f"{parts['pair']:.3f}", pos=f"{st['pos_cos']:.2f}", neg=f"{st['hardneg_cos']:.2f}")
        model.eval()
        vs = validate(model, val)
        history.append({"epoch": epoch, "train": agg, "val": vs, "elapsed_s": round(time.time() - t0, 1)})
        log(f"[e2e] epoch {epoch}/{cfg['epochs']} {time.time() - t0:.0f}s "
            + " ".join(f"{k}={x:.4g}" for k, x in agg.items()) + f" | val {json.dumps(vs)}")
        key = vs["rgb"][far_key(1e-3)] + 1e-3 * vs["rgb"][far_key(1e-2)]
        if key > best["key"]:
            best = {"key": key, "epoch": epoch}
            torch.save({"model": model.state_dict(), "stats": stats, "epoch": epoch}, run / "best.pt")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "history": history,
                    "best": best, "epoch": epoch}, run / "checkpoint.tmp")
        (run / "checkpoint.tmp").replace(ck)
        write_log(run, cfg, history, best)
    return {"history": history, "best": best}


def write_log(run: Path, cfg: dict, history: list, best: dict) -> None:
    (run / "log.json").write_text(json.dumps({"config": cfg, "best": best, "history": history}, indent=1) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for enc in [k for k in ("rgb", "ycc", "live") if k in history[0]["val"]]:
        ax[0].plot(ep, [h["val"][enc][far_key(1e-3)] for h in history], marker="o", label=f"val {enc} TAR@1e-3")
    ax[0].set_xlabel("epoch"), ax[0].set_ylabel("TAR (fold 8)"), ax[0].legend(), ax[0].grid(alpha=.3)
    tr = [h for h in history if "train" in h]
    for k in ("pair", "distill", "coupling", "anchor"):
        if tr and k in tr[0]["train"]:
            ax[1].plot([h["epoch"] for h in tr], [h["train"][k] for h in tr], marker="o", label=k)
    ax[1].set_yscale("log"), ax[1].set_xlabel("epoch"), ax[1].legend(), ax[1].grid(alpha=.3)
    fig.suptitle(f"{run.name} (best epoch {best['epoch']})")
    fig.tight_layout()
    fig.savefig(run / "curves.png", dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    from service.settings import get_settings
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--crops", type=Path, default=Path(".cache/train/crops"))
    for k, v in DEFAULTS.items():
        if isinstance(v, bool):
            ap.add_argument(f"--{k.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"), default=v)
        else:
            ap.add_argument(f"--{k.replace('_', '-')}", type=type(v) if v is not None else str, default=v)
    a = ap.parse_args(argv)
    cfg = {k: getattr(a, k) for k in DEFAULTS}
    cfg["command"] = "python -m models.train.e2e " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    res = train(cfg, a.run, a.crops, get_settings())
    cfg["train_seconds"] = round(time.time() - t0, 1)
    (a.run / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    log(f"[e2e] done in {cfg['train_seconds']}s; best epoch {res['best']['epoch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
