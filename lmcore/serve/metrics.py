"""Prometheus metrics in vLLM's shape, with one registry per app so two apps in one process never collide.

The serving series carry vLLM's names with an ``lmops:`` prefix (``vllm:time_to_first_token_seconds``
is ``lmops:time_to_first_token_seconds``) and the labels ``model_name`` and ``model_version``:

- histograms (seconds): ``time_to_first_token``, ``time_per_output_token`` (inter-token latency),
  ``e2e_request_latency``, ``request_queue_time`` (arrival to admission into a decode slot);
- counters: ``prompt_tokens_total``, ``generation_tokens_total``, ``request_success_total{finished_reason}``,
  ``feedback_total{rating}``;
- gauges, read from the engine at scrape time: ``num_requests_running``, ``num_requests_waiting``.

The engine's decode thread reports every row through :meth:`Metrics.for_version` (one
:class:`VersionMetrics` per loaded version, so the version label follows hot swaps); a request from
any route passes through it once, so it is counted once. Routes call :meth:`Metrics.feedback_stored`.
The HTTP series (``lmops_requests_total``, ``lmops_request_latency_seconds``, ...) count requests per path.
``deploy/grafana/lmops-serving.json`` is a dashboard over these series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lmcore.serve.engine import LoadedModel

KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/info", "/v1/generate", "/v1/feedback", "/admin/reload",
               "/v1/models", "/v1/completions", "/v1/chat/completions"}
MODEL_LABELS = ("model_name", "model_version")
# vLLM's buckets, with finer low ones: a small model on a CPU answers in milliseconds
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0)

# (model, running, waiting) for each version the engine holds: Engine.loads
LoadsFn = Callable[[], Iterable[tuple["LoadedModel", int, int]]]


class VersionMetrics:
    """The series of one model version, labels bound once: what the engine's decode thread calls
    (a :class:`lmcore.serve.engine.RowObserver`; a few microseconds a call, thread-safe)."""

    def __init__(self, m: Metrics, name: str, version: str):
        lab = {"model_name": name, "model_version": version}
        self._m, self._lab = m, lab
        self._queue, self._ttft = m.queue_time.labels(**lab), m.ttft.labels(**lab)
        self._itl, self._e2e = m.itl.labels(**lab), m.e2e.labels(**lab)
        self._prompt, self._gen = m.prompt_tokens.labels(**lab), m.generation_tokens.labels(**lab)

    def admitted(self, queue_s: float, prompt_tokens: int) -> None:
        self._queue.observe(queue_s)
        self._prompt.inc(prompt_tokens)

    def token(self, first: bool, gap_s: float) -> None:
        (self._ttft if first else self._itl).observe(gap_s)
        self._gen.inc()

    def finished(self, reason: str, e2e_s: float) -> None:
        self._e2e.observe(e2e_s)
        self._m.request_success.labels(**self._lab, finished_reason=reason).inc()


class _EngineLoad(Collector):
    """``num_requests_running`` / ``num_requests_waiting`` per version, read from the engine at scrape time
    (a retired version draining its last rows shows until it is done, then disappears)."""

    def __init__(self, loads: LoadsFn):
        self.loads = loads

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running = GaugeMetricFamily("lmops:num_requests_running", "Requests decoding in a batch slot now",
                                    labels=MODEL_LABELS)
        waiting = GaugeMetricFamily("lmops:num_requests_waiting", "Requests queued for a decode slot",
                                    labels=MODEL_LABELS)
        for lm, n_run, n_wait in self.loads():
            running.add_metric([lm.name, lm.version], n_run)
            waiting.add_metric([lm.name, lm.version], n_wait)
        yield running
        yield waiting


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmops_requests", "HTTP requests served", ["path", "method", "status"], registry=r)
        self.latency = Histogram(
            "lmops_request_latency_seconds", "HTTP request latency (until the last byte)", ["path"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_rows = Histogram("lmops_decode_batch_rows", "Rows per batched decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.model = Gauge("lmops_model_info", "The model version served (value 1)", ["name", "version"],
                           registry=r)
        self.reloads = Counter("lmops_reloads", "Model reload attempts", ["result"], registry=r)
        lab = MODEL_LABELS
        self.ttft = Histogram("lmops:time_to_first_token_seconds", "Time from arrival to the first generated token",
                              lab, registry=r, buckets=TTFT_BUCKETS)
        self.itl = Histogram("lmops:time_per_output_token_seconds", "Time between two generated tokens (inter-token)",
                             lab, registry=r, buckets=ITL_BUCKETS)
        self.e2e = Histogram("lmops:e2e_request_latency_seconds", "Time from arrival to the last token", lab,
                             registry=r, buckets=E2E_BUCKETS)
        self.queue_time = Histogram("lmops:request_queue_time_seconds", "Time from arrival to a decode slot", lab,
                                    registry=r, buckets=TTFT_BUCKETS)
        self.prompt_tokens = Counter("lmops:prompt_tokens", "Prompt tokens prefilled", lab, registry=r)
        self.generation_tokens = Counter("lmops:generation_tokens", "Tokens generated", lab, registry=r)
        self.request_success = Counter("lmops:request_success", "Finished requests by why they stopped",
                                       [*lab, "finished_reason"], registry=r)
        self.feedback = Counter("lmops:feedback", "Feedback rows stored, by rating", [*lab, "rating"], registry=r)

    def for_version(self, lm: LoadedModel) -> VersionMetrics:
        """The engine's observer for one loaded version (``Engine(observe=metrics.for_version)``)."""
        return VersionMetrics(self, lm.name, lm.version)

    def watch(self, loads: LoadsFn) -> None:
        """Report the running/waiting gauges from ``loads`` (``Engine.loads``) at each scrape."""
        self.registry.register(_EngineLoad(loads))

    def feedback_stored(self, rating: int, model_name: str, model_version: str) -> None:
        self.feedback.labels(model_name=model_name, model_version=model_version, rating=str(rating)).inc()

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
