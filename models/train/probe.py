"""Unit probe: how selective each of the 128 embedding units is for each attribute.

Data never trained on: LFW fold-8 identities (computed attributes, LFW gender list) and the
UTKFace test split (gender, age, race + computed). Embeddings: id tower on chips, live tower on
live and occluded live images; units are the L2-normalised embedding coordinates.

selectivity(unit, attr) in [0, 1]:
  binary / regression: |Pearson r| between the unit and the attribute;
  race (5 classes): correlation ratio eta = sqrt(between-class var / total var).
ties(attr): the units the attribute relies on: those carrying 80 % of the head's group norm
  (heads trained with group sparsity), at most 16, else the 8 most selective units.

Scoring-time use: a mask zeroing the units tied to nuisance attributes (domain, illumination,
blur) is tried on the validation identities (fold 8); it is kept only if it raises LFW-IvS
TAR@FAR1e-3 there by >= 0.5 point (never judged on folds 9-10).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.train import data as D
from models.train.cache import load_split
from models.train.heads import ATTRIBUTES, DEMOGRAPHIC

MASK_CANDIDATES = (("domain",), ("domain", "blur"), ("domain", "blur", "illumination"))
MASK_MIN_GAIN = 0.005


def _norm(e):
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _selectivity(z: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    m = ~np.isnan(y)
    z, y = z[m], y[m]
    if len(y) < 10 or np.nanstd(y) == 0:
        return np.zeros(z.shape[1])
    if kind == "class":
        tot = ((z - z.mean(0)) ** 2).sum(0)
        between = np.zeros(z.shape[1])
        for c in np.unique(y):
            zc = z[y == c]
            between += len(zc) * (zc.mean(0) - z.mean(0)) ** 2
        return np.sqrt(between / np.maximum(tot, 1e-12))
    zc = z - z.mean(0)
    yc = y - y.mean()
    r = (zc * yc[:, None]).sum(0) / np.maximum(np.sqrt((zc ** 2).sum(0) * (yc ** 2).sum()), 1e-12)
    return np.abs(r)


def probe_data(model, cache: Path, data_dir: Path) -> tuple[np.ndarray, dict]:
    """Stacked embeddings (rows: chip / live / occ of fold-8 LFW + UTK test) and attributes."""
    from models.train.runs import embed
    reserved = D.reserved_identities(data_dir)
    Z, A = [], {a: [] for a in ATTRIBUTES}
    for split in ("lfw_val", "utk_test"):
        d = load_split(cache, split, reserved=reserved, cut=model.id.cut)
        for v, tower in (("chip", model.id), ("live", model.live), ("occ", model.live)):
            ok = d[f"{v}_ok"]
            e = embed(tower, d[f"{v}_feat"][ok])
            Z.append(_norm(e))
            n = int(ok.sum())
            for a in ("yaw", "pitch", "illumination", "blur"):
                A[a].append(d[f"{v}_{a}"][ok])
            A["domain"].append(np.full(n, 1.0 if v == "chip" else 0.0))
            A["occlusion"].append(np.full(n, 1.0 if v == "occ" else 0.0))
            for a in DEMOGRAPHIC:
                A[a].append(d[a][ok])
    return np.concatenate(Z), {a: np.concatenate(v).astype(np.float64) for a, v in A.items()}


def head_groups(model) -> dict[str, np.ndarray] | None:
    if model.heads is None:
        return None
    return {a: h.weight.detach().norm(dim=0).numpy() for a, h in model.heads.heads.items()}


def ties_from(sel: np.ndarray, attrs: list[str], groups: dict | None, share: float = 0.8, cap: int = 16,
              fallback: int = 8) -> dict[str, list[int]]:
    out = {}
    for k, a in enumerate(attrs):
        g = None if groups is None else groups.get(a)
        if g is not None and g.sum() > 0:
            order = np.argsort(-g)
            csum = np.cumsum(g[order]) / g.sum()
            n = int(np.searchsorted(csum, share) + 1)
            out[a] = sorted(int(u) for u in order[:min(n, cap)])
        else:
            out[a] = sorted(int(u) for u in np.argsort(-sel[:, k])[:fallback])
    return out


def heatmap(sel: np.ndarray, attrs: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(14, 3.6), dpi=110)
    im = ax.imshow(sel.T, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.3, float(sel.max())))
    ax.set_yticks(range(len(attrs)), attrs)
    ax.set_xlabel("embedding unit")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02, label="selectivity (|r| or eta)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def mask_trials(ei, okc, el, okl, identities, ties: dict) -> dict:
    """Try masking nuisance-tied units on validation embeddings; keep only a clear gain."""
    from models.train.fasteval import identity_verification
    base = identity_verification(ei, okc, el, okl, identities)
    trials = [{"mask_attributes": [], "units": [], "val": base}]
    for combo in MASK_CANDIDATES:
        units = sorted({u for a in combo for u in ties.get(a, [])})
        m = np.ones(128, np.float32)
        m[units] = 0.0
        trials.append({"mask_attributes": list(combo), "units": units,
                       "val": identity_verification(ei * m, okc, el * m, okl, identities)})
    best = max(trials[1:], key=lambda t: t["val"]["ivs"]["1e-03"])
    use = best["val"]["ivs"]["1e-03"] - base["ivs"]["1e-03"] >= MASK_MIN_GAIN
    mask = np.ones(128, np.float32)
    if use:
        mask[best["units"]] = 0.0
    return {"use_mask": bool(use), "rule": f"mask kept only if validation (fold 8) LFW-IvS TAR@1e-3 "
            f"gains >= {MASK_MIN_GAIN * 100:.1f} point", "chosen": best["mask_attributes"] if use else [],
            "mask": mask.tolist(), "trials": trials}


def choose_mask(model, ties: dict, cache: Path, data_dir: Path) -> dict:
    """`mask_trials` on the cached fold-8 activations."""
    from models.train.runs import embed
    d = load_split(cache, "lfw_val", reserved=D.reserved_identities(data_dir), cut=model.id.cut)
    return mask_trials(embed(model.id, d["chip_feat"]), d["chip_ok"], embed(model.live, d["live_feat"]),
                       d["live_ok"], d["identity"], ties)


def write_unit_map(model, Z: np.ndarray, A: dict, run: Path, scoring_for, title: str = "") -> dict:
    """Selectivity of every unit for every attribute, the units tied to each head, the scoring
    decision (`scoring_for(ties) -> dict`): unit_map.json + unit_map.png in `run`."""
    attrs = list(ATTRIBUTES)
    sel = np.stack([_selectivity(Z, A[a], ATTRIBUTES[a]["kind"]) for a in attrs], axis=1)  # (128, n_attr)
    groups = head_groups(model)
    ties = ties_from(sel, attrs, groups)
    out = {
        "attributes": attrs,
        "demographic": list(DEMOGRAPHIC),
        "n_rows": int(len(Z)),
        "selectivity": np.round(sel, 4).tolist(),
        "head_group_norm": {a: np.round(g, 4).tolist() for a, g in groups.items()} if groups else None,
        "ties": ties,
        "top_units": {a: [int(u) for u in np.argsort(-sel[:, k])[:8]] for k, a in enumerate(attrs)},
        "max_selectivity": {a: float(sel[:, k].max()) for k, a in enumerate(attrs)},
        "scoring": scoring_for(ties),
        "note": "demographic heads are probes/training aids only; never part of /verify answers or audit",
    }
    run = Path(run)
    (run / "unit_map.json").write_text(json.dumps(out, indent=1) + "\n")
    heatmap(sel, attrs, run / "unit_map.png", title or f"unit selectivity - {run.name}")
    return out


def run_probe(model, run: Path, cache: Path, data_dir: Path, title: str = "") -> dict:
    Z, A = probe_data(model, cache, data_dir)
    return write_unit_map(model, Z, A, run, lambda ties: choose_mask(model, ties, cache, data_dir), title)
