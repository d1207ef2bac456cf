"""Where training keeps its files (a leaf: every models/train module may import it)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / ".cache" / "train" / "v1"
DEFAULT_RUNS = ROOT / ".cache" / "train" / "runs"
REPO = ROOT / "models" / "repository" / "towers"
