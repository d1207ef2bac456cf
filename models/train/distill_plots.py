"""curves.png of a distillation run, from its log.jsonl: fold-8 TAR per coder, the training
loss terms, and the operating point (FAR 1e-3 impostor cos') beside the mean own-image cos'."""
from __future__ import annotations

import json
from pathlib import Path


def read_log(run: Path) -> list[dict]:
    path = Path(run) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def curves(run: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = read_log(run)
    evals = [r for r in recs if r.get("event") == "eval"]
    steps = [r for r in recs if "event" not in r]
    if not evals:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    xs = [e["step"] for e in evals]
    for codec in evals[-1]["val"]:
        ax[0].plot(xs, [e["val"][codec]["tar"]["1e-03"] for e in evals], marker="o", label=f"{codec} TAR@1e-3")
        ax[0].plot(xs, [e["val"][codec]["tar"]["1e-02"] for e in evals], ls="--", alpha=.6, label=f"{codec} TAR@1e-2")
    ax[0].set_ylabel("fold 8"), ax[0].legend(fontsize=7), ax[0].grid(alpha=.3)
    for k in ("loss", "distill", "binary", "relational", "sparsity"):
        pts = [(r["step"], r[k]) for r in steps if k in r]
        if pts:
            ax[1].plot(*zip(*pts), label=k)
    if ax[1].lines:
        ax[1].set_yscale("log"), ax[1].legend(fontsize=7)
    ax[1].grid(alpha=.3)
    main = "rgb" if "rgb" in evals[-1]["val"] else next(iter(evals[-1]["val"]))
    ax[2].plot(xs, [e["val"][main]["far_1e-03_cos"] for e in evals], marker="o", label=f"{main} FAR 1e-3 impostor cos'")
    ax[2].plot(xs, [e["val"][main]["own_cos"] for e in evals], marker="s", label=f"{main} own-image cos'")
    ax[2].legend(fontsize=7), ax[2].grid(alpha=.3)
    for a in ax:
        a.set_xlabel("step")
    stops = [r for r in recs if r.get("event") == "stop"]
    fig.suptitle(f"{Path(run).name}" + (f" (stopped at step {stops[-1]['step']})" if stops else ""))
    fig.tight_layout()
    out = Path(run) / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
