"""Prometheus metrics, one registry per app: requests by route and outcome, request latency
per route, /verify stage latency (decode, detect, align, embed, compare), the served models
(`idverify_model_info`) and the scores they gave (`idverify_score`, per family).

Every label value comes from a closed set, so no caller can add series: the method is one of
the standard HTTP methods or "other", the route the template of one of the app's routes or
"unmatched", the outcome a decision, an error code of service/errors.py, a status code, or
"other"; families are the loaded ones plus "fused"."""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute

from service import errors

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# scores are in [0, 1]; genuine and impostor pairs both sit above 0.7, thresholds near 0.88
SCORE_BUCKETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95, 0.975, 1.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
OTHER, UNMATCHED, FUSED = "other", "unmatched", "fused"
OUTCOMES = frozenset({"match", "no_match"} | {value for name, value in vars(errors).items()
                                              if name.isupper() and isinstance(value, str)}
                     | {str(code) for code in range(100, 600)})


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER


def outcome_label(outcome: str) -> str:
    return outcome if outcome in OUTCOMES else OTHER


def route_label(scope) -> str:
    """The path template of the route that matched (`/audit/{record_id}`): a route object of the
    app's, so one of a fixed set whatever the path was; "unmatched" when none did."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(route, BaseRoute) and isinstance(path, str) else UNMATCHED


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "idverify_requests", "HTTP requests by route and outcome (for /verify: match, no_match "
            "or the error code; otherwise the status code)", ["route", "method", "outcome"], registry=self.registry)
        self.latency = Histogram(
            "idverify_request_duration_seconds", "HTTP request latency by route", ["route", "method"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram(
            "idverify_stage_duration_seconds", "/verify latency per pipeline stage", ["stage"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.model_info = Gauge(
            "idverify_model_info", "The served models: 1 per tower family (and the fusion, family "
            "\"fused\") with its version and the scoring that decides", ["family", "version", "scoring"],
            registry=self.registry)
        self.scores = Histogram(
            "idverify_score", "Scores of decided /verify pairs per family (\"fused\": the fused score)",
            ["family"], buckets=SCORE_BUCKETS, registry=self.registry)
        self.families: frozenset[str] = frozenset()

    def set_models(self, models) -> None:
        """The served models' info series, and the closed set of score labels. Models that name
        no tower families (test doubles) register none."""
        pipeline = getattr(models, "pipeline", None)
        families = dict(getattr(pipeline, "families", None) or {})
        fusion = getattr(pipeline, "fusion", None)
        scoring = getattr(getattr(models, "scoring", None), "mode", None) or OTHER
        self.model_info.clear()
        for name, towers in families.items():
            self.model_info.labels(name, str(towers.manifest.get("version")), scoring).set(1)
        if fusion is not None:
            self.model_info.labels(FUSED, str(fusion.manifest.get("version")), scoring).set(1)
        self.families = frozenset(families) | ({FUSED} if fusion is not None else frozenset())

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        """Stage names are the pipeline's own (decode, detect, ..., `embed:<family>`)."""
        for stage, ms in timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000.0)

    def observe_scores(self, scores: dict | None, scoring: str | None, score: float | None) -> None:
        """A decided pair: each family's score, and the fused score when the fusion decided."""
        for family, value in (scores or {}).items():
            if value is not None and family in self.families:
                self.scores.labels(family).observe(value)
        if scoring == FUSED and score is not None and FUSED in self.families:
            self.scores.labels(FUSED).observe(score)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request, with labels from closed sets only: the route
    label is the matched path template (so /audit/{record_id}, not one series per id) or
    "unmatched", the method a standard one or "other", the outcome a known one or "other"."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route, method = route_label(scope), method_label(scope.get("method", ""))
            outcome = outcome_label(state.get("outcome") or str(status["code"]))
            self.metrics.requests.labels(route, method, outcome).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)
