"""Embedding: one tower (ONNX) maps aligned face chips to feature vectors."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtime import make_session


class Tower:
    """One tower of the pair. Input: (N, S, S, 3) uint8 RGB chips; output: (N, D) float32."""

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int = 0):
        self.path = Path(path)
        self.session = make_session(self.path, providers, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def embed(self, chips: np.ndarray) -> np.ndarray:
        if chips.ndim == 3:
            chips = chips[None]
        x = np.ascontiguousarray(chips, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]
