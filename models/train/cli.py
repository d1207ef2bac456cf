"""`idverify train`, `idverify adapt` and `idverify distill` (models/train/distill_cli.py). Torch is
imported only inside the run functions."""
from __future__ import annotations

import argparse
from pathlib import Path

from models.train.paths import DEFAULT_CACHE, DEFAULT_RUNS

REQUIRES = ("torch",)  # the `train` extra; without it `idverify train|adapt` say so
EXTRA = "train"


def register(sub) -> None:
    p = sub.add_parser("train", help="train the dual towers (id/live) from cached frozen-layer activations")
    p.add_argument("--data-dir", default=None, help="data root (default settings.data_dir / IDV_DATA_DIR)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="activation cache folder (built when missing)")
    p.add_argument("--cache-only", action="store_true", help="build the activation cache and stop")
    p.add_argument("--variant", default="coupled-heads",
                   choices=("pretrained", "siamese", "uncoupled", "coupled", "coupled-heads"),
                   help="ablation row to train")
    p.add_argument("--cut", choices=("level2", "level3"), default="level2",
                   help="frozen up to this stage (its cached output feeds the trainable rest)")
    p.add_argument("--lam", type=float, default=None, help="coupling weight (sum ||W_id - W_live||^2)")
    p.add_argument("--mu", type=float, default=None, help="live-tower anchor weight (sum ||W_live - W_pre||^2)")
    p.add_argument("--distill", type=float, default=None,
                   help="weight of the cross-domain distillation term (1 - cos to the pretrained live embedding of the source image)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--hard-k", type=int, default=None)
    p.add_argument("--cross-frac", type=float, default=None,
                   help="share of each batch that pairs two different images of an identity (rest: image + own chip)")
    p.add_argument("--train-splits", default="lfw_train,utk_train", help="cached splits to train on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", default=None, help="run folder (default .cache/train/runs/<variant>[-lamX])")
    p.add_argument("--eval", action="store_true", help="after training, score LFW-IvS folds 9-10 on the cache (fast path)")
    p.add_argument("--eval-only", action="store_true", help="do not train: (re)evaluate the run folder")
    p.add_argument("--export", default=None, metavar="VERSION",
                   help="export both towers to models/repository/towers/VERSION (+ probe, calibration, manifest)")
    p.set_defaults(func=run_train)

    a = sub.add_parser("adapt", help="update only the weights the unit-attribute map ties to one attribute")
    a.add_argument("--attribute", required=True)
    a.add_argument("--data", required=True, help="folder of labelled images (UTKFace names: age_gender_race_*.jpg)")
    a.add_argument("--run", default=str(DEFAULT_RUNS / "coupled-heads-lam1-level3"),
                   help="trained run to start from (default: where the shipped recipe, run without --run, saves)")
    a.add_argument("--out", default=None, help="output run folder (default <run>-adapt-<attribute>)")
    a.add_argument("--mode", choices=("map", "full"), default="map",
                   help="map: only the units/weights tied to ATTR (default); full: fine-tune everything (comparison)")
    a.add_argument("--limit", type=int, default=500, help="at most this many labelled images")
    a.add_argument("--steps", type=int, default=150)
    a.add_argument("--tower-lr", type=float, default=1e-3,
                   help="relative step for tower weights (x each tensor's RMS); the head uses 1e-3")
    a.add_argument("--cache", default=str(DEFAULT_CACHE))
    a.add_argument("--data-dir", default=None)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--export", default=None, metavar="VERSION", help="export the adapted towers as this version")
    a.set_defaults(func=run_adapt)

    from models.train import distill_cli  # `idverify distill FAMILY`: the chip-adapted id tower
    distill_cli.register(sub)


def _data_dir(arg) -> Path:
    if arg:
        return Path(arg)
    from service.settings import get_settings
    return Path(get_settings().data_dir)


def run_train(args: argparse.Namespace) -> int:
    from models.train import recipe
    data_dir = _data_dir(args.data_dir)
    if args.cache_only:
        recipe.build_cache(data_dir, Path(args.cache), threads=args.threads)
        return 0
    needed = ["lfw_val"] + ([] if args.variant == "pretrained" or args.eval_only else args.train_splits.split(","))
    needed += ["eval"] if args.eval or args.export else []  # eval_flip: built by --cache-only; used when present
    needed += ["utk_test"] if args.variant == "coupled-heads" else []
    recipe.build_cache(data_dir, Path(args.cache), threads=args.threads, splits=[s for s in recipe.SPLITS if s in needed])
    return recipe.train_and_report(args, data_dir)


def run_adapt(args: argparse.Namespace) -> int:
    from models.train import adapt
    return adapt.run(args, _data_dir(args.data_dir))
