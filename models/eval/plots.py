"""ROC and DET plots of an evaluation (matplotlib, scipy: the `eval` extra). With the served
threshold (protocols.served_threshold: what IDV_THRESHOLD or IDV_FAR_TARGET give the service),
each curve is marked where that threshold puts it on this evaluation's scores."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.eval.metrics import TAR_FARS

SERVED_MARK = dict(marker="o", markersize=7, markerfacecolor="none", markeredgewidth=1.6, linestyle="none")


def served_label(served: dict) -> str:
    return f"served threshold {served['score']:.4f} ({served['setting']})"


def _mark_served(ax, curves: dict[str, dict], served: dict | None, point) -> None:
    """One marker per curve at the served threshold's (FAR, TAR), labelled once."""
    if not served:
        return
    label = served_label(served)
    for line, c in zip(ax.get_lines(), curves.values()):
        if "served" in c:
            ax.plot(*point(c), color=line.get_color(), label=label, **SERVED_MARK)
            label = "_served"   # matplotlib leaves "_"-labels out of the legend


def roc_figure(curves: dict[str, dict], title: str, served: dict | None = None):
    """TAR vs FAR, log FAR."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for label, c in curves.items():
        far = np.asarray(c["far"])
        keep = far > 0
        ax.plot(far[keep], np.asarray(c["tar"])[keep], label=label)
    # a FAR of 0 has no place on a log axis: drawn at half the resolution of the impostor count
    _mark_served(ax, curves, served, lambda c: (max(c["served"]["far"], 0.5 / max(1, c.get("n_impostors", 1))),
                                                c["served"]["tar"]))
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
    return fig


def det_figure(curves: dict[str, dict], title: str, served: dict | None = None):
    """FNMR vs FMR on normal-deviate axes, down to half the resolution of the counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    x_lo = max(1e-7, min([0.5 / max(1, c.get("n_impostors", 0)) for c in curves.values()] + [1e-3]))
    y_lo = max(1e-7, min([0.5 / max(1, c.get("n_genuine", 0)) for c in curves.values()] + [1e-2]))
    eps = min(x_lo, y_lo)
    all_ticks = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5)
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    for label, c in curves.items():
        far = np.clip(np.asarray(c["far"]), x_lo, 1 - eps)
        fnmr = np.clip(1.0 - np.asarray(c["tar"]), y_lo, 1 - eps)
        ax.plot(norm.ppf(far), norm.ppf(fnmr), label=label)
    _mark_served(ax, curves, served, lambda c: (norm.ppf(np.clip(c["served"]["far"], x_lo, 1 - eps)),
                                                norm.ppf(np.clip(1.0 - c["served"]["tar"], y_lo, 1 - eps))))
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
    return fig


def plot_curves(curves: dict[str, dict], out_dir: Path, title: str, served: dict | None = None) -> dict[str, str]:
    """roc.png and det.png in `out_dir`; `served`: the served threshold, marked on each curve
    that carries its operating point (`curves[label]["served"]`)."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for name, make in (("roc", roc_figure), ("det", det_figure)):
        fig = make(curves, title, served)
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
        names[name] = f"{name}.png"
    return names
