"""Scoring: a pair of tower outputs -> similarity in [0, 1], higher = more alike.

score = (1 + cos(a, b)) / 2. For unit vectors this equals 1 - |a - b|^2 / 4, so it is a
monotone map of the Euclidean distance dlib's embedder was trained with (its customary
0.6 distance threshold is score 0.91).
"""
from __future__ import annotations

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def score_from_cosine(cos):
    """The one map from cosine similarity to the [0, 1] score (scalar or array): the service,
    evaluation and training all call this."""
    return np.clip((1.0 + cos) / 2.0, 0.0, 1.0)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(score_from_cosine(float(np.dot(normalize(a).ravel(), normalize(b).ravel()))))


def similarity_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All-pairs scores between rows of a (N, D) and rows of b (M, D)."""
    return score_from_cosine(normalize(a) @ normalize(b).T)
