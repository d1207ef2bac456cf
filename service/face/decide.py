"""Decision: a threshold set either as a score or as a target false-accept rate. The one place
the threshold and the decision live (the loaded `Models` hold it; `Pipeline` knows neither).

The calibration table ships with the model (score -> FAR measured on impostor pairs outside the
evaluation folds). A target FAR picks the lowest tabulated score whose FAR is <= the target;
a fixed score reports the FAR the table gives for it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Threshold:
    score: float
    far: float | None  # the false-accept rate this threshold stands for (None: no calibration)

    def decide(self, score: float) -> str:
        return "match" if score >= self.score else "no_match"

    @classmethod
    def from_settings(cls, settings, table: list[dict]) -> "Threshold":
        """IDV_THRESHOLD when set, else IDV_FAR_TARGET looked up in `table`."""
        return cls.from_calibration(table, score=settings.threshold, far_target=settings.far_target)

    @classmethod
    def from_calibration(cls, table: list[dict], *, score: float | None, far_target: float) -> "Threshold":
        rows = sorted(table or [], key=lambda r: r["score"])
        if score is not None:
            # FAR at a fixed score: that of the highest tabulated score not above it (conservative)
            below = [r for r in rows if r["score"] <= score]
            return cls(score=float(score), far=float(below[-1]["far"]) if below else None)
        if not rows:
            raise ValueError("no calibration table ships with this model: set IDV_THRESHOLD")
        ok = [r for r in rows if r["far"] <= far_target]
        if not ok:
            raise ValueError(f"calibration table cannot resolve FAR {far_target}; lowest is {rows[-1]['far']}")
        best = ok[0]
        return cls(score=float(best["score"]), far=float(best["far"]))
