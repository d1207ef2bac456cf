"""LFW View 2 pairs: the one reader of pairs.txt (evaluation and training both use it), fold
selection, and image paths."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    fold: int            # 1..10
    a: tuple[str, int]   # (name, image number): first column (id side in lfw-ivs)
    b: tuple[str, int]   # second column (live side)
    same: bool


def image_relpath(img: tuple[str, int]) -> str:
    """Path of an LFW image relative to data_dir/lfw/images."""
    name, idx = img
    return f"{name}/{name}_{idx:04d}.jpg"


def read_pairs(path: Path | str) -> list[Pair]:
    """LFW View 2 pairs.txt: header "folds n", then per fold n matched and n mismatched lines."""
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    n_folds, n = int(lines[0][0]), int(lines[0][1])
    rows = lines[1:]
    if len(rows) != n_folds * 2 * n:
        raise ValueError(f"{path}: expected {n_folds * 2 * n} pair lines, found {len(rows)}")
    pairs = []
    for k, r in enumerate(rows):
        fold = k // (2 * n) + 1
        if len(r) == 3:
            pairs.append(Pair(fold, (r[0], int(r[1])), (r[0], int(r[2])), True))
        elif len(r) == 4:
            pairs.append(Pair(fold, (r[0], int(r[1])), (r[2], int(r[3])), False))
        else:
            raise ValueError(f"{path}: bad pair line {' '.join(r)!r}")
        if pairs[-1].same != ((k % (2 * n)) < n):
            raise ValueError(f"{path}: line {k + 2} is not where View 2 puts a {'matched' if len(r) == 3 else 'mismatched'} pair")
    return pairs


def parse_folds(text: str) -> list[int]:
    """'1-10', '9,10', '1,3-5' -> sorted fold numbers in 1..10."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            out.update(range(lo, hi + 1))
        else:
            out.add(int(part))
    if not out or min(out) < 1 or max(out) > 10:
        raise ValueError(f"folds must be within 1..10, got {text!r}")
    return sorted(out)


def select_pairs(pairs: list[Pair], folds: list[int], limit: int | None = None) -> list[Pair]:
    """Pairs of the given folds; with `limit`, at most that many per fold, half matched and half
    mismatched (the first of each, in file order)."""
    out = []
    for f in folds:
        fp = [p for p in pairs if p.fold == f]
        if limit is not None:
            same = [p for p in fp if p.same][: (limit + 1) // 2]
            diff = [p for p in fp if not p.same][: limit // 2]
            fp = same + diff
        out.extend(fp)
    return out


def lfw_key(img: tuple[str, int]) -> str:
    """Path of an LFW image relative to the data dir (the chip simulator's seed key)."""
    return f"lfw/images/{image_relpath(img)}"


def fold_identities(pairs: list[Pair], folds) -> set[str]:
    """Every identity that appears in a pair of `folds`."""
    folds = set(folds)
    return {name for p in pairs if p.fold in folds for name in (p.a[0], p.b[0])}
