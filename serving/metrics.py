"""Prometheus metrics of one server, in its own registry (no global state: tests run many apps).

Names are prefixed ``matta_`` and carry their unit. Running/waiting gauges are read from the
engine at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.engine import EngineStats

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        running = GaugeMetricFamily("matta_requests_running", "sequences in the running batch", labels=["width"])
        waiting = GaugeMetricFamily("matta_requests_waiting", "sequences waiting in the queue", labels=["width"])
        for width, count in stats.running_by_width.items():
            running.add_metric([width], count)
        for width, count in stats.waiting_by_width.items():
            waiting.add_metric([width], count)
        yield running
        yield waiting
        yield GaugeMetricFamily("matta_queue_capacity_requests", "waiting-queue limit", value=stats.max_queue)
        yield GaugeMetricFamily("matta_batch_capacity_requests", "running-batch limit", value=stats.max_batch)


class ServingMetrics:
    """The server's metric families, all in ``self.registry``."""

    def __init__(self, stats: Callable[[], EngineStats], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.e2e_latency = Histogram("matta_request_e2e_latency_seconds", "request arrival to last token",
                                     ["width"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.time_to_first_token = Histogram("matta_time_to_first_token_seconds", "request arrival to first token",
                                             ["width"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram("matta_inter_token_latency_seconds", "time between consecutive tokens",
                                             ["width"], buckets=TOKEN_BUCKETS_S, registry=r)
        self.queue_time = Histogram("matta_request_queue_time_seconds", "time waiting for a batch slot",
                                    ["width"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.requests = Counter("matta_requests", "completion requests by served width and HTTP status",
                                ["width", "status"], registry=r)
        self.prompt_tokens = Counter("matta_prompt_tokens", "prompt tokens processed", ["width"], registry=r)
        self.generation_tokens = Counter("matta_generation_tokens", "tokens generated", ["width"], registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
