"""The server's Prometheus metrics, in a registry of its own per app (prometheus-client writes the text).

m = Metrics(queue_depth=lambda: 3, ready=lambda: True)
m.request("/v1/answer", 200, 0.012); m.answered(answer)
m.render()   # the exposition text for GET /metrics
m.value("nestling_requests_total", endpoint="/v1/answer", status="200")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import prometheus_client as prom
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from nestling.serve.runtime import Answer

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
Gauged = Callable[[], float]
CONTENT_TYPE = prom.CONTENT_TYPE_LATEST


class Metrics:
    """Counters and histograms of one app; gauges read the queue and the model state when scraped."""

    def __init__(self, queue_depth: Gauged, ready: Callable[[], bool], running: Gauged):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "nestling_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "nestling_errors", "HTTP responses with status >= 400.", ["endpoint", "status"], registry=r
        )
        self.seconds = Histogram(
            "nestling_request_seconds", "Request latency, first byte in to last byte out.", ["endpoint"],
            buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "nestling_ttft_seconds", "Time to first generated token.", buckets=BUCKETS, registry=r
        )
        self.generation = Histogram(
            "nestling_generation_seconds", "Generation time per answer.", buckets=BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("nestling_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("nestling_completion_tokens", "Tokens generated.", registry=r)
        self.verified = Counter(
            "nestling_answers", "Answers by verification: true, false, none.", ["verified"], registry=r
        )
        self.tries = Counter("nestling_generation_tries", "Generations made, resamples included.", registry=r)
        Gauge("nestling_queue_depth", "Requests admitted (answering + waiting).", registry=r).set_function(
            queue_depth
        )
        Gauge("nestling_running", "Requests holding an engine.", registry=r).set_function(running)
        Gauge("nestling_model_ready", "1 once the model is loaded.", registry=r).set_function(
            lambda: float(ready())
        )

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.seconds.labels(endpoint).observe(seconds)

    def answered(self, a: Answer) -> None:
        self.ttft.observe(a.latency.ttft_s)
        self.generation.observe(a.latency.total_s)
        self.prompt_tokens.inc(a.latency.prompt_tokens)
        self.completion_tokens.inc(a.latency.completion_tokens)
        self.verified.labels(str(a.verified).lower()).inc()
        self.tries.inc(a.tries)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when it was never recorded)."""
        return self.registry.get_sample_value(name, labels) or 0.0
