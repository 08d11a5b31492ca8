"""Prometheus metrics with one registry per app, so two apps in one process never collide."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/info", "/v1/generate", "/v1/feedback", "/admin/reload"}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmops_requests", "HTTP requests served", ["path", "method", "status"], registry=r)
        self.latency = Histogram(
            "lmops_request_latency_seconds", "HTTP request latency (until the last byte)", ["path"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens = Counter("lmops_tokens_generated", "Tokens generated", registry=r)
        self.generations = Counter("lmops_generations", "Finished generations", ["finish_reason"], registry=r)
        self.batch_rows = Histogram("lmops_decode_batch_rows", "Rows per batched decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.in_flight = Gauge("lmops_generations_in_flight", "Generations admitted and not finished", registry=r)
        self.model = Gauge("lmops_model_info", "The model version served (value 1)", ["name", "version"],
                           registry=r)
        self.feedback = Counter("lmops_feedback", "Feedback rows stored", ["rating"], registry=r)
        self.reloads = Counter("lmops_reloads", "Model reload attempts", ["result"], registry=r)

    def set_model(self, name: str, version: str) -> None:
        self.model.clear()
        self.model.labels(name=name, version=version).set(1)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI: counts every HTTP request and times it to the end of its (possibly streamed) body."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        start = time.perf_counter()
        status = {"code": 500}

        async def _send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            self.metrics.requests.labels(path=path, method=scope["method"], status=str(status["code"])).inc()
            self.metrics.latency.labels(path=path).observe(time.perf_counter() - start)
