"""`idverify adapt --attribute ATTR --data DIR`: attribute adaptation with a few labelled images.

mode "map" (default): only the weights the unit-attribute map ties to ATTR change: the ATTR
head (not part of the embedding), and in both towers the rows of the embedding layer (fc) that
produce the tied units.
Everything else is frozen (gradient masks), so identity units are untouched.
mode "full": the same data and steps, but every trainable weight of both towers (+ the head)
changes: the comparison row of the experiment.

The labelled images (UTKFace-style names) go through the same front end as training (detect,
align, chip simulation, frozen early layers); the attribute loss is applied to both the id-tower
embedding of the chip and the live-tower embedding of the live image. Before/after: the attribute
metric on the UTKFace test split, and LFW-IvS TAR on validation (fold 8) and folds 9-10.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.train import data as D
from models.train.cache import CacheConfig, Frontend, _backbone, build_shard, load_split
from models.train.heads import ATTRIBUTES, head_losses


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def attribute_metric(model, attr: str, d: dict, stats: dict) -> dict:
    """Head quality on a cached split (chip and live rows): accuracy or MAE (age in years)."""
    from models.train.runs import embed
    res = {}
    for v, tower in (("chip", model.id), ("live", model.live)):
        ok = d[f"{v}_ok"] & ~np.isnan(d[attr] if attr in d else d[f"{v}_{attr}"])
        y = (d[attr] if attr in d else d[f"{v}_{attr}"])[ok]
        with torch.no_grad():
            out = model.heads(torch.from_numpy(embed(tower, d[f"{v}_feat"][ok])))[attr].numpy()
        kind = ATTRIBUTES[attr]["kind"]
        if kind == "binary":
            res[v] = {"accuracy": float(((out[:, 0] > 0) == (y > 0.5)).mean())}
        elif kind == "class":
            res[v] = {"accuracy": float((out.argmax(1) == y).mean())}
        else:
            mu, sd = stats.get(attr, (0.0, 1.0))
            res[v] = {"mae": float(np.abs(out[:, 0] * sd + mu - y).mean())}
        res[v]["n"] = int(ok.sum())
    return res


def featurise(items: list[D.Item], data_dir: Path, threads: int, cut: str = "level2") -> dict:
    cfg = CacheConfig(data_dir=data_dir, root=Path("/nonexistent"), threads=threads)
    fe, net = Frontend(cfg.settings, threads=1), _backbone(threads)
    parts = [build_shard(items[i:i + 256], cfg, fe, net, with_occ=False) for i in range(0, len(items), 256)]
    d = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    for v in ("live", "chip", "occ"):
        f3 = d.pop(f"{v}_feat3")
        if cut == "level3":
            d[f"{v}_feat"] = f3
    for lab in ("gender", "age", "race"):
        d[lab] = np.array([it.labels.get(lab, np.nan) for it in items], np.float32)
    return d


def adapt(model, attr: str, d: dict, stats: dict, mode: str, ties: list[int], steps: int, seed: int,
          rel_lr: float = 3e-3, head_lr: float = 1e-3) -> dict:
    """In-place adaptation; returns what changed. Tower weights move with the training recipe's
    per-tensor step (rel_lr x the tensor's RMS), the head with head_lr; both modes alike."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = model.heads.heads[attr]
    sides = [model.id] if model.shared else [model.id, model.live]
    if mode == "map":
        tower_params = [t.net.fc.weight for t in sides]
        row_mask = torch.zeros(128, 1)
        row_mask[ties] = 1.0
        # the ATTR head is ATTR's own (never part of the embedding): all of it adapts
        hooks = [t.net.fc.weight.register_hook(lambda g: g * row_mask) for t in sides]
    else:
        tower_params = [p for t in sides for p in t.trainable().values() if float(p.detach().pow(2).mean().sqrt()) >= 1e-6]
        hooks = []
    params = [head.weight, head.bias] + tower_params
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": [p], "lr": rel_lr * float(p.detach().pow(2).mean().sqrt())} for p in tower_params]
    opt = torch.optim.Adam(groups + [{"params": [head.weight, head.bias], "lr": head_lr}])
    rows = {v: np.flatnonzero(d[f"{v}_ok"] & ~np.isnan(d[attr])) for v in ("chip", "live")}
    model.train()
    for _ in range(steps):
        xs, ys = [], []
        embs = []
        for v, tower in (("chip", model.id), ("live", model.live)):
            r = rng.choice(rows[v], size=min(64, len(rows[v])), replace=False)
            embs.append(tower(torch.from_numpy(d[f"{v}_feat"][r].astype(np.float32))))
            ys.append(d[attr][r])
        out = model.heads(torch.cat(embs))
        loss = head_losses({attr: out[attr]}, {attr: torch.from_numpy(np.concatenate(ys).astype(np.float32))}, stats)[attr]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for h in hooks:
        h.remove()
    model.eval()
    n_free = sum(p.numel() for p in params) if mode == "full" else \
        len(ties) * sides[0].net.fc.weight.shape[1] * len(sides) + head.weight.numel() + head.bias.numel()
    return {"params_updated": int(n_free), "final_loss": float(loss.detach())}


def run(args, data_dir: Path) -> int:
    from models.train.runs import load_run, save_run
    from models.train.trainer import ValSet, eval_folds
    torch.set_num_threads(args.threads)
    attr = args.attribute
    if attr not in ATTRIBUTES:
        raise SystemExit(f"unknown attribute {attr!r}; one of {list(ATTRIBUTES)}")
    run_dir = Path(args.run)
    model, cfg = load_run(run_dir)
    if model.heads is None:
        raise SystemExit(f"{run_dir} was trained without attribute heads (variant coupled-heads has them)")
    umap = json.loads((run_dir / "unit_map.json").read_text())
    ties = umap["ties"][attr]
    stats = cfg.get("stats", {})
    items = D.items_from_dir(Path(args.data), data_dir)
    D.assert_no_reserved(items, D.reserved_identities(data_dir))
    rng = np.random.default_rng(args.seed)
    if len(items) > args.limit:
        items = [items[i] for i in sorted(rng.choice(len(items), args.limit, replace=False))]
    if not items or all(np.isnan(it.labels.get(attr, np.nan)) for it in items):
        raise SystemExit(f"no images labelled with {attr} in {args.data}")
    t0 = time.time()
    import hashlib
    tag = hashlib.sha256(("|".join(it.key for it in items) + model.id.cut).encode()).hexdigest()[:16]
    feats = Path(args.cache) / f"adapt-{tag}.npz"
    if feats.exists():
        with np.load(feats) as z:
            d = {k: z[k] for k in z.files}
    else:
        d = featurise(items, data_dir, args.threads, cut=model.id.cut)
        np.savez(feats, **d)
    log(f"[adapt] {len(items)} images featurised in {time.time() - t0:.0f}s")
    cache = Path(args.cache)
    test = load_split(cache, "utk_test", reserved=D.reserved_identities(data_dir), cut=model.id.cut)
    val = ValSet(cache, data_dir, cut=model.id.cut)
    before = {"attribute": attribute_metric(model, attr, test, stats), "val": val.score(model),
              "folds9-10": eval_folds(model, cache, data_dir)}
    info = adapt(model, attr, d, stats, args.mode, ties, args.steps, args.seed, rel_lr=args.tower_lr)
    after = {"attribute": attribute_metric(model, attr, test, stats), "val": val.score(model),
             "folds9-10": eval_folds(model, cache, data_dir)}
    out = Path(args.out) if args.out else run_dir.parent / f"{run_dir.name}-adapt-{attr}-{args.mode}"
    cfg2 = {**cfg, "adapted": {"attribute": attr, "mode": args.mode, "images": len(items), "steps": args.steps,
                               "tied_units": ties, "from": str(run_dir)}}
    save_run(model, out, cfg2, [], stats)
    (out / "unit_map.json").write_text((run_dir / "unit_map.json").read_text())
    result = {"attribute": attr, "mode": args.mode, "images": len(items), "steps": args.steps, "tower_lr": args.tower_lr,
              "tied_units": ties, **info, "before": before, "after": after,
              "tar_1e-3_change_points": 100 * (after["folds9-10"]["tar_at_far"]["1e-03"] - before["folds9-10"]["tar_at_far"]["1e-03"]),
              "command": "idverify " + " ".join(sys.argv[1:])}
    (out / "adapt_result.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"[adapt {attr} {args.mode}] attribute {before['attribute']} -> {after['attribute']}; "
        f"LFW-IvS folds 9-10 TAR@1e-3 {before['folds9-10']['tar_at_far']['1e-03']:.4f} -> "
        f"{after['folds9-10']['tar_at_far']['1e-03']:.4f}; saved {out}")
    if args.export:
        from models.train.export import export_run
        export_run(out, args.export, data_dir, cache)
    return 0
