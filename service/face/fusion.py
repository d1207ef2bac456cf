"""Score-level fusion of two tower families: the one fused-score function the service,
evaluation and the fit all call.

    models/repository/fusion/<version>/manifest.json   members, normalisation, weights
    models/repository/fusion/<version>/calibration.json fused score -> FAR (fold-8 impostors)

Each member family scores a pair as usual (`service.face.score.similarity`, cosine mapped to
[0, 1]); the fusion z-normalises each family's score with the mean and std it was fit with,
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

from service.face.artifacts import (ArtifactError, artifact_calibration, artifact_version, load_manifest,
                                    resolve_version, verify_file)

NAME = "fusion"   # model name of fusions in the repository


@dataclass(frozen=True)
class Fusion:
    manifest: dict
    folder: Path

    version = property(lambda self: artifact_version(self.manifest))
    calibration = property(lambda self: artifact_calibration(self.manifest, self.folder))

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.manifest["members"])

    def logit(self, scores: Mapping[str, object]) -> np.ndarray:
        norm, weights = self.manifest["normalisation"], self.manifest["weights"]
        out = np.float64(self.manifest["bias"])
        for f in self.families:
            z = (np.asarray(scores[f], np.float64) - norm[f]["mean"]) / norm[f]["std"]
            out = out + weights[f] * z
        return out

    def score(self, scores: Mapping[str, object]):
        """Fused score in [0, 1] of per-family scores (scalars or equal-shape arrays, family
        name -> score); -inf where any family's score is not finite."""
        t = self.logit(scores)
        ok = np.isfinite(t)
        fused = np.where(ok, 0.5 * (1.0 + np.tanh(0.5 * np.where(ok, t, 0.0))), -np.inf)  # logistic, no overflow
        return float(fused) if fused.ndim == 0 else fused

    def check_members(self, loaded: Mapping[str, object]) -> None:
        """ArtifactError unless every member is loaded at its named version, with the tower files
        and flip-averaging the fusion was fit with. `loaded`: family name -> Towers."""
        for name, want in self.manifest["members"].items():
            towers = loaded.get(name)
            if towers is None:
                raise ArtifactError(f"{self.version} needs family {name!r} ({name}:{want['version']}); not loaded")
            got = towers.manifest
            files = {side: e["sha256"] for side, e in got["towers"].items()}
            flip = bool((got.get("test_time") or {}).get("flip_average", False))
            if got["version"] != want["version"] or files != want["files"] or flip != want["flip_average"]:
                raise ArtifactError(
                    f"{self.version} was fit on {name}:{want['version']} (flip_average {want['flip_average']}); "
                    f"loaded {towers.version} (flip_average {flip}) differs: refit with "
                    f"python -m models.build.fit_fusion, or serve its members")


def member_entry(towers) -> dict:
    """How a fusion manifest names one member (what `check_members` compares)."""
    m = towers.manifest
    return {"version": m["version"], "files": {side: e["sha256"] for side, e in m["towers"].items()},
            "flip_average": bool((m.get("test_time") or {}).get("flip_average", False))}


def load_fusion(models_dir: Path, version: str) -> Fusion:
    folder = resolve_version(models_dir, NAME, version)
    manifest = load_manifest(folder)
    if len(manifest.get("members") or {}) < 2:
        raise ArtifactError(f"{folder}: a fusion names at least two member families")
    verify_file(folder, {"file": manifest["calibration"], "sha256": manifest["calibration_sha256"]})
    return Fusion(manifest, folder)
