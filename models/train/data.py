"""Training data: LFW identities outside the evaluation folds, UTKFace attribute labels.

Rules this module enforces (and tests/models/train/test_train_data.py checks):
  * every identity that appears in LFW View-2 folds 9 and 10 (pairs.txt lines 4802-6001) is
    reserved for evaluation: `reserved_identities()` builds that set from pairs.txt and
    `assert_no_reserved()` refuses any training/validation/calibration list that touches it;
  * data/holdout is never read;
  * nothing is copied: items carry paths relative to the data dir (the chip simulator's key).

No torch here: the splits are plain Python so the tests stay fast.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from models.eval.pairs import fold_identities, read_pairs

EVAL_FOLDS = (9, 10)
VAL_FOLD = 8                 # identities of fold 8 (not reserved): validation + calibration, never trained on
UTK_RE = re.compile(r"^(\d+)_(\d)_(\d)_(\d+)\.jpg\.chip\.jpg$")
UTK_RACES = ("white", "black", "asian", "indian", "other")
AGE_BINS = (0, 13, 20, 30, 40, 50, 60, 200)   # upper-exclusive bins for the age-group head


@dataclass
class Item:
    key: str                      # path relative to the data dir, '/'-separated (chip simulator key)
    source: str                   # "lfw" | "utk"
    identity: str                 # LFW name, or "utk:<file>" (every UTK image is its own identity)
    labels: dict = field(default_factory=dict)   # gender (0 m / 1 f), age (years), race (0-4)


def reserved_identities(data_dir: Path) -> set[str]:
    """Every identity appearing in folds 9-10 of LFW View 2: evaluation only."""
    return fold_identities(read_pairs(Path(data_dir) / "lfw" / "pairs.txt"), EVAL_FOLDS)


class ReservedIdentityError(AssertionError):
    pass


def assert_no_reserved(items, reserved: set[str]) -> None:
    """Raise if any item (Item, or LFW key string) belongs to a reserved identity."""
    for it in items:
        key = it.key if isinstance(it, Item) else str(it)
        if "holdout/" in key or key.startswith("holdout"):
            raise ReservedIdentityError(f"{key}: data/holdout is never used for training")
        if key.startswith("lfw/"):
            name = key.split("/")[2]
            if name in reserved:
                raise ReservedIdentityError(f"{key}: identity {name} is reserved for evaluation (folds 9-10)")


def list_lfw(data_dir: Path) -> dict[str, list[str]]:
    """name -> sorted image keys for every LFW identity."""
    root = Path(data_dir) / "lfw" / "images"
    out: dict[str, list[str]] = {}
    for d in sorted(root.iterdir()):
        if d.is_dir():
            out[d.name] = [f"lfw/images/{d.name}/{f.name}" for f in sorted(d.iterdir()) if f.suffix == ".jpg"]
    return out


def lfw_gender(data_dir: Path) -> dict[str, int]:
    path = Path(data_dir) / "lfw" / "gender_labels.csv"
    out: dict[str, int] = {}
    if path.exists():
        for ln in path.read_text().splitlines()[1:]:
            name, _, g = ln.partition(",")
            if g.strip() in ("male", "female"):
                out[name.strip()] = 0 if g.strip() == "male" else 1
    return out


@dataclass
class LfwSplit:
    train: list[Item]
    val: list[Item]
    reserved: set[str]


def lfw_split(data_dir: Path, val_fold: int = VAL_FOLD) -> LfwSplit:
    """LFW images outside the reserved identities. Identities of `val_fold` go to validation
    (model selection, unit probe, calibration); all others to training."""
    data_dir = Path(data_dir)
    pairs = read_pairs(data_dir / "lfw" / "pairs.txt")
    reserved = fold_identities(pairs, EVAL_FOLDS)
    val_names = fold_identities(pairs, [val_fold]) - reserved
    genders = lfw_gender(data_dir)
    train, val = [], []
    for name, keys in list_lfw(data_dir).items():
        if name in reserved:
            continue
        labels = {"gender": genders[name]} if name in genders else {}
        for k in keys:
            (val if name in val_names else train).append(Item(k, "lfw", name, dict(labels)))
    assert_no_reserved(train, reserved)
    assert_no_reserved(val, reserved)
    return LfwSplit(train=train, val=val, reserved=reserved)


def parse_utk_name(fname: str) -> dict | None:
    m = UTK_RE.match(fname)
    if not m:
        return None
    age, gender, race = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if gender not in (0, 1) or race not in range(5) or not 0 <= age <= 120:
        return None
    return {"age": age, "gender": gender, "race": race}


def age_group(age: float) -> int:
    for i in range(len(AGE_BINS) - 1):
        if AGE_BINS[i] <= age < AGE_BINS[i + 1]:
            return i
    return len(AGE_BINS) - 2


def _bucket(key: str, salt: str = "utk-split-v1") -> float:
    h = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0 ** 64


@dataclass
class UtkSplit:
    train: list[Item]      # main training (pairs with their own chip + attribute heads)
    adapt: list[Item]      # pool for the adaptation experiment (<= 500 used), never in main training
    test: list[Item]       # attribute test set (probe + adaptation measurement)


def utk_items(data_dir: Path, folder: str = "utkface/images") -> list[Item]:
    root = Path(data_dir) / folder
    items = []
    for f in sorted(root.iterdir()):
        lab = parse_utk_name(f.name)
        if lab is not None:
            key = f"{folder}/{f.name}"
            items.append(Item(key, "utk", f"utk:{f.name}", lab))
    return items


def utk_split(data_dir: Path, adapt_frac: float = 0.06, test_frac: float = 0.12) -> UtkSplit:
    """Deterministic hash split: ~82 % train, ~6 % adaptation pool (~590), ~12 % test."""
    tr, ad, te = [], [], []
    for it in utk_items(data_dir):
        u = _bucket(it.key)
        (ad if u < adapt_frac else te if u < adapt_frac + test_frac else tr).append(it)
    return UtkSplit(tr, ad, te)


def items_from_dir(directory: Path, data_dir: Path | None = None) -> list[Item]:
    """Labelled images for `idverify adapt --data DIR`: UTKFace-style names
    (age_gender_race_*.jpg). Keys are relative to data_dir when the folder lies inside it."""
    directory = Path(directory).resolve()
    items = []
    for f in sorted(directory.iterdir()):
        lab = parse_utk_name(f.name) if f.is_file() or f.is_symlink() else None
        if lab is None:
            continue
        key = str(f)
        if data_dir is not None:
            try:
                key = str(f.resolve().relative_to(Path(data_dir).resolve()))
            except ValueError:
                pass
        items.append(Item(key, "utk", f"utk:{f.name}", lab))
    return items
