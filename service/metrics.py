"""Prometheus metrics, one registry per app: requests by route and outcome, request latency
per route, and /verify stage latency (decode, detect, align, embed, compare)."""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000.0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request. The route label is the matched path
    template (so /audit/{record_id}, not one series per id); unmatched paths share one label."""

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
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            outcome = state.get("outcome") or str(status["code"])
            self.metrics.requests.labels(route, method, outcome).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)
