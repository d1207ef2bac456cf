"""Score-level fusion of two tower families: the one fused-score function the service,
evaluation and the fit all call.

    models/repository/fusion/<version>/manifest.json   members, normalisation, weights
    models/repository/fusion/<version>/calibration.json fused score -> FAR (fold-8 impostors)
    models/repository/fusion/<version>/cohort.npz       s-norm cohort per family (when `snorm`)

Each member family scores a pair as usual (`service.face.score.similarity`, cosine mapped to
[0, 1]); with s-norm (`SNorm`) each family's score is first normalised against the two photos'
cohort statistics; the fusion z-normalises each family's score with the mean and std it was fit with,
takes the logistic-regression logit `w . z + b` and maps it to [0, 1] with the logistic
function. A pair one family could not score (-inf, NaN) gets -inf: evaluation counts it as a
reject. The service never passes one here: its fallback rule is `service.face.decide.Scoring`'s.

The members are named by repository name and version (`towers: dual-v2`, `sface: 1`) with the
SHA-256 of their tower files and their flip-averaging; `check_members` refuses a fusion whose
members are not exactly the ones loaded (a refit is one command: models/build/fit_fusion.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from service.face.artifacts import (ArtifactError, artifact_calibration, artifact_version, flip_average,
                                    load_manifest, resolve_version, verify_file)

NAME = "fusion"   # model name of fusions in the repository
Stats = tuple   # (mu, sd): a side's s-norm statistics, arrays broadcastable with the scores


class SNorm:
    """Adaptive symmetric score normalisation against a cohort of live embeddings.

    For a pair (a, b) of one family with score s: s' = ((s - mu_a) / sd_a + (s - mu_b) / sd_b) / 2,
    mu/sd = mean and standard deviation of the `k` highest scores of that side's embedding
    against the family's cohort (unit vectors, `cohort.npz` in the fusion folder). Each photo's
    statistics depend on that photo alone, so the service computes them per photo and
    evaluation per image, and both pass them to `Fusion.score`."""

    def __init__(self, cohorts: Mapping[str, np.ndarray], k: int):
        self.cohorts = {f: np.ascontiguousarray(c, dtype=np.float32) for f, c in cohorts.items()}
        self.k = int(k)

    def stats(self, family: str, emb: np.ndarray) -> Stats:
        """(mu, sd), each (N,), of the rows of `emb` (N, D) (any norm; rows of zeros allowed)."""
        from service.face.score import normalize, score_from_cosine

        c = score_from_cosine(normalize(np.atleast_2d(emb)) @ self.cohorts[family].T).astype(np.float64)
        k = min(self.k, c.shape[1])
        top = np.partition(c, c.shape[1] - k, axis=1)[:, c.shape[1] - k:]
        return top.mean(1), np.maximum(top.std(1), 1e-6)

    @staticmethod
    def apply(s, a: Stats, b: Stats):
        with np.errstate(invalid="ignore"):
            return 0.5 * ((np.asarray(s, np.float64) - a[0]) / a[1] + (np.asarray(s, np.float64) - b[0]) / b[1])


@dataclass(frozen=True)
class Fusion:
    manifest: dict
    folder: Path
    snorm: SNorm | None = None

    version = property(lambda self: artifact_version(self.manifest))
    calibration = property(lambda self: artifact_calibration(self.manifest, self.folder))

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.manifest["members"])

    def normalised(self, family: str, s, stats: Mapping[str, tuple[Stats, Stats]] | None = None):
        """A family's score as the fusion weighs it: s-normed when the fusion has a cohort
        (`stats[family]` = (id side's, live side's) statistics), else as it is."""
        if self.snorm is None:
            return np.asarray(s, np.float64)
        if stats is None or family not in stats:
            raise ValueError(f"{self.version} s-normalises scores: pass each side's cohort statistics")
        return self.snorm.apply(s, *stats[family])

    def logit(self, scores: Mapping[str, object], stats=None) -> np.ndarray:
        norm, weights = self.manifest["normalisation"], self.manifest["weights"]
        out = np.float64(self.manifest["bias"])
        for f in self.families:
            z = (self.normalised(f, scores[f], stats) - norm[f]["mean"]) / norm[f]["std"]
            out = out + weights[f] * z
        return out

    def score(self, scores: Mapping[str, object], stats: Mapping[str, tuple[Stats, Stats]] | None = None):
        """The fused score in [0, 1] of per-family scores (scalars or equal-shape arrays, family
        name -> score); -inf where any family's score is not finite. With s-norm, `stats` gives
        each family's (id side, live side) cohort statistics (`SNorm.stats`), broadcastable
        with the scores."""
        with np.errstate(invalid="ignore"):
            t = self.logit(scores, stats)
        ok = np.isfinite(t)
        fused = np.where(ok, 0.5 * (1.0 + np.tanh(0.5 * np.where(ok, t, 0.0))), -np.inf)  # logistic, no overflow
        return float(fused) if fused.ndim == 0 else fused

    def side_stats(self, embeddings: Mapping[str, np.ndarray | None] | None) -> dict[str, Stats] | None:
        """One photo's s-norm statistics per family (None without s-norm; a family without an
        embedding is left out)."""
        if self.snorm is None:
            return None
        if embeddings is None:
            raise ValueError(f"{self.version} s-normalises scores: pass the photos' embeddings")
        return {f: tuple(float(v[0]) for v in self.snorm.stats(f, e)) for f, e in embeddings.items()
                if e is not None and f in self.snorm.cohorts}

    def score_pair(self, scores: Mapping[str, float], id_embeddings: Mapping[str, np.ndarray | None] | None,
                   live_embeddings: Mapping[str, np.ndarray | None] | None) -> float:
        """The fused score of one pair from its per-family scores and the two photos'
        embeddings (what the service calls; evaluation calls `score` with the same statistics)."""
        a, b = self.side_stats(id_embeddings), self.side_stats(live_embeddings)
        stats = None if a is None else {f: (a[f], b[f]) for f in self.families}
        return float(self.score(scores, stats))

    def check_members(self, loaded: Mapping[str, object]) -> None:
        """ArtifactError unless every member is loaded at its named version, with the tower files
        and flip-averaging the fusion was fit with. `loaded`: family name -> Towers."""
        for name, want in self.manifest["members"].items():
            towers = loaded.get(name)
            if towers is None:
                raise ArtifactError(f"{self.version} needs family {name!r} ({name}:{want['version']}); not loaded")
            have = member_entry(towers)
            flip = have["flip_average"]
            if (have["version"], have["files"], flip) != (want["version"], want["files"], _flips(want["flip_average"])):
                raise ArtifactError(
                    f"{self.version} was fit on {name}:{want['version']} (flip_average {want['flip_average']}); "
                    f"loaded {towers.version} (flip_average {flip}) differs: refit with "
                    f"python -m models.build.fit_fusion, or serve its members")


def _flips(flip) -> dict[str, bool]:
    """A member's flip-averaging as {"id": bool, "live": bool} (older fusions name one bool)."""
    return {side: bool(flip.get(side, False)) if isinstance(flip, dict) else bool(flip) for side in ("id", "live")}


def member_entry(towers) -> dict:
    """How a fusion manifest names one member (what `check_members` compares)."""
    m = towers.manifest
    return {"version": m["version"], "files": {side: e["sha256"] for side, e in m["towers"].items()},
            "flip_average": {side: flip_average(m, side) for side in ("id", "live")}}


def load_snorm(folder: Path, spec: dict) -> SNorm:
    """The cohort named by a manifest's `snorm` entry ({file, sha256, k}), hash checked."""
    path = verify_file(folder, spec)
    with np.load(path) as z:
        cohorts = {name: z[name] for name in z.files}
    return SNorm(cohorts, spec["k"])


def load_fusion(models_dir: Path, version: str) -> Fusion:
    folder = resolve_version(models_dir, NAME, version)
    manifest = load_manifest(folder)
    if len(manifest.get("members") or {}) < 2:
        raise ArtifactError(f"{folder}: a fusion names at least two member families")
    verify_file(folder, {"file": manifest["calibration"], "sha256": manifest["calibration_sha256"]})
    snorm = load_snorm(folder, manifest["snorm"]) if manifest.get("snorm") else None
    if snorm is not None and set(snorm.cohorts) != set(manifest["members"]):
        raise ArtifactError(f"{folder}: the s-norm cohort names {sorted(snorm.cohorts)}, "
                            f"the members are {sorted(manifest['members'])}")
    return Fusion(manifest, folder, snorm)
