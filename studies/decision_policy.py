"""What the decision policy's defaults (service/face/policy.py) do on real photos: a small
measurement, not an evaluation (100 LFW View 2 pairs of fold 1, 50 matched and 50 mismatched:
about 200 images; each pair's first image also made into a simulated chip photo).

It reports, with the served models and settings:
- faces found on the simulated chips and on the raw LFW images (the "one face on the chip" rule);
- the live photos with several faces, and their dominance (the chosen face's box area over the
  next largest), against the same measure on two LFW faces composed side by side;
- each quality flag's rate per photo, and how the matched pairs it would refuse were decided.

    python -m studies.decision_policy [--pairs 100] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from models.eval.chipsim import chip_rng, simulate_chip
from models.eval.pairs import image_relpath, read_pairs, select_pairs
from service.errors import ApiError
from service.face.loader import load_models
from service.face.policy import REFUSABLE, dominance
from service.settings import Settings


def _analyse(pipeline, data: bytes, field: str):
    try:
        return pipeline.analyse(data, field, {}), None
    except ApiError as exc:
        return None, exc.code


def _side_by_side(a: np.ndarray, b: np.ndarray) -> bytes:
    import io

    canvas = np.concatenate([a, b], axis=1)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def measure(n_pairs: int) -> dict:
    settings = Settings()
    models = load_models(settings)
    pipeline = models.pipeline
    lfw = settings.data_dir / "lfw"
    pairs = select_pairs(read_pairs(lfw / "pairs.txt"), [1], limit=n_pairs)
    rows = []
    for p in pairs:
        a_path, b_path = (lfw / "images" / image_relpath(x) for x in (p.a, p.b))
        a_img = np.asarray(Image.open(a_path).convert("RGB"))
        chip = simulate_chip(a_img, None, chip_rng(image_relpath(p.a), 0))
        chip_side, chip_err = _analyse(pipeline, chip, "id_photo")
        raw_side, _ = _analyse(pipeline, a_path.read_bytes(), "id_photo")
        live_side, live_err = _analyse(pipeline, b_path.read_bytes(), "live_photo")
        row = {"same": p.same, "chip_faces": chip_side.faces_seen if chip_side else chip_err,
               "raw_id_faces": raw_side.faces_seen if raw_side else None,
               "live_faces": live_side.faces_seen if live_side else live_err,
               "live_dominance": dominance(live_side.faces, live_side.face) if live_side else None,
               "chip_quality": chip_side.quality if chip_side else None,
               "live_quality": live_side.quality if live_side else None}
        if chip_side and live_side:
            d = models.scoring.decide(pipeline.scores(chip_side, live_side))
            row["decision"] = d.decision
        rows.append(row)

    # two people side by side: the first 10 mismatched pairs' images, next to each other
    composed = []
    for p in [p for p in pairs if not p.same][:10]:
        imgs = [np.asarray(Image.open(lfw / "images" / image_relpath(x)).convert("RGB")) for x in (p.a, p.b)]
        side, err = _analyse(pipeline, _side_by_side(*imgs), "live_photo")
        composed.append(round(dominance(side.faces, side.face), 2) if side else err)
    return {"rows": rows, "composed_dominance": composed}


def summary(result: dict) -> list[str]:
    rows = result["rows"]
    out = [f"pairs: {len(rows)} ({sum(r['same'] for r in rows)} matched)"]
    chips = [r["chip_faces"] for r in rows]
    out.append(f"simulated chips with faces 0/1/2+/refused: {chips.count(0)}/{chips.count(1)}/"
               f"{sum(isinstance(c, int) and c > 1 for c in chips)}/{sum(isinstance(c, str) for c in chips)}")
    raw = [r["raw_id_faces"] for r in rows]
    out.append(f"raw LFW images (as id_photo) with 2+ faces: {sum((c or 0) > 1 for c in raw)} / {len(raw)}")
    multi = sorted(round(r["live_dominance"], 2) for r in rows
                   if r["live_dominance"] is not None and math.isfinite(r["live_dominance"]))
    out.append(f"live photos with 2+ faces: {len(multi)} / {len(rows)}; dominance: {multi}")
    out.append(f"two LFW faces side by side, dominance: {result['composed_dominance']}")
    for flag in REFUSABLE:
        for photo in ("chip", "live"):
            flagged = [r for r in rows if (r[f"{photo}_quality"] or {}).get(flag)]
            same = [r for r in flagged if r["same"]]
            out.append(f"{flag:12s} {photo}: {len(flagged):3d} / {len(rows)} flagged; matched pairs among them "
                       f"{len(same)}, of which accepted {sum(r.get('decision') == 'match' for r in same)}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    result = measure(args.pairs)
    print("\n".join(summary(result)))
    if args.json:
        args.json.write_text(json.dumps(result, default=float, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
