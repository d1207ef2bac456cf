"""Embedding: one tower (ONNX) maps aligned face chips to feature vectors."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtime import make_session


class Tower:
    """One tower of the pair. Input: (N, S, S, 3) uint8 RGB chips; output: (N, D) float32.

    With `flip_average` (the manifest's `test_time.flip_average` for this side), each chip is embedded with
    its mirror image in the same batch and the two unit vectors are averaged: measured +0.2 to
    0.3 points of LFW accuracy on folds 1-8 (studies/alignment_study.py), for one extra batch row.

    With `centre` (the manifest's `centring.mu`, for towers trained in a space centred on their
    teacher's mean embedding), every view's output becomes normalize(output) - centre before
    anything else: the space the towers were trained and calibrated in.
    """

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int = 0,
                 flip_average: bool = False, fold_dequantize: bool = False, session=None,
                 centre: np.ndarray | None = None):
        """`session`: an ONNX Runtime session of `path` to share (the two sides of one file
        differ only in their test-time options)."""
        self.path = Path(path)
        self.flip_average = flip_average
        self.session = session if session is not None else make_session(self.path, providers, threads,
                                                                         fold_dequantize=fold_dequantize)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.centre = None if centre is None else np.asarray(centre, np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def _views(self, x: np.ndarray) -> np.ndarray:
        out = self._run(x)
        if self.centre is None:
            return out
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12) - self.centre).astype(np.float32)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        if chips.ndim == 3:
            chips = chips[None]
        x = np.ascontiguousarray(chips, dtype=np.float32)
        if not self.flip_average:
            return self._views(x)
        n = len(x)
        out = self._views(np.concatenate([x, x[:, :, ::-1]]))
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        mean = out[:n] + out[n:]
        return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)
