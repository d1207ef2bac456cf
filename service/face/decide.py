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


@dataclass(frozen=True)
class Decision:
    """What decided a pair: the score, the threshold it was held against, the decision, which
    scoring produced it (a family's name, "fused", or "fallback:<family>") and every family's score."""
    score: float
    threshold: Threshold
    decision: str
    scoring: str
    scores: dict


@dataclass(frozen=True)
class Scoring:
    """The served scoring: one family's score against its threshold, or the fusion's.

    Fallback rule (fused only): when one family has no score for the pair (its alignment would
    not take the face, or its embedding was not finite), the other family's score decides
    against that family's own calibrated threshold at the same FAR (`fallback`), and the
    decision says `scoring = "fallback:<family>"`. With no family score at all there is no
    decision (ValueError; the pipeline has refused such a face before)."""
    mode: str                      # a family name, or "fused"
    threshold: Threshold           # of the served score
    fuse: object = None            # fused mode: (scores, id embeddings, live embeddings) -> fused score (Fusion.score_pair)
    fallback: dict | None = None   # fused mode: family -> its own Threshold

    def decide(self, scores: dict, id_embeddings: dict | None = None, live_embeddings: dict | None = None) -> Decision:
        """`scores`: family -> its score of the pair; the embeddings (family -> vector) are what a
        fusion with s-norm needs beside them."""
        have = {f: s for f, s in scores.items() if s is not None}
        if self.mode != "fused":
            score = have[self.mode]
            return Decision(score, self.threshold, self.threshold.decide(score), self.mode, scores)
        if len(have) == len(scores):
            score = float(self.fuse(scores, id_embeddings, live_embeddings))
            return Decision(score, self.threshold, self.threshold.decide(score), "fused", scores)
        if not have:
            raise ValueError("no family scored the pair")
        family = next(f for f in scores if f in have)   # deterministic: the first (primary) that scored
        threshold = self.fallback[family]
        return Decision(have[family], threshold, threshold.decide(have[family]), f"fallback:{family}", scores)
