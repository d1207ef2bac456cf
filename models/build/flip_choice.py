"""Flip-averaging, side by side: whether each side (chip, live) of a tower family should embed
its crop together with the mirror image, measured on fit folds (never 9-10).

One pass over LFW-IvS (rgb chips, extended impostors, all same-identity pairs) embeds every crop
plain and mirrored; the four combinations (id plain/averaged x live plain/averaged) are then
scored from those embeddings without analysing an image again. A side is averaged only where it
pays for its cost: an extra tower call per photo must raise the family's mean TAR at FAR 1e-2 and
1e-3 on the fit folds by at least `MIN_GAIN` (0.5 point, about one standard error there).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from models.eval.embedder import Embedder
from models.eval.metrics import ScoreSet, TAR_FARS, far_key, tar_at_far
from models.eval.pairs import image_relpath, read_pairs, select_pairs
from models.eval.protocols import Grid
from service.face.artifacts import Towers
from service.face.embed import Tower
from service.face.pipeline import Pipeline
from service.face.score import normalize

MIN_GAIN = 0.005
CHOICE_FARS = ("1e-02", "1e-03")
MIRROR = "mirror"   # the pseudo-family that embeds mirrored crops


class MirrorTower:
    """A tower's mirror view: the same session, each crop flipped left-right, one view."""

    def __init__(self, tower: Tower):
        self.tower = tower

    def embed(self, chips: np.ndarray) -> np.ndarray:
        chips = chips[None] if chips.ndim == 3 else chips
        return self.tower._run(np.ascontiguousarray(chips[:, :, ::-1], dtype=np.float32))


def _plain(towers: Towers) -> Towers:
    for t in (towers.id, towers.live):
        t.flip_average = False
    return towers


def measure(settings, detector, towers: Towers, data_dir: Path, folds: list[int], limit: int | None = None) -> dict:
    """{"id_live": {"plain_plain": mean TAR, ...}, "rows": per combination TARs, "choice": {"id": bool,
    "live": bool}, "rule": ...} for `towers` (its sessions are used plain; restore options after)."""
    plain = _plain(towers)
    mirror = Towers(id=MirrorTower(plain.id), live=MirrorTower(plain.live), manifest=plain.manifest,
                    folder=plain.folder)
    pipeline = Pipeline(settings, detector, plain, extra={MIRROR: mirror})
    family = plain.manifest["name"]
    pairs = select_pairs(read_pairs(Path(data_dir) / "lfw" / "pairs.txt"), list(folds), limit)
    rel_a = sorted({image_relpath(p.a) for p in pairs})
    rel_b = sorted({image_relpath(p.b) for p in pairs})
    emb = Embedder(pipeline, data_dir, progress=False)
    emb.run([(r, "id") for r in rel_a] + [(r, "live") for r in rel_b])
    views = {}
    for key in set(emb.family_emb[family]) & set(emb.family_emb[MIRROR]):
        a, b = normalize(emb.family_emb[family][key]), normalize(emb.family_emb[MIRROR][key])
        views[key] = {False: a, True: normalize(a + b)}
    rows, mean = {}, {}
    dim = next(iter(views.values()))[False].shape[0]
    for flip_id in (False, True):
        for flip_live in (False, True):
            table = {k: v[flip_id if k[1] == "id" else flip_live] for k, v in views.items()}
            grid = Grid(SimpleNamespace(family_emb={family: table}), rel_a, "id", rel_b, "live", dim)
            imp, gen = grid.sets(family)
            tar = tar_at_far(gen[np.isfinite(gen)], ScoreSet(imp[np.isfinite(imp)]), TAR_FARS)
            name = f"id_{'flip' if flip_id else 'plain'}+live_{'flip' if flip_live else 'plain'}"
            rows[name] = {far_key(r["far_target"]): round(float(r["tar"]), 4) for r in tar}
            mean[(flip_id, flip_live)] = float(np.mean([rows[name][k] for k in CHOICE_FARS]))
    # each side on its own against both plain, then both only if both pay
    choice = {"id": mean[(True, False)] - mean[(False, False)] >= MIN_GAIN,
              "live": mean[(False, True)] - mean[(False, False)] >= MIN_GAIN}
    if choice["id"] and choice["live"] and mean[(True, True)] < max(mean[(True, False)], mean[(False, True)]) + MIN_GAIN:
        choice = {"id": mean[(True, False)] >= mean[(False, True)], "live": mean[(True, False)] < mean[(False, True)]}
    return {"folds": list(folds), "protocol": "lfw-ivs", "chip_encoding": "rgb",
            "genuine": "all same-identity pairs", "impostors": "extended",
            "tar_extended_genuine": rows, "choice": choice,
            "rule": f"a side is flip-averaged only if that raises the mean TAR at FAR {' and '.join(CHOICE_FARS)} "
                    f"by >= {MIN_GAIN * 100:.1f} points (an extra tower call per photo)"}
