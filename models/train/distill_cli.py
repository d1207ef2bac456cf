"""`idverify distill FAMILY`: one command per tower family (dlib, sface) for the chip-adapted id
tower (models/train/distill.py). Registered by models/train/cli.py; torch is imported only when
a command runs.

    idverify distill dlib --run .cache/train/runs/distill-dlib            # store + teacher (once), train
    idverify distill dlib --resume .cache/train/runs/distill-dlib         # continue after an interruption
    idverify distill dlib --resume .cache/train/runs/distill-dlib --probe --export distill-dlib-v1
    idverify distill dlib --pack .cache/train/dlib-pack.npz --pack-images 6000 --pack-chips 8
    idverify distill dlib --from-pack dlib-pack.npz --device cuda --run runs/distill-dlib-gpu
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.train.paths import DEFAULT_RUNS, ROOT

DEFAULT_STORE = ROOT / ".cache" / "train" / "chips"
DEFAULTS = dict(epochs=12, steps_per_epoch=0, batch=64, lr=1e-3, relative=True, mult="", flat_steps=False, warmup=50,
                lam=0.5,
                freeze_epochs=0, distill=1.0, binary=1.0, relational=0.0, margin=0.05, scale=24.0, hard_k=32,
                rand_k=32, codecs="rgb,ycc,jpeg", utk=True, jitter=True, mirror=0.5, heads=False, alpha=0.1,
                gamma=2e-3, head_lr=2e-3, eval_every=100, val_flip=True, stop_m=3, stop_rise=0.01,
                stop_flat=0.005, log_every=10, seed=0, threads=2, device="auto")
HELP = {"epochs": "passes over the training images (one chip each)", "steps_per_epoch": "0: images // batch",
        "lr": "Adam base step (x the stage multiplier, x each tensor's pretrained RMS when relative)",
        "relative": "steps relative to each tensor's pretrained RMS (--no-relative: absolute, then e.g. --lr 1e-4)", "mult": "stage=multiplier,... over the defaults "
        "(fc/level0 1, level1 0.5, level2 0.25, level3 0.12, level4/stem 0.06)",
        "flat_steps": "every stage at the base step (layer-wise steps off)",
        "lam": "decoupled pull to the pretrained weights: W -= lr * mult * lam * (W - W_pre) after each Adam step",
        "freeze_epochs": "keep stem..level3 frozen for this many epochs", "distill": "weight of 1 - cos'(chip, own clean image)",
        "binary": "weight of the binary loss at the teacher's FAR 1e-3 point (bank negatives)",
        "relational": "weight of the relational hinge", "codecs": "training chip coders (webp is held out)",
        "utk": "train on UTKFace too (--no-utk: LFW only)", "heads": "attribute heads + sparsity on the id tower",
        "eval_every": "steps between fold-8 evaluations", "stop_m": "evaluations in the stop rule's window (0: off)",
        "device": "auto (CUDA when present), cpu, cuda, cuda:1"}


def register(sub) -> None:
    p = sub.add_parser("distill", help="chip-adapted id tower of a family by frozen-teacher distillation",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=("dlib", "sface"))
    p.add_argument("--run", default=None, help="run folder (default .cache/train/runs/distill-<family>)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue RUN with its own config and data")
    p.add_argument("--store", default=str(DEFAULT_STORE), help="chip store (built when missing)")
    p.add_argument("--workers", type=int, default=2, help="processes building the store")
    p.add_argument("--chips", type=int, default=8, help="training chips per image when the store is built")
    p.add_argument("--store-images", type=int, default=0,
                   help="build the training store over this many training images (seeded subset; 0: all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--build-only", action="store_true", help="build the store and the teacher targets, then stop")
    p.add_argument("--pack", default=None, metavar="FILE", help="write a pack (one .npz) instead of training")
    p.add_argument("--pack-images", type=int, default=2000)
    p.add_argument("--pack-chips", type=int, default=8)
    p.add_argument("--pack-pixels", action="store_true", help="decoded uint8 chips instead of the ~1 KB files")
    p.add_argument("--from-pack", default=None, metavar="FILE", help="train from a pack instead of the store")
    p.add_argument("--probe", action="store_true", help="write the run's unit map (fold 8) after training")
    p.add_argument("--export", default=None, metavar="VERSION", help="export the best id tower + centred live tower")
    p.add_argument("--export-from", default=None, metavar="RUN",
                   help="export RUN's best weights (with --export VERSION) without training")
    p.add_argument("--float16", action="store_true", help="with --export: the id tower's weights stored as float16")
    p.add_argument("--centring", choices=("graph", "service"), default="graph",
                   help="with --export: the centring in both graphs, or applied by the service with the base "
                        "version's own live file (no second copy of the pretrained network)")
    for k, v in DEFAULTS.items():
        flag = f"--{k.replace('_', '-')}"
        if isinstance(v, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(k))
        else:
            p.add_argument(flag, type=type(v), default=None, help=HELP.get(k))
    p.set_defaults(func=run_distill)


def _settings(args):
    from service.settings import get_settings
    s = get_settings()
    return s.model_copy(update={"data_dir": Path(args.data_dir)}) if args.data_dir else s


def load_data(cfg: dict, family, settings=None, workers: int = 2):
    """(bank, chips, fold-8 bank, fold-8 chips) from the run's data source: a pack or the store."""
    from models.train import distill_data as DD
    src = cfg["data"]
    if "pack" in src:
        bank, chips, vbank, vchips, info = DD.load_pack(Path(src["pack"]))
        if info["family"] != family.name:
            raise SystemExit(f"{src['pack']} holds {info['family']} teacher targets, not {family.name}")
        return bank, chips, vbank, vchips
    from models.train import distill_store as S
    from models.train.data import reserved_identities
    reserved = reserved_identities(Path(settings.data_dir))
    root = Path(src["store"])
    S.build_store("train", settings, root, workers, items=S.subset("train", settings, src.get("images", 0)),
                  variants=S.train_variants(src.get("chips", 8)))
    S.build_store("val", settings, root, workers)
    out = []
    for split in ("train", "val"):
        st = S.load_store(root, split, reserved)
        out += DD.from_store(st, S.teacher_views(st, family, settings, cfg.get("device_name", "cpu")))
    return tuple(out)


def run_distill(args: argparse.Namespace) -> int:
    from models.train import distill
    from models.train.distill_family import FamilyUnavailable, get
    family = get(args.family)
    if args.export_from:
        if not args.export:
            raise SystemExit("--export-from RUN needs --export VERSION")
        from models.train.distill_export import export
        man = export(Path(args.export_from), args.export, family, centring_in_graph=args.centring == "graph",
                     float16=args.float16)
        print(f"exported {family.base[0]}/{args.export}: id {man['towers']['id']['sha256'][:12]}, "
              f"live {man['towers']['live']['sha256'][:12]}")
        return 0
    if args.resume:
        run = Path(args.resume)
        cfg = json.loads((run / "config.json").read_text())
        for k in ("device", "threads"):
            if getattr(args, k) is not None:
                cfg[k] = getattr(args, k)
    else:
        run = Path(args.run or DEFAULT_RUNS / f"distill-{args.family}")
        if (run / "checkpoint.pt").exists():
            raise SystemExit(f"{run} holds a run: --resume {run} continues it")
        cfg = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in DEFAULTS.items()}
        cfg["data"] = {"pack": str(Path(args.from_pack).resolve())} if args.from_pack else \
            {"store": str(Path(args.store).resolve()), "chips": args.chips, "images": args.store_images}
        cfg["command"] = "idverify distill " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["distill"] else sys.argv[1:])
    cfg["device_name"] = str(distill.pick_device(cfg["device"]))
    import torch
    torch.set_num_threads(cfg["threads"])      # the teacher targets too (on CPU)
    try:
        settings = None if "pack" in cfg["data"] else _settings(args)
        if args.pack or args.build_only:
            data = load_data({**cfg, "data": {"store": str(Path(args.store).resolve()), "chips": args.chips,
                                              "images": args.store_images}}, family, settings, args.workers)
            if args.pack:
                return _pack(args, family, settings)
            return 0
        data = load_data(cfg, family, settings, args.workers)
    except FamilyUnavailable as exc:
        raise SystemExit(str(exc)) from None
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = distill.train(cfg, run, family, data, resume=bool(args.resume))
    (run / "result.json").write_text(json.dumps({"step": state["step"], "best": {k: v for k, v in state["best"].items()
                                                 if k != "val"}, "best_val": state["best"].get("val"),
                                                 "stopped": state["stopped"]}, indent=1) + "\n")
    if args.probe:
        from models.train.distill_export import probe
        pr = probe(run, family, data[2], data[3])
        distill.log(f"[distill] unit map written; scoring mask {pr['scoring']['use_mask']}")
    if args.export:
        from models.train.distill_export import export
        man = export(run, args.export, family, centring_in_graph=args.centring == "graph", float16=args.float16)
        if man["training"]["step"] == 0:
            distill.log("[distill] the best fold-8 evaluation is step 0: the exported id tower is the pretrained network")
        distill.log(f"[distill] exported {family.base[0]}/{args.export}: id {man['towers']['id']['sha256'][:12]}, "
                    f"live {man['towers']['live']['sha256'][:12]}; calibrate with python -m models.build.calibrate "
                    f"--version {args.export} --folds 8")
    return 0


def _pack(args, family, settings) -> int:
    from models.train import distill_store as S
    from models.train.data import reserved_identities
    reserved = reserved_identities(Path(settings.data_dir))
    parts = []
    for split in ("train", "val"):
        st = S.load_store(Path(args.store), split, reserved)
        parts.append((st, S.teacher_views(st, family, settings)))
    info = S.write_pack(Path(args.pack), family.name, parts[0], parts[1], args.pack_images, args.pack_chips,
                      pixels=args.pack_pixels)
    print(json.dumps(info, indent=1))
    return 0
