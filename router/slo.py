"""The latency-aware policy: the widest width whose predicted latency meets the request's SLO.

Behind a backend that chooses widths itself at dispatch (``dispatch=True``: the engine of
``matta serve``, whose scheduler decides width, order and refusal, :mod:`serving.engine.scheduler`)
the policy only names the allowed widths (``min_width`` and up) and whether to shed; it keeps
no state and predicts nothing. What follows is the arrival-time policy of ``matta route``,
whose backends each serve one width and cannot be looked inside.

For each request the policy asks a :class:`~router.policy.LatencyPredictor` for the end-to-end
seconds at every allowed width (queue wait + prefill + decode of ``max_tokens``, given the
batches already running) and serves the widest one within ``latency_slo_ms``. Like SuperServe's
SlackFit it spends the slack a request has on accuracy; unlike a static width it follows load.

Hysteresis, so widths do not flap with noise in the load: per SLO class (requests with the same
target), moving *up* to a width wider than the class's current one needs the prediction to fit
within ``(1 - headroom)`` of the SLO and ``dwell_s`` since the class last changed width; moving
down happens at once. ``min_width`` is a quality floor. When no allowed width can make it, the
request is served best effort at the narrowest allowed width, or shed (``shed=True``).

A load ceiling, so sustained overload moves the whole batch narrower instead of half of it: a
per-request choice is myopic. Each scheduler iteration runs one forward per width group, so a
request at the TA slows every sequence in the batch, and the widest width that meets *this*
request's SLO while the queue is momentarily short is the one that makes the next requests miss.
Under a ramp past the TA's capacity the per-request rule alone kept choosing the TA for the
requests it admitted and shed the rest (26 req/s served at 152 req/s offered, below the TA's
own 38 req/s capacity). So the policy also estimates the arrival rate (rows per second, an
exponentially decaying count with time constant ``rate_window_s``) and caps the width at the
widest one whose full-batch throughput (from the predictor) covers it at ``utilization``; the
cap rises again only when the rate fits the wider width's capacity with ``headroom`` to spare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from router.policy import LatencyPredictor, LoadSnapshot, RequestInfo, WidthDecision


@dataclass
class _ClassState:
    level: int
    changed_at: float


class ArrivalRate:
    """Arrivals per second, an exponentially decaying count (time constant ``window_s``).

    After each arrival the estimate is ``sum(exp(-(now - t_i) / window_s)) / window_s`` over past
    arrivals: unbiased for a steady Poisson stream and following a ramp within ``window_s``.
    """

    def __init__(self, window_s: float = 2.0) -> None:
        if window_s <= 0:
            raise ValueError(f"rate window must be > 0 s, got {window_s}")
        self.window_s = window_s
        self._mass = 0.0
        self._at: float | None = None

    def rate(self, now: float) -> float:
        if self._at is None:
            return 0.0
        return self._mass * math.exp(-max(0.0, now - self._at) / self.window_s) / self.window_s

    def arrive(self, now: float, count: int = 1) -> float:
        """Record ``count`` arrivals at ``now``; returns the rate including them."""
        self._mass = self.rate(now) * self.window_s + count
        self._at = now
        return self._mass / self.window_s


class LoadCeiling:
    """The widest width whose full-batch capacity covers the arrival rate: sustained load narrows the
    whole batch, as a per-request choice alone does not (see the module doc).

    The rate is an :class:`ArrivalRate` (rows per second); the ceiling drops at once when the rate
    passes ``utilization`` of its width's capacity, and rises one width when the rate fits the wider
    width's capacity with ``headroom`` to spare. Used by :class:`SloPolicy` (``matta route``) and by
    the engine's scheduler at dispatch (:mod:`serving.engine.scheduler`).
    """

    def __init__(self, n_widths: int, utilization: float = 0.9, headroom: float = 0.2, window_s: float = 2.0) -> None:
        if not 0 <= utilization <= 1:
            raise ValueError(f"load ceiling: utilization must be in [0, 1] (0 turns it off), got {utilization}")
        if not 0 <= headroom < 1:
            raise ValueError(f"load ceiling: headroom must be in [0, 1), got {headroom}")
        self.utilization, self.headroom = utilization, headroom
        self.arrivals = ArrivalRate(window_s)
        self.top = n_widths - 1
        self.level = self.top  # index of the current ceiling, narrowest first

    def arrive(self, now: float, count: int = 1) -> float:
        """Record ``count`` arriving rows; returns the rate including them."""
        return self.arrivals.arrive(now, count)

    def ceiling(self, now: float, capacity: Sequence[float]) -> int:
        """Index of the ceiling given each width's capacity (rows per second, narrowest first)."""
        if self.utilization == 0:
            return self.top
        rate = self.arrivals.rate(now)
        level = self.level
        while level > 0 and rate > self.utilization * capacity[level]:
            level -= 1
        while level < self.top and rate <= (1 - self.headroom) * self.utilization * capacity[level + 1]:
            level += 1
        self.level = level
        return level


class SloPolicy:
    """Widest width predicted to meet the request's latency SLO, with hysteresis, floor and shedding."""

    def __init__(self, widths: Sequence[str], predictor: LatencyPredictor, *, default_slo_ms: float | None = None,
                 min_width: str | None = None, shed: bool = False, headroom: float = 0.2,
                 dwell_s: float = 1.0, utilization: float = 0.9, rate_window_s: float = 2.0,
                 dispatch: bool = False, width_changes: bool = True) -> None:
        """``width_changes``: whether the engine may change the width of this policy's requests while
        they run (an A/B arm can compare ``slo`` with and without)."""
        if not widths:
            raise ValueError("slo policy: no widths")
        if min_width is not None and min_width not in widths:
            raise ValueError(f"slo policy: unknown min_width {min_width!r}; known: {list(widths)}")
        if not 0 <= headroom < 1:
            raise ValueError(f"slo policy: headroom must be in [0, 1), got {headroom}")
        self.widths = list(widths)
        self.predictor = predictor
        self.default_slo_ms = default_slo_ms
        self.floor = self.widths.index(min_width) if min_width is not None else 0
        self.shed = shed
        self.headroom = headroom
        self.dwell_s = dwell_s
        self.utilization = utilization
        self.dispatch = dispatch
        self.width_changes = width_changes
        self.name = "slo"
        self._classes: dict[float, _ClassState] = {}
        self._load = LoadCeiling(len(self.widths), utilization, headroom, rate_window_s)
        # Only predictors that know a width's throughput (the engine's) support a ceiling; a
        # proxy's backends each serve one width in parallel, so there the load spreads instead.
        self._capacity = getattr(predictor, "capacity_rps", None) if utilization > 0 else None

    def load_ceiling(self, request: RequestInfo, load: LoadSnapshot, now: float) -> int:
        """Index of the widest width whose capacity covers the arrival rate (with hysteresis)."""
        self._load.arrive(now, max(1, request.n_prompts))
        if self._capacity is None:
            return len(self.widths) - 1
        return self._load.ceiling(now, [self._capacity(w, request, load) for w in self.widths])

    def choose(self, request: RequestInfo, load: LoadSnapshot, now: float) -> WidthDecision:
        if self.dispatch:
            # The backend's scheduler chooses among the allowed widths when the request gets its batch
            # slot, and refuses it then if none can make it: nothing to predict here, no state to keep.
            allowed = tuple(self.widths[self.floor:])
            return WidthDecision(allowed[-1], "at_dispatch", None, candidates=allowed)
        slo_ms = request.latency_slo_ms if request.latency_slo_ms is not None else self.default_slo_ms
        ceiling = max(self.floor, self.load_ceiling(request, load, now))
        allowed = range(self.floor, ceiling + 1)
        if slo_ms is None:  # no target: the widest the load allows
            widest = self.widths[ceiling]
            return WidthDecision(widest, "no_slo", self.predictor.predict_s(widest, request, load))
        budget = slo_ms / 1000.0
        key = float(f"{slo_ms:.2g}")  # SLO classes: targets equal to two significant digits
        state = self._classes.setdefault(key, _ClassState(level=len(self.widths) - 1, changed_at=float("-inf")))
        predicted = {i: self.predictor.predict_s(self.widths[i], request, load) for i in allowed}
        chosen, reason = None, "slo_met"
        for i in reversed(allowed):
            if i > state.level:  # an upgrade: needs headroom and a calm period
                if now - state.changed_at < self.dwell_s or predicted[i] > budget * (1 - self.headroom):
                    continue
            elif predicted[i] > budget:
                continue
            chosen = i
            break
        if chosen is None:
            chosen = self.floor
            if self.shed:
                return WidthDecision(self.widths[chosen], "shed", predicted[chosen], shed=True)
            else:
                reason = "best_effort"
        if chosen != state.level:
            state.level, state.changed_at = chosen, now
        return WidthDecision(self.widths[chosen], reason, predicted[chosen])

    def __repr__(self) -> str:
        return (f"SloPolicy(default_slo_ms={self.default_slo_ms}, min_width={self.widths[self.floor]!r}, "
                f"shed={self.shed}, width_changes={self.width_changes})")
