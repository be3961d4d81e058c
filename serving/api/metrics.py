"""Prometheus metrics of one server, in its own registry (no global state: tests run many apps).

Torch-free: the load gauges read any object with the load fields of
``serving.messages.Load`` (``router.policy.LoadSnapshot`` has them too), so the ``matta
route`` proxy shares this module.

Names are prefixed ``matta_`` and carry their unit. Running/waiting gauges are read from the
engine at scrape time, so they are never stale.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
SLO_OUTCOMES = ("met", "missed", "shed", "failed")


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], Any]) -> None:
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


class _EngineCountersCollector(Collector):
    """The engine's own counters from its load view (``Backend.engine_counters``): decode forwards by
    path (compiled or eager), compiled steps loaded, where its iterations' time goes, and how far
    iterations ran past the scheduler's prediction."""

    def __init__(self, counters: Callable[[], Any]) -> None:
        self._counters = counters

    def collect(self) -> Iterable[Metric]:
        load = self._counters()
        if load is None:
            return
        steps = CounterMetricFamily("matta_decode_steps", "decode forwards by how they ran", labels=["path"])
        steps.add_metric(["compiled"], load.compiled_steps)
        steps.add_metric(["eager"], load.eager_steps)
        yield steps
        yield GaugeMetricFamily("matta_compiled_signatures_ready", "decode step signatures with a compiled graph "
                                "loaded", value=load.compile_ready)
        yield GaugeMetricFamily("matta_compiled_signatures", "decode step signatures the engine can meet "
                                "(0: compilation off)", value=load.compile_signatures)
        busy = CounterMetricFamily("matta_engine_busy_seconds", "seconds the engine's iterations spent per phase "
                                   "(prefill, decode, swap_in of compiled steps)", labels=["phase"])
        for phase, seconds in load.busy_s.items():
            busy.add_metric([phase], seconds)
        yield busy
        yield CounterMetricFamily("matta_engine_iterations", "engine iterations the scheduler predicted",
                                  value=load.iterations)
        yield CounterMetricFamily("matta_engine_iteration_overrun_seconds", "seconds iterations ran past the "
                                  "scheduler's prediction, summed", value=load.overrun_s)
        yield CounterMetricFamily("matta_engine_iteration_overruns", "iterations that took more than twice their "
                                  "prediction", value=load.overruns_2x)
        yield CounterMetricFamily("matta_engine_swap_ins_deferred", "iterations that kept a compiled step waiting "
                                  "because its pause would have made a promised deadline late",
                                  value=load.swap_ins_deferred)
        yield CounterMetricFamily("matta_engine_shed_sequences", "sequences the scheduler refused for their SLO",
                                  value=load.shed)
        changes = CounterMetricFamily("matta_width_changes", "running sequences whose width the scheduler changed "
                                      "mid-generation, by width before and after", labels=["from", "to"])
        for pair, count in load.width_changes.items():
            before, _, after = pair.partition("->")
            changes.add_metric([before, after], count)
        yield changes
        faults = CounterMetricFamily("matta_compile_cache_faults", "compile-cache artifacts refused (empty, truncated, "
                                     "garbage, version, checksum, unreadable) or not written (write); each such "
                                     "decode step ran eager", labels=["kind"])
        for kind, count in load.compile_faults.items():
            faults.add_metric([kind], count)
        yield faults
        yield GaugeMetricFamily("matta_requests_prefilling", "running sequences still prefilling their prompt in "
                                "chunks (--max-num-batched-tokens)", value=load.prefilling)
        yield CounterMetricFamily("matta_prefill_chunks", "prompt chunks run that were not a whole prompt "
                                  "(--max-num-batched-tokens)", value=load.prefill_chunks)
        yield CounterMetricFamily("matta_engine_core_restarts", "engine-core processes started again after one "
                                  "died (--on-core-death restart)", value=load.core_restarts)


class _SloCollector(Collector):
    """Effective quality per policy, computed at scrape time from running sums."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        quality = GaugeMetricFamily(
            "matta_effective_quality",
            "mean quality of answers delivered within their SLO (late, shed or failed answers score 0)",
            labels=["policy"])
        attainment = GaugeMetricFamily("matta_slo_attainment_ratio", "fraction of SLO requests answered in time",
                                       labels=["policy"])
        for policy, (delivered, met, total) in self._metrics.slo_totals().items():
            if total:
                quality.add_metric([policy], delivered / total)
                attainment.add_metric([policy], met / total)
        yield quality
        yield attainment
        corrections = self._metrics.latency_corrections()
        if corrections:
            family = GaugeMetricFamily("matta_latency_correction_ratio",
                                       "online correction of the latency profile (observed / profiled)",
                                       labels=["kind"])
            for kind, value in corrections.items():
                family.add_metric([kind], value)
            yield family


class ServingMetrics:
    """The server's metric families, all in ``self.registry``."""

    def __init__(self, stats: Callable[[], Any], registry: CollectorRegistry | None = None,
                 corrections: Callable[[], dict[str, float]] | None = None,
                 engine_counters: Callable[[], Any] | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._corrections = corrections
        self._slo_lock = threading.Lock()
        self._slo: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])  # policy -> [quality, met, total]
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
        self.decisions = Counter("matta_router_decisions", "width choices by policy, chosen width and reason",
                                 ["policy", "width", "reason"], registry=r)
        self.slo_requests = Counter("matta_slo_requests", "requests with a latency SLO by outcome "
                                    "(met, missed, shed, failed)", ["policy", "outcome"], registry=r)
        self.shed = Counter("matta_shed_requests", "requests refused because no width could meet their SLO",
                            ["policy"], registry=r)
        self.quality_delivered = Counter("matta_quality_delivered", "sum of served-width quality over answers "
                                         "delivered within their SLO", ["policy"], registry=r)
        self.prediction_ratio = Histogram("matta_router_prediction_ratio", "actual / predicted end-to-end latency",
                                          ["policy", "width"], buckets=RATIO_BUCKETS, registry=r)
        self.prediction_error = Histogram("matta_router_prediction_error_seconds",
                                          "|actual - predicted| end-to-end latency", ["policy", "width"],
                                          buckets=LATENCY_BUCKETS_S, registry=r)
        self.ab_exposures = Counter("matta_ab_exposures", "A/B exposures by experiment, arm, served width and status",
                                    ["experiment", "arm", "width", "status"], registry=r)
        self.ab_outcomes = Counter("matta_ab_outcomes", "A/B outcomes posted to /v1/feedback", ["experiment", "metric"],
                                   registry=r)
        r.register(_EngineCollector(stats))
        r.register(_SloCollector(self))
        if engine_counters is not None:
            r.register(_EngineCountersCollector(engine_counters))

    def observe_slo(self, policy: str, outcome: str, quality: float = 0.0) -> None:
        """Count one SLO request's outcome; ``quality`` is the served width's, given only when met."""
        self.slo_requests.labels(policy, outcome).inc()
        if outcome == "met":
            self.quality_delivered.labels(policy).inc(quality)
        with self._slo_lock:
            sums = self._slo[policy]
            sums[0] += quality if outcome == "met" else 0.0
            sums[1] += outcome == "met"
            sums[2] += 1

    def slo_totals(self) -> dict[str, tuple[float, int, int]]:
        """policy -> (quality delivered in time, requests met, SLO requests)."""
        with self._slo_lock:
            return {p: (q, int(m), int(t)) for p, (q, m, t) in self._slo.items()}

    def latency_corrections(self) -> dict[str, float]:
        return self._corrections() if self._corrections is not None else {}

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
