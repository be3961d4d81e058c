"""Cost models of the arrival-time policy: how long a request will take on a backend ``matta route`` relays to.

A cost model answers :meth:`predict_s` (a :class:`~router.policy.LatencyPredictor`, for the
policy at arrival), learns from each finished request (:meth:`observe_request`, called by the
front end) and reports its corrections for metrics. :class:`BackendCostModel` cannot see inside
a backend, so it learns each one's seconds per token as a function of the requests in flight.
(``matta serve``'s engine has no cost model here: its scheduler prices every decision with the
engine's own :class:`~router.latency.LatencyModel`, :mod:`serving.engine.scheduler`.)

Pure Python: no torch, no serving.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Protocol, runtime_checkable

from router.policy import LatencyPredictor, LoadSnapshot, RequestInfo


@runtime_checkable
class CostModel(LatencyPredictor, Protocol):
    """A latency predictor that also learns from finished requests."""

    def observe_request(self, width: str, request: RequestInfo, load: LoadSnapshot, elapsed_s: float,
                        predicted_s: float | None, completion_tokens: int) -> None: ...

    def corrections(self) -> dict[str, float]: ...


def _bucket(in_flight: int) -> int:
    """Concurrency buckets 1, 2, 4, 8, ... (log2), so a few observations cover a wide range."""
    return 1 << max(0, math.ceil(math.log2(max(1, in_flight))))


class BackendCostModel:
    """How long a request takes on a remote backend (``matta route``), learned online from the answers:
    latency = overhead + max_tokens * seconds_per_token(in flight).

    ``seconds_per_token`` is an EWMA per concurrency bucket; an empty bucket borrows the nearest
    observed one, scaled linearly with concurrency beyond it (a batching server slows down less
    than linearly, so this errs on the safe side). Thread-safe.
    """

    def __init__(self, widths: list[str], alpha: float = 0.2, prior_s_per_token: float = 0.0) -> None:
        self.alpha = alpha
        self._lock = threading.Lock()
        self._per_token: dict[str, dict[int, float]] = {w: {} for w in widths}
        self._overhead: dict[str, float] = dict.fromkeys(widths, 0.0)
        self.prior = prior_s_per_token

    # Without new answers a bucket's estimate relaxes towards the fastest seen, with this time
    # constant: otherwise a width judged slow in a burst would never be chosen, so never measured
    # again, and calm traffic would stay on the narrow backend for good.
    forget_s = 2.0

    def observe(self, width: str, in_flight: int, tokens: int, seconds: float) -> None:
        """One relayed answer: ``tokens`` generated in ``seconds`` with ``in_flight`` requests on the backend."""
        if tokens <= 0 or seconds <= 0:
            with self._lock:
                old = self._overhead[width]
                self._overhead[width] = seconds if old == 0 else (1 - self.alpha) * old + self.alpha * seconds
            return
        with self._lock:
            table = self._per_token[width]
            b = _bucket(in_flight)
            value = seconds / tokens
            if b in table:
                ewma, best, _ = table[b]
                table[b] = ((1 - self.alpha) * ewma + self.alpha * value, min(best, value), time.monotonic())
            else:
                table[b] = (value, value, time.monotonic())

    def seconds_per_token(self, width: str, in_flight: int) -> float:
        with self._lock:
            table = dict(self._per_token[width])
        if not table:
            return self.prior
        now = time.monotonic()
        estimates = {k: best + (ewma - best) * math.exp(-(now - at) / self.forget_s)
                     for k, (ewma, best, at) in table.items()}
        b = _bucket(in_flight)
        if b in estimates:
            return estimates[b]
        nearest = min(estimates, key=lambda k: abs(math.log2(k) - math.log2(b)))
        return estimates[nearest] * max(1.0, b / nearest)

    def predict_s(self, width: str, request: RequestInfo, load: LoadSnapshot) -> float:
        in_flight = load.running_by_width.get(width, 0) + 1
        return self._overhead[width] + max(1, request.max_tokens) * self.seconds_per_token(width, in_flight)

    def observe_request(self, width: str, request: RequestInfo, load: LoadSnapshot, elapsed_s: float,
                        predicted_s: float | None, completion_tokens: int) -> None:
        """A relayed answer: ``load`` was the proxy's in-flight count before this request joined."""
        self.observe(width, load.running_by_width.get(width, 0) + 1, completion_tokens, elapsed_s)

    def corrections(self) -> dict[str, float]:
        return {}

    def snapshot(self) -> dict:
        with self._lock:
            return {w: {str(k): v for k, v in t.items()} for w, t in self._per_token.items()}
