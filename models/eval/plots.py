"""ROC and DET plots of an evaluation (matplotlib, scipy: the `eval` extra)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.eval.metrics import TAR_FARS


def plot_curves(curves: dict[str, dict], out_dir: Path, title: str) -> dict[str, str]:
    """roc.png (TAR vs FAR, log FAR) and det.png (FNMR vs FMR on normal-deviate axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for label, c in curves.items():
        far = np.asarray(c["far"])
        keep = far > 0
        ax.plot(far[keep], np.asarray(c["tar"])[keep], label=label)
    for f in TAR_FARS:
        ax.axvline(f, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_ylim(0, 1.005)
    ax.grid(True, which="major", alpha=0.4)
    ax.set_title(f"ROC - {title}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    roc = out_dir / "roc.png"
    fig.savefig(roc)
    plt.close(fig)

    # axes down to half the resolution of the counts (FMR 1/N_impostor, FNMR 1/N_genuine)
    x_lo = max(1e-7, min([0.5 / max(1, c.get("n_impostors", 0)) for c in curves.values()] + [1e-3]))
    y_lo = max(1e-7, min([0.5 / max(1, c.get("n_genuine", 0)) for c in curves.values()] + [1e-2]))
    eps = min(x_lo, y_lo)
    all_ticks = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5)
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    for label, c in curves.items():
        far = np.clip(np.asarray(c["far"]), x_lo, 1 - eps)
        fnmr = np.clip(1.0 - np.asarray(c["tar"]), y_lo, 1 - eps)
        ax.plot(norm.ppf(far), norm.ppf(fnmr), label=label)
    xt = [t for t in all_ticks if t >= x_lo]
    yt = [t for t in all_ticks if t >= y_lo]
    ax.set_xticks(norm.ppf(xt), [f"{t:g}" for t in xt])
    ax.set_yticks(norm.ppf(yt), [f"{t:g}" for t in yt])
    ax.set_xlim(norm.ppf(x_lo), norm.ppf(0.5))
    ax.set_ylim(norm.ppf(y_lo), norm.ppf(0.5))
    ax.set_xlabel("FMR (false match rate)")
    ax.set_ylabel("FNMR (false non-match rate)")
    ax.grid(True, alpha=0.4)
    ax.set_title(f"DET - {title}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    det = out_dir / "det.png"
    fig.savefig(det)
    plt.close(fig)
    return {"roc": roc.name, "det": det.name}
