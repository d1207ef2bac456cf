"""Training loop of the dual towers on cached activations.

One step: B cross-domain pairs (chip activation -> id tower, live activation -> live tower).
Half the rows are different-image pairs of an LFW identity with >= 2 images, half are
same-image pairs (every LFW and UTKFace image with its own simulated chip). Loss:
    binary same/different (in-batch mined hard negatives, both directions)
  + lam * sum ||W_id - W_live||^2 + mu * sum ||W_live - W_pre||^2
  + alpha * attribute heads + gamma * group sparsity (variant coupled-heads)
Seeded (numpy + torch), deterministic on a given machine/thread count.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.train import data as D
from models.train.cache import load_split
from models.train.heads import ATTRIBUTES, head_losses, sparsity
from models.train.paths import DEFAULT_RUNS
from models.train.runs import embed, load_run, pretrained, save_run

# per-variant defaults (the ablation rows); CLI flags override
VARIANTS = {
    "pretrained":    dict(train=False),
    "siamese":       dict(train=True, shared=True, heads=False, lam=0.0, mu=1.0),
    "uncoupled":     dict(train=True, shared=False, heads=False, lam=0.0, mu=1.0),
    "coupled":       dict(train=True, shared=False, heads=False, lam=10.0, mu=1.0),
    "coupled-heads": dict(train=True, shared=False, heads=True, lam=10.0, mu=1.0),
}
DEFAULTS = dict(epochs=8, lr=3e-3, head_lr=2e-3, hard_k=10, batch=256, p_occ=0.15, cross_frac=0.5, distill=0.0,
                alpha=0.1, gamma=2e-3, warmup=30)
REGRESS = ("yaw", "pitch", "illumination", "blur", "age")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


class TrainSet:
    """Cached training activations (LFW train identities + UTKFace train) in memory."""

    def __init__(self, cache: Path, data_dir: Path, splits=("lfw_train", "utk_train"), cut: str = "level2"):
        reserved = D.reserved_identities(data_dir)
        parts = [load_split(cache, s, reserved=reserved, cut=cut) for s in splits]
        self.reserved = reserved
        cat = lambda k: np.concatenate([p[k] for p in parts])  # noqa: E731
        self.key = cat("key")
        D.assert_no_reserved([str(k) for k in self.key], reserved)
        self.identity = cat("identity")
        self.feat = {v: cat(f"{v}_feat") for v in ("live", "chip", "occ")}
        self.teacher = cat("live_emb0")  # pretrained embedding of the clean live image
        self.ok = {v: cat(f"{v}_ok") for v in ("live", "chip", "occ")}
        self.attr = {f"{v}_{a}": cat(f"{v}_{a}") for v in ("live", "chip", "occ")
                     for a in ("yaw", "pitch", "illumination", "blur")}
        self.labels = {k: cat(k) for k in ("gender", "age", "race")}
        names, self.ident = np.unique(self.identity, return_inverse=True)
        self.n = len(self.key)
        usable = self.ok["chip"] & self.ok["live"]
        self.self_rows = np.flatnonzero(usable)
        groups: dict[int, list[int]] = {}
        for i in np.flatnonzero(self.ok["chip"] | self.ok["live"]):
            groups.setdefault(int(self.ident[i]), []).append(int(i))
        self.multi = [np.array(g) for g in groups.values()
                      if len(g) >= 2 and self.ok["chip"][g].any() and self.ok["live"][g].sum() >= 1]
        self.stats = {}
        for a in ("yaw", "pitch", "illumination", "blur"):
            v = np.concatenate([self.attr[f"{d}_{a}"] for d in ("live", "chip")])
            self.stats[a] = (float(np.nanmean(v)), float(np.nanstd(v)) or 1.0)
        ages = self.labels["age"]
        self.stats["age"] = (float(np.nanmean(ages)), float(np.nanstd(ages)) or 1.0)
        log(f"[data] {self.n} images, {len(names)} identities, {len(self.self_rows)} with chip+live, "
            f"{len(self.multi)} identities with >= 2 images")

    def sample(self, rng: np.random.Generator, batch: int, p_occ: float, cross_frac: float = 0.5):
        """-> chip rows, live rows, live variant per row, identity per row."""
        n_cross = int(round(batch * cross_frac))
        groups = rng.choice(len(self.multi), size=min(n_cross, len(self.multi)), replace=False)
        chip_rows, live_rows = [], []
        for g in groups:
            rows = self.multi[g]
            a = rng.choice(rows[self.ok["chip"][rows]])
            cand = rows[(rows != a) & self.ok["live"][rows]]
            if cand.size == 0:
                continue
            chip_rows.append(a)
            live_rows.append(rng.choice(cand))
        n_self = batch - len(chip_rows)
        s = rng.choice(self.self_rows, size=n_self, replace=False)
        chip_rows += list(s)
        live_rows += list(s)
        chip_rows, live_rows = np.array(chip_rows), np.array(live_rows)
        use_occ = (rng.random(len(live_rows)) < p_occ) & self.ok["occ"][live_rows]
        return chip_rows, live_rows, use_occ, self.ident[chip_rows]

    def tensors(self, chip_rows, live_rows, use_occ):
        xc = torch.from_numpy(self.feat["chip"][chip_rows].astype(np.float32))
        live = self.feat["live"][live_rows].astype(np.float32)
        if use_occ.any():
            live[use_occ] = self.feat["occ"][live_rows[use_occ]].astype(np.float32)
        return xc, torch.from_numpy(live)

    def targets(self, chip_rows, live_rows, use_occ) -> dict:
        t = {}
        for a in ("yaw", "pitch", "illumination", "blur"):
            lv = np.where(use_occ, self.attr[f"occ_{a}"][live_rows], self.attr[f"live_{a}"][live_rows])
            t[a] = np.concatenate([self.attr[f"chip_{a}"][chip_rows], lv])
        t["domain"] = np.concatenate([np.ones(len(chip_rows)), np.zeros(len(live_rows))])
        t["occlusion"] = np.concatenate([np.zeros(len(chip_rows)), use_occ.astype(float)])
        for k in ("gender", "age", "race"):
            t[k] = np.concatenate([self.labels[k][chip_rows], self.labels[k][live_rows]])
        return {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in t.items()}


# ----------------------------------------------------------------------------- validation


class ValSet:
    def __init__(self, cache: Path, data_dir: Path, cut: str = "level2"):
        d = load_split(cache, "lfw_val", reserved=D.reserved_identities(data_dir), cut=cut)
        self.d = d
        self.identity = d["identity"]

    def score(self, model) -> dict:
        from models.train.fasteval import identity_verification
        ei = embed(model.id, self.d["chip_feat"])
        el = embed(model.live, self.d["live_feat"])
        return identity_verification(ei, self.d["chip_ok"], el, self.d["live_ok"], self.identity)


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def eval_folds(model, cache: Path, data_dir: Path, mask: np.ndarray | None = None, flip: bool = True) -> dict:
    """LFW-IvS + LFW accuracy on folds 9-10 from the eval cache (evaluation only). flip: average
    the unit embeddings of each chip and its mirror, as the service does with the manifest's
    test_time.flip_average (needs the eval_flip split)."""
    from models.train.fasteval import verification
    from models.train.cache import split_path
    d = load_split(cache, "eval", allow_eval=True, cut=model.id.cut)
    ei = embed(model.id, d["chip_feat"])
    el = embed(model.live, d["live_feat"])
    if mask is not None:
        ei, el = ei * mask, el * mask
    flipped = flip and split_path(cache, "eval_flip").exists()
    if flipped:
        f = load_split(cache, "eval_flip", allow_eval=True, cut=model.id.cut)
        assert (f["key"] == d["key"]).all()
        fi, fl = embed(model.id, f["chip_feat"]), embed(model.live, f["live_feat"])
        if mask is not None:
            fi, fl = fi * mask, fl * mask
        ei, el = _unit(_unit(ei) + _unit(fi)), _unit(_unit(el) + _unit(fl))
    res = verification(ei, d["chip_ok"], el, d["live_ok"], [str(k) for k in d["key"]], data_dir)
    res["flip_average"] = bool(flipped)
    return res


# ----------------------------------------------------------------------------- training


def train(args, data_dir: Path) -> tuple[object, dict, list]:
    from models.train.losses import binary_pair_loss
    from models.train.towers import DualTowers

    v = dict(VARIANTS[args.variant])
    cfg = {**DEFAULTS, **v}
    for k in ("lam", "mu", "epochs", "lr", "hard_k", "batch", "cross_frac", "distill"):
        val = getattr(args, k, None)
        if val is not None:
            cfg[k] = val
    cfg.update(variant=args.variant, seed=args.seed, threads=args.threads, cut=getattr(args, "cut", "level2"))
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    cache = Path(args.cache)
    base = pretrained()
    model = DualTowers(base, shared=cfg.get("shared", False), heads=cfg.get("heads", False), cut=cfg["cut"])
    history: list = []
    if not cfg["train"]:
        return model.eval(), cfg, history
    cfg["train_splits"] = getattr(args, "train_splits", "lfw_train,utk_train")
    ts = TrainSet(cache, data_dir, splits=tuple(cfg["train_splits"].split(",")), cut=cfg["cut"])
    val = ValSet(cache, data_dir, cut=cfg["cut"])
    opt = torch.optim.Adam(model.param_groups(cfg["lr"], cfg["head_lr"]))
    steps_per_epoch = max(1, len(ts.self_rows) // cfg["batch"])
    total = steps_per_epoch * cfg["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    best = (-1.0, None)
    t0 = time.time()
    step = 0
    v0 = val.score(model.eval())
    history.append({"epoch": 0, "val": v0})
    log(f"[train {args.variant}] epoch 0 val ivs {v0['ivs']} live {v0['live']}")
    for epoch in range(1, cfg["epochs"] + 1):
        model.train()
        agg: dict[str, float] = {}
        for _ in range(steps_per_epoch):
            cr, lr_, occ, ident = ts.sample(rng, cfg["batch"], cfg["p_occ"], cfg["cross_frac"])
            xc, xl = ts.tensors(cr, lr_, occ)
            e_id, e_live = model.id(xc), model.live(xl)
            l_pair, st = binary_pair_loss(e_id, e_live, torch.from_numpy(ident), model.scale, model.bias, cfg["hard_k"])
            loss = l_pair
            parts = {"pair": float(l_pair), **st}
            if cfg["distill"]:
                # cross-domain distillation: each chip / (occluded) live image should land where the
                # pretrained network puts its clean live source image
                tc = torch.from_numpy(ts.teacher[cr])
                tl = torch.from_numpy(ts.teacher[lr_])
                okc = torch.from_numpy(ts.ok["live"][cr]).float()
                dist = ((1 - F.cosine_similarity(e_id, tc)) * okc).sum() / okc.sum().clamp(min=1) + \
                    (1 - F.cosine_similarity(e_live, tl)).mean()
                loss = loss + cfg["distill"] * dist
                parts["distill"] = float(dist)
            if cfg["lam"] and not cfg.get("shared"):
                c = model.coupling()
                loss = loss + cfg["lam"] * c
                parts["coupling"] = float(c)
            if cfg["mu"]:
                a = model.anchor("live")
                loss = loss + cfg["mu"] * a
                parts["anchor"] = float(a)
            if model.heads is not None:
                outs = model.heads(torch.cat([e_id, e_live]))
                hl = head_losses(outs, ts.targets(cr, lr_, occ), ts.stats)
                lh = sum(hl.values())
                sp = sparsity(model.heads)
                loss = loss + cfg["alpha"] * lh + cfg["gamma"] * sp
                parts.update({f"h_{k}": float(x) for k, x in hl.items()}, sparsity=float(sp))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            for k, x in parts.items():
                agg[k] = agg.get(k, 0.0) + x / steps_per_epoch
        model.eval()
        vs = val.score(model)
        history.append({"epoch": epoch, "train": agg, "val": vs, "elapsed_s": round(time.time() - t0, 1)})
        log(f"[train {args.variant}] epoch {epoch}/{cfg['epochs']} {time.time() - t0:.0f}s "
            + " ".join(f"{k}={x:.4g}" for k, x in agg.items()) + f" | val ivs {vs['ivs']} live {vs['live']}")
        key = vs["ivs"]["1e-03"] + vs["ivs"]["1e-02"] * 1e-3
        if key > best[0]:
            best = (key, {n: p.detach().clone() for n, p in model.state_dict().items()}, epoch)
    if best[1] is not None:
        model.load_state_dict(best[1])
        cfg["best_epoch"] = best[2]
        log(f"[train {args.variant}] keeping epoch {best[2]} (best validation TAR@1e-3, fold-8 identities)")
    cfg["stats"] = ts.stats
    return model.eval(), cfg, history


def main(args, data_dir: Path) -> int:
    name = args.variant + (f"-lam{args.lam:g}" if args.lam is not None else "") + \
        (f"-{args.cut}" if getattr(args, "cut", "level2") != "level2" else "")
    run = Path(args.run) if args.run else DEFAULT_RUNS / name
    t0 = time.time()
    if getattr(args, "eval_only", False):
        model, cfg = load_run(run)
        name = run.name
    else:
        model, cfg, history = train(args, data_dir)
        cfg["train_seconds"] = round(time.time() - t0, 1)
        cfg["command"] = "idverify " + " ".join(sys.argv[1:]) if sys.argv else None
        save_run(model, run, cfg, history, cfg.get("stats", {}))
        log(f"[train] saved {run} ({cfg['train_seconds']}s)")
    if model.heads is not None and not (getattr(args, "eval_only", False) and (run / "unit_map.json").exists()):
        from models.train.probe import run_probe
        pr = run_probe(model, run, Path(args.cache), data_dir, title=f"unit selectivity - {name}")
        log(f"[probe] ties {pr['ties']}; scoring mask {pr['scoring']['use_mask']} {pr['scoring']['chosen']}")
    if args.eval:
        mask = None
        if (run / "unit_map.json").exists():
            sc = json.loads((run / "unit_map.json").read_text())["scoring"]
            mask = np.asarray(sc["mask"], np.float32) if sc["use_mask"] else None
        res = eval_folds(model, Path(args.cache), data_dir, mask=mask)
        res["command"] = cfg["command"]
        (run / "eval_folds9-10.json").write_text(json.dumps(res, indent=2) + "\n")
        log(f"[eval folds 9-10, cached] LFW-IvS TAR {res['tar_at_far']} ivs-acc {res['ivs_accuracy']:.4f} "
            f"LFW acc {res['lfw_accuracy']:.4f} FTA {res['fta']}")
    if args.export:
        from models.train.export import export_run, maybe_switch_current
        from models.train.paths import REPO
        man = export_run(run, args.export, data_dir, Path(args.cache))
        base = json.loads((REPO / "baseline" / "manifest.json").read_text())["metrics"]
        switched = maybe_switch_current(args.export, base["lfw_ivs_folds9-10"]["tar_at_far"]["1e-03"])
        log(f"[export] {args.export}: {json.dumps(man['metrics'])}; baseline {json.dumps(base)}; "
            f"CURRENT {'switched to ' + args.export if switched else 'unchanged'}")
    return 0
