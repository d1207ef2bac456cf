"""The training recipe end to end: cache -> train -> (fast) evaluation -> export."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from models.eval.pairs import lfw_key, read_pairs
from models.train import data as D

# cache splits in build order (eval = folds 9-10 images, evaluation only, chip seed 0 as `idverify eval`)
SPLITS = ("lfw_val", "eval", "lfw_train", "utk_train", "utk_test", "utk_adapt", "eval_flip")
EVAL_CHIP_SEED = 0      # `idverify eval --protocol lfw-ivs` default seed
TRAIN_CHIP_SEED = 1


def split_items(data_dir: Path, split: str) -> list[D.Item]:
    if split == "lfw_train":
        return D.lfw_split(data_dir).train
    if split == "lfw_val":
        return D.lfw_split(data_dir).val
    if split.startswith("utk_"):
        return getattr(D.utk_split(data_dir), split[4:])
    if split in ("eval", "eval_flip"):
        pairs = read_pairs(Path(data_dir) / "lfw" / "pairs.txt")
        keys = sorted({lfw_key(img) for p in pairs if p.fold in D.EVAL_FOLDS for img in (p.a, p.b)})
        return [D.Item(k, "lfw", k.split("/")[2]) for k in keys]
    raise ValueError(split)


def build_cache(data_dir: Path, root: Path, threads: int = 2, splits=SPLITS) -> None:
    from models.train.cache import CacheConfig, build_split, split_path
    reserved = D.reserved_identities(data_dir)
    cfg = CacheConfig(data_dir=data_dir, root=root, chip_seed=TRAIN_CHIP_SEED, threads=threads)
    for split in splits:
        if split_path(root, split).exists():
            continue
        t0 = time.time()
        items = split_items(data_dir, split)
        print(f"[cache] building {split}: {len(items)} images -> {root}", file=sys.stderr, flush=True)
        if split in ("eval", "eval_flip"):  # evaluation only; the mirrored copy serves flip-averaging
            build_split(split, items, cfg, with_occ=False, chip_seed=EVAL_CHIP_SEED, flip=split == "eval_flip")
        else:
            build_split(split, items, cfg, reserved=reserved)
        print(f"[cache] {split} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)


def train_and_report(args, data_dir: Path) -> int:
    from models.train import trainer
    return trainer.main(args, data_dir)


def ablation_table(runs_dir: Path, names: list[str]) -> str:
    """Markdown rows from runs' eval_folds9-10.json (cached fast path, folds 9-10)."""
    import json
    lines = ["| row | TAR@1e-2 | TAR@1e-3 | TAR@1e-4 | LFW acc (folds 9-10) | command |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for n in names:
        p = Path(runs_dir) / n / "eval_folds9-10.json"
        if not p.exists():
            continue
        r = json.loads(p.read_text())
        t = r["tar_at_far"]
        lines.append(f"| {n} | {t['1e-02'] * 100:.2f} | {t['1e-03'] * 100:.2f} | {t['1e-04'] * 100:.2f} | "
                     f"{r['lfw_accuracy'] * 100:.2f} | `{r.get('command', '')}` |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m models.train.recipe RUN [RUN ...]
    from models.train.paths import DEFAULT_RUNS
    print(ablation_table(DEFAULT_RUNS, sys.argv[1:]))
