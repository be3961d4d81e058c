"""Cost models: how long a request will take, the one question the width policy and the engine ask.

A cost model answers :meth:`predict_s` (a :class:`~router.policy.LatencyPredictor`, for the
policy at arrival), learns from each finished request (:meth:`observe_request`, called by the
front end) and reports its corrections for metrics. Two implementations, one per backend kind:

- :class:`EngineCostModel` for the engine ``matta serve`` runs: a measured :class:`LatencyModel`
  (profile + online corrections the engine feeds), queue wait from the running batch, and the
  same :meth:`~EngineCostModel.service_s` the engine uses to shed a waiting request late;
- :class:`BackendCostModel` for ``matta route``: it cannot see inside a backend, so it learns
  each one's seconds per token as a function of the requests in flight on it.

Pure Python: no torch, no serving.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from router.latency import LatencyModel, RequestCalibration
from router.policy import LatencyPredictor, LoadSnapshot, RequestInfo


@runtime_checkable
class CostModel(LatencyPredictor, Protocol):
    """A latency predictor that also learns from finished requests."""

    def observe_request(self, width: str, request: RequestInfo, load: LoadSnapshot, elapsed_s: float,
                        predicted_s: float | None, completion_tokens: int) -> None: ...

    def corrections(self) -> dict[str, float]: ...


class EngineCostModel:
    """How long a request takes on the engine, from a :class:`LatencyModel`: the one answer for the
    width policy (:meth:`predict_s`, at arrival) and the engine's queue shedding (:meth:`service_s`).

    The engine runs one scheduler iteration after another; each runs one decode step per width
    group. A request admitted at width ``w`` therefore waits for a slot (the k-th running
    sequence to finish, k = the slots it needs beyond the free ones), is prefilled, then takes
    ``max_tokens - 1`` iterations of the batch it joins (its own group one row bigger).
    """

    def __init__(self, model: LatencyModel, calibration: RequestCalibration | None = None) -> None:
        self.model = model
        self.calibration = calibration

    def predict_s(self, width: str, request: RequestInfo, load: LoadSnapshot) -> float:
        m = self.model
        rows = max(1, request.n_prompts)
        prompt = max(1, request.prompt_tokens // rows)
        # Sequences admitted since the engine last published its groups count with this
        # request's prompt length and token budget (the engine publishes once per iteration).
        groups = dict(load.groups)
        for w, n in load.running_by_width.items():
            rows_known = groups.get(w, (0, 0))[0]
            if n > rows_known:
                groups[w] = (n, max(groups.get(w, (0, 0))[1], prompt))
        remaining = sorted(load.remaining_tokens)
        remaining += [request.max_tokens] * max(0, load.running - len(remaining))
        remaining.sort()
        # While this request waits, the batch is full: the running groups plus waiting rows.
        draining = dict(groups)
        room = max(0, load.max_batch - sum(b for b, _ in draining.values()))
        for w, n in load.waiting_by_width.items():
            take = min(n, room)
            if take:
                b, c = draining.get(w, (0, prompt))
                draining[w] = (b + take, max(c, prompt))
                room -= take
        iteration_now = m.iteration_s(draining)
        need = load.waiting + rows - (load.max_batch - load.running)  # > 0 exactly when queued()
        wait = 0.0
        if need > 0:
            if need <= len(remaining):
                wait = remaining[need - 1] * iteration_now
            else:
                # Every running sequence must finish, then whole batches of the waiting ones.
                mean = sum(remaining) / len(remaining) if remaining else request.max_tokens
                last = remaining[-1] if remaining else 0
                wait = iteration_now * (last + mean * (need - len(remaining)) / max(1, load.max_batch))
        # Waiting sequences admitted before or with this one join their widths' groups.
        admitted_ahead = min(load.waiting, max(0, load.max_batch - load.running - rows))
        for w, n in load.waiting_by_width.items():
            if n and admitted_ahead:
                b, c = groups.get(w, (0, prompt))
                take = min(n, admitted_ahead)
                groups[w] = (b + take, max(c, prompt))
                admitted_ahead -= take
        total = wait + self.service_s(width, rows, prompt, request.max_tokens, groups)
        return total * self.calibration_factor(request, load)

    def service_s(self, width: str, rows: int, prompt_tokens: int, max_tokens: int,
                  groups: Mapping[str, tuple[int, int]], recent_iteration_s: float = 0.0) -> float:
        """Seconds from starting ``rows`` sequences of ``prompt_tokens`` at ``width`` now, beside the
        running ``groups`` {width: (rows, cache length)}, to their last token: the prefill, then
        ``max_tokens - 1`` iterations of the batch they join, each at least ``recent_iteration_s``
        (what the engine measured lately: contention and width mix that the profile misses)."""
        m = self.model
        groups = dict(groups)
        batch, context = groups.get(width, (0, 0))
        groups[width] = (batch + rows, max(context, prompt_tokens) + max_tokens // 2)
        per_token = max(m.iteration_s(groups), recent_iteration_s)
        return m.prefill_s(width, rows * prompt_tokens) + max(0, max_tokens - 1) * per_token

    def calibration_factor(self, request: RequestInfo, load: LoadSnapshot) -> float:
        """The request-level calibration factor a prediction for ``request`` under ``load`` includes."""
        return self.calibration.factor(queued(request, load)) if self.calibration is not None else 1.0

    def observe_request(self, width: str, request: RequestInfo, load: LoadSnapshot, elapsed_s: float,
                        predicted_s: float | None, completion_tokens: int) -> None:
        """A request predicted under ``load`` finished in ``elapsed_s``: feed the request calibration
        (the factor the prediction included is divided out: the feedback is on the raw model)."""
        if self.calibration is not None and predicted_s:
            factor = self.calibration_factor(request, load)
            self.calibration.observe(elapsed_s, predicted_s / factor, queued(request, load))

    def corrections(self) -> dict[str, float]:
        """Current correction factors of the latency model and the calibration, for metrics."""
        out = self.model.corrections()
        if self.calibration is not None:
            out.update({"request:calm": self.calibration.factor(False), "request:queued": self.calibration.factor(True)})
        return out

    def capacity_rps(self, width: str, request: RequestInfo, load: LoadSnapshot) -> float:
        """Requests like this one per second that a full batch of ``width`` sustains.

        A full batch turns over every ``max_tokens - 1`` iterations; each request also needs
        its prefill, which runs between iterations.
        """
        m = self.model
        rows = max(1, request.n_prompts)
        prompt = max(1, request.prompt_tokens // rows)
        batch = max(1, load.max_batch)
        iteration = m.iteration_s({width: (batch, prompt + request.max_tokens // 2)})
        per_row_s = max(0, request.max_tokens - 1) * iteration / batch + m.prefill_s(width, prompt)
        return 1.0 / (rows * per_row_s) if per_row_s > 0 else math.inf


def queued(request: RequestInfo, load: LoadSnapshot) -> bool:
    """Whether the request will wait for a batch slot (more sequences than free slots)."""
    return load.waiting + max(1, request.n_prompts) > load.max_batch - load.running


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
