"""`VerifyAttempt`: one /verify call, collected stage by stage. The JSON answer and the audit
record are both built from it, so they cannot disagree about what was seen."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from service.api.verify_input import VerifyInput
from service.errors import ApiError
from service.face.decide import Decision, Threshold
from service.face.pipeline import Side
from service.face.policy import RULE_SCORE

FIELDS = ("id_photo", "live_photo")
INTERNAL = "internal_error"


@dataclass
class VerifyAttempt:
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.perf_counter)
    key_id: int | None = None
    input: VerifyInput | None = None
    sides: dict[str, Side | None] = field(default_factory=lambda: dict.fromkeys(FIELDS))
    timings: dict[str, float] = field(default_factory=dict)   # "<photo>.<stage>" or "compare" -> ms
    score: float | None = None
    decision: str | None = None          # match | no_match (None: rejected)
    threshold: Threshold | None = None   # the one the score was held against (a fallback's, say)
    scores: dict | None = None           # family -> its score of the pair (None: it had none)
    scoring: str | None = None           # what scored: a family, "fused" or "fallback:<family>"
    rule: str | None = None              # the policy rule that decided (service/face/policy.py)
    error: ApiError | None = None
    latency_ms: float | None = None
    live_seen_before: bool | None = None  # the live photo was decided on within the replay window (service/api/guards.py)

    # --- stages -----------------------------------------------------------------------------

    def received(self, inp: VerifyInput) -> None:
        """The body is read: each photo is hashed here, once, analysed or not."""
        self.input = inp
        self.sides = {f: Side.of(f, getattr(inp, f)) for f in FIELDS}

    def decided(self, decision: Decision, compare_ms: float) -> None:
        self.score, self.decision, self.threshold = float(decision.score), decision.decision, decision.threshold
        self.scores = {f: None if s is None else float(s) for f, s in decision.scores.items()}
        self.scoring, self.rule = decision.scoring, RULE_SCORE
        self.timings["compare"] = compare_ms

    def failed(self, error: ApiError) -> None:
        self.error, self.score, self.decision = error, None, None
        self.threshold, self.scores, self.scoring = None, None, None
        self.rule = getattr(error, "rule", None)   # a policy refusal names its rule; input errors none

    def side_timings(self, field: str, timings: dict[str, float]) -> None:
        """One photo's stage times, kept as "<field>.<stage>" (the photos are analysed at once,
        so only each photo's own stages add up within the request's total)."""
        self.timings.update({f"{field}.{stage}": ms for stage, ms in timings.items()})

    def stage_totals(self) -> dict[str, float]:
        """Stage -> ms summed over both photos (the metrics' per-stage work)."""
        out: dict[str, float] = {}
        for key, ms in self.timings.items():
            stage = key.split(".", 1)[1] if key.startswith(FIELDS) else key
            out[stage] = out.get(stage, 0.0) + ms
        return out

    def finished(self) -> None:
        """Everything up to the audit write is done: the latency the record keeps."""
        self.latency_ms = (time.perf_counter() - self.started) * 1000.0

    # --- what leaves ------------------------------------------------------------------------

    def audit_columns(self, models) -> dict:
        """The audit record's columns (audit.append sets seq, time and the hashes). `models`:
        the loaded models, or None when they are not (yet) loaded."""
        from service.records import audit

        columns: dict = {}
        for f, side in self.sides.items():
            columns.update(audit.side_columns(f, side))
        threshold = self.threshold or (models.threshold if models is not None else None)
        columns.update(
            id=self.request_id, key_id=self.key_id,
            device_id=self.input.device_id if self.input else None,
            reference=self.input.reference if self.input else None,
            liveness=self.input.liveness.to_record() if self.input and self.input.liveness else None,
            rule=self.rule,
            decision=self.decision or "rejected", score=self.score, scores=self.scores, scoring=self.scoring,
            threshold=threshold.score if threshold else None, far_target=threshold.far if threshold else None,
            model_version=models.model_version if models is not None else None,
            error_code=self.error.code if self.error else None, error_field=self.error.field if self.error else None,
            latency_ms=round(self.latency_ms, 3),
            timings_ms={k: round(v, 3) for k, v in self.timings.items()} or None,
            live_seen_before=self.live_seen_before,
        )
        return columns

    def answer(self, models) -> tuple[int, dict, dict[str, str]]:
        """(status, JSON body, headers) of the answer."""
        headers = {"X-Request-ID": self.request_id}
        if self.error is not None:
            headers.update(self.error.headers)
            return self.error.status, self.error.to_dict(), headers
        timings = {**self.timings, "total": (time.perf_counter() - self.started) * 1000.0}
        body = {
            "request_id": self.request_id,
            "decision": self.decision,
            "score": self.score,
            "threshold": self.threshold.score,
            "far_target": self.threshold.far,
            "scores": self.scores,
            "scoring": self.scoring,
            "rule": self.rule,
            "model_version": models.model_version,
            "faces": {f: side.to_public() for f, side in self.sides.items()},
            "timings_ms": {stage: round(ms, 2) for stage, ms in timings.items()},
            "live_photo_seen_before": self.live_seen_before,
        }
        return 200, body, headers

    @property
    def outcome(self) -> str:
        return self.error.code if self.error else self.decision
