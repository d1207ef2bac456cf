"""Chip-adapted id tower by frozen-teacher distillation: the training loop.

    live tower : the family's pretrained network, frozen: the teacher. Its flip-averaged, centred
                 embeddings of every training image's clean live crop are the targets and the bank
    id tower   : a copy; every layer trains, Adam with per-stage steps that shrink towards the early
                 layers (`distill_family.DEFAULT_MULT`), relative to each tensor's pretrained RMS by
                 default (`--freeze-epochs N` keeps the early stages frozen for N epochs), warm-up
                 then cosine decay, and after every Adam step the decoupled pull
                 W <- W - lr * mult * lam * (W - W_pre) towards the pretrained weights (the seed's
                 weight-difference term: the live tower is the pretrained network)
    losses     : `distill_loss` (distillation, binary loss at the teacher's FAR 1e-3 point with
                 bank negatives, optional relational hinge), in the centred space; optional
                 attribute heads with their sparsity penalty (`heads.py`) on the id tower
    signals    : every `eval_every` steps on fold 8 (`validate`): per coder TAR@1e-3 / 1e-2, the FAR
                 1e-3 impostor cos', the mean own-image cos'; a run whose rgb TAR@1e-2 rises while
                 TAR@1e-3 stays flat over `stop_m` evaluations stops (`distill_loss.stop_reason`)
    run folder : config.json, log.jsonl (JSON lines), curves.png, checkpoint.pt (model, optimiser,
                 step, RNG state: `--resume` continues exactly), best.pt (best fold-8 rgb TAR@1e-3),
                 space.json (mu and the teacher's operating points, which the export serves)

Randomness is a pure function of (seed, step): batch order from a per-epoch permutation, chip
choice, alignment jitter, mirroring and random negatives from per-step generators, so a resumed
run takes the same steps as an uninterrupted one. Device-agnostic (`device="auto"`: CUDA when
there is one); the data stay on the host, the bank and the network on the device.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.train.distill_data import Bank, ChipSet, served
from models.train.distill_family import Family, parse_mult
from models.train.distill_loss import LossConfig, chip_live_signals, losses, stop_reason, student_space, thresholds

HEAD_ATTRIBUTES = ("yaw", "pitch", "illumination", "blur", "gender", "age", "race")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def lr_factor(step: int, total: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


# ----------------------------------------------------------------------------- model pieces


def param_groups(net, family: Family, cfg: dict, heads=None) -> list[dict]:
    """One Adam group per tensor: step lr x its stage's multiplier, x the tensor's pretrained RMS
    with `relative` (dlib's conv weights have RMS 4e-4..2e-2, its folded batch-norm gains ~10:
    one absolute step size fits neither). `pull` is the tensor's rate of the decoupled pull,
    lr x multiplier (no RMS factor: it is a fraction of W - W_pre). The heads: their own group."""
    mult = parse_mult(cfg["mult"], cfg["flat_steps"])
    stage = family.stages(net)
    out = []
    for n, p in net.named_parameters():
        rms = float(p.detach().pow(2).mean().sqrt()) if cfg["relative"] else 1.0
        step = cfg["lr"] * mult[stage[n]]
        out.append({"params": [p], "names": [n], "stage": stage[n], "base_lr": step * rms, "base_pull": step})
    if heads is not None:
        out.append({"params": list(heads.parameters()), "names": [], "stage": "heads", "base_lr": cfg["head_lr"],
                    "base_pull": 0.0})
    return out


def pull(opt, pre: dict, lam: float) -> None:
    """The decoupled weight-difference term: after the Adam step, W <- W - r * lam * (W - W_pre),
    r = the group's current `pull` rate (its lr when it has none)."""
    if not lam:
        return
    with torch.no_grad():
        for g in opt.param_groups:
            for n, p in zip(g["names"], g["params"]):
                p.sub_(g.get("pull", g["lr"]) * lam * (p - pre[n]))


def embed_chips(net, chips: ChipSet, idx, col: int, mu: torch.Tensor, template, size, device, flip: bool,
                batch: int = 128) -> np.ndarray:
    """e' of chips through `net` (flip-averaged as the service serves it when `flip`)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            part = idx[s:s + batch]
            x = torch.from_numpy(chips.crops(part, [col] * len(part), template, size).astype(np.float32)).to(device)
            e = student_space(net(x), mu)
            if flip:
                e = torch.nn.functional.normalize(e + student_space(net(torch.flip(x, dims=[2])), mu), dim=1)
            out.append(e.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, mu.shape[1]), np.float32)


def validate(net, vchips: ChipSet, vtargets: np.ndarray, vbank: Bank, mu, template, size, device, flip=True) -> dict:
    """Fold-8 early signals per coder: chips through `net`, live images through the teacher."""
    net.eval()
    n = len(vchips.rows)
    res = {}
    for j, spec in enumerate(vchips.variants):
        emb = np.zeros((n, vtargets.shape[1]), np.float32)
        ok = vchips.ok[:, j]
        emb[ok] = embed_chips(net, vchips, np.flatnonzero(ok), j, mu, template, size, device, flip)
        res[spec.split(":")[1]] = chip_live_signals(emb, ok, vtargets[vchips.rows], vbank.ok[vchips.rows],
                                                    vbank.ident[vchips.rows])
    return res


# ----------------------------------------------------------------------------- the loop


def train(cfg: dict, run: Path, family: Family, data: tuple[Bank, ChipSet, Bank, ChipSet], resume: bool = False,
          until: int | None = None) -> dict:
    """Train (or, with `resume`, continue) the run; `until`: stop after that step, checkpointed."""
    from tqdm import tqdm
    bank, chips, vbank, vchips = data
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    dev = pick_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    if dev.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    template, size = family.template()
    codecs = tuple(c for c in cfg["codecs"].split(",") if c)
    valid = bank.ok & (cfg["utk"] | ~bank.utk)
    mu = bank.mean(np.flatnonzero(valid))
    targets = served(bank.views, mu)
    ops = thresholds(targets, bank.ident, np.flatnonzero(valid), seed=cfg["seed"])
    usable = chips.usable(valid, codecs)
    if not len(usable):
        raise SystemExit("no training image has both a teacher target and a chip of the chosen coders")
    spe = cfg["steps_per_epoch"] or max(1, len(usable) // cfg["batch"])
    total = cfg["epochs"] * spe
    mu_t = torch.from_numpy(mu).to(dev).view(1, -1)
    bank_t, ident_t = torch.from_numpy(targets).to(dev), torch.from_numpy(bank.ident).to(dev)
    valid_t = torch.from_numpy(valid).to(dev)
    vtargets = served(vbank.views, mu)
    net = family.build().to(dev).eval()       # eval mode throughout: batch norm (if any) keeps its statistics
    pre = {n: p.detach().clone() for n, p in net.named_parameters()}
    heads, stats = None, {}
    if cfg["heads"]:
        from models.train.distill_heads import head_stats
        from models.train.heads import build_heads
        heads = build_heads(int(targets.shape[1]), HEAD_ATTRIBUTES).to(dev)
        stats = head_stats(chips, usable, template, size, cfg["seed"])
    opt = torch.optim.Adam(param_groups(net, family, cfg, heads))
    lc = LossConfig(**{k: cfg[k] for k in LossConfig.__dataclass_fields__})
    state = {"step": 0, "evals": [], "best": {"key": -1.0, "step": 0}, "stopped": None}
    (run / "space.json").write_text(json.dumps({"mu": mu.tolist(), "thresholds": ops, "space": "normalize(normalize(e) - mu)"}) + "\n")
    logf = (run / "log.jsonl").open("a")

    def record(rec: dict) -> None:
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    ck = run / "checkpoint.pt"
    if resume and ck.exists():
        c = torch.load(ck, map_location=dev, weights_only=False)
        net.load_state_dict(c["student"])
        if heads is not None:
            heads.load_state_dict(c["heads"])
        opt.load_state_dict(c["opt"])
        torch.set_rng_state(c["torch_rng"].cpu())
        state = c["state"]
        record({"event": "resume", "step": state["step"]})
        log(f"[distill] resumed {run} at step {state['step']}/{total}")
    else:
        record({"event": "start", "family": family.name, "device": str(dev), "images": int(len(usable)),
                "bank": int(valid.sum()), "steps_per_epoch": spe, "total_steps": total, "thresholds": ops})
    early = set(family.early)

    def evaluate(step: int) -> None:
        v = validate(net, vchips, vtargets, vbank, mu_t, template, size, dev, cfg["val_flip"])
        state["evals"].append(v)
        record({"event": "eval", "step": step, "val": v})
        main = v.get("rgb") or next(iter(v.values()))
        key = main["tar"]["1e-03"] + 1e-3 * main["tar"]["1e-02"]
        log(f"[distill] step {step} fold 8 " + " ".join(f"{c} {r['tar']['1e-03']:.4f}/{r['tar']['1e-02']:.4f}" for c, r in v.items())
            + f" (TAR@1e-3/1e-2); rgb FAR1e-3 cos' {main['far_1e-03_cos']:.3f}, own cos' {main['own_cos']:.3f}")
        if key > state["best"]["key"]:
            state["best"] = {"key": key, "step": step, "val": v}
            torch.save({"student": net.state_dict(), "heads": heads.state_dict() if heads is not None else None,
                        "step": step, "mu": mu}, run / "best.pt")
        reason = stop_reason(state["evals"], cfg["stop_m"], cfg["stop_rise"], cfg["stop_flat"],
                             "rgb" if "rgb" in v else next(iter(v)))
        if reason:
            state["stopped"] = {"step": step, "reason": reason}
            record({"event": "stop", "step": step, "reason": reason})
            log(f"[distill] stop: {reason}")

    def checkpoint() -> None:
        torch.save({"student": net.state_dict(), "heads": heads.state_dict() if heads is not None else None,
                    "opt": opt.state_dict(), "torch_rng": torch.get_rng_state(), "state": state}, run / "checkpoint.tmp")
        (run / "checkpoint.tmp").replace(ck)
        from models.train.distill_plots import curves
        curves(run)

    if state["step"] == 0 and not state["evals"]:
        evaluate(0)
        checkpoint()
    bar = tqdm(total=total, initial=state["step"], desc=f"distill {family.name}", file=sys.stderr, ascii=True,
               mininterval=5, disable=state["step"] >= total or state["stopped"] is not None)
    agg: dict[str, float] = {}
    t0 = time.time()
    while state["step"] < total and state["stopped"] is None:
        step = state["step"]
        epoch, j = divmod(step, spe)
        rng = np.random.default_rng([cfg["seed"], step])
        gen = torch.Generator(device=dev).manual_seed(cfg["seed"] * 1_000_003 + step)
        perm = np.random.default_rng([cfg["seed"], 1_000_000 + epoch]).permutation(usable)
        idx = np.take(perm, np.arange(j * cfg["batch"], (j + 1) * cfg["batch"]), mode="wrap")
        cols = chips.pick(idx, rng, codecs)
        x = chips.crops(idx, cols, template, size, rng if cfg["jitter"] else None)
        flips = rng.random(len(idx)) < cfg["mirror"]
        x[flips] = x[flips, :, ::-1]
        f = lr_factor(step, total, cfg["warmup"])
        for g in opt.param_groups:
            g["lr"], g["pull"] = g["base_lr"] * f, g["base_pull"] * f
        s = student_space(net(torch.from_numpy(x.astype(np.float32)).to(dev)), mu_t)
        loss, parts = losses(s, torch.from_numpy(chips.rows[idx]).to(dev), bank_t, ident_t, valid_t,
                             ops["1e-03"], ops["1e-04"], lc, gen)
        if heads is not None:
            from models.train.distill_heads import head_terms
            h, hparts = head_terms(heads, s, chips, idx, cols, x, flips, stats, cfg)
            loss = loss + h
            parts.update(hparts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if epoch < cfg["freeze_epochs"]:
            for g in opt.param_groups:
                if g["stage"] in early:
                    for p in g["params"]:
                        p.grad = None
        opt.step()
        pull(opt, pre, cfg["lam"])
        state["step"] = step + 1
        bar.update(1)
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            agg[k] = agg.get(k, 0.0) + v
        if state["step"] % cfg["log_every"] == 0 or state["step"] == total:
            n = (state["step"] - 1) % cfg["log_every"] + 1
            record({"step": state["step"], "epoch": epoch, "lr_factor": f,
                    "s_per_step": round((time.time() - t0) / n, 3), **{k: v / n for k, v in agg.items()}})
            bar.set_postfix(loss=f"{agg['loss'] / n:.3f}", own=f"{agg['own_cos'] / n:.3f}")
            agg, t0 = {}, time.time()
        if state["step"] % cfg["eval_every"] == 0 or state["step"] == total:
            evaluate(state["step"])
            checkpoint()
        elif state["step"] == until:
            checkpoint()
        if state["step"] == until:
            break
    bar.close()
    logf.close()
    return state
