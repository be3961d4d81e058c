"""What the scheduler's decisions rest on: a sequence as it sees it, and how long a batch will take.

:class:`SeqState` is one sequence's scheduling state; a :class:`Plan` is a candidate batch (the
running rows and the ones it would admit). :class:`Pricing`, the part of
:class:`~serving.engine.scheduler.Scheduler` that predicts, turns a plan into the times its rows
will end and the targets they would miss, from a :class:`StepLatency` (the engine's latency model)
and the ``path_of`` callback (how the model runner will run a step over given row widths). Pure
Python and torch-free, as the scheduler is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from serving.messages import Slo

INF = float("inf")
# A prediction this close past its target counts as on time. Predicted ends are sums of many float
# step times: without it, rounding (1e-17 s) judged a row exactly on its deadline late, and a row
# already predicted late is not protected by admission (see Scheduler._admissible), so a later
# admission made it really late (by its prefill: 1-2 ms in tests/test_scheduler.py's simulation).
TOLERANCE_S = 1e-9


class StepLatency(Protocol):
    """What the scheduler asks of the latency model."""

    def step_s(self, groups: Mapping[str, tuple[int, int]], path: str = "eager") -> float:
        """Seconds of one decode step over ``groups`` {width: (rows, context)} run on ``path``."""
        ...

    def prefill_s(self, width: str, tokens: int) -> float:
        """Seconds to prefill ``tokens`` prompt tokens at ``width``."""
        ...


class NoLatency:
    """Without a latency model every prediction is zero: only a target already passed counts."""

    def step_s(self, groups: Mapping[str, tuple[int, int]], path: str = "eager") -> float:
        return 0.0

    def prefill_s(self, width: str, tokens: int) -> float:
        return 0.0


@dataclass(eq=False)
class SeqState:
    """One sequence as the scheduler sees it (token ids and sampling live in the model runner)."""

    seq_id: int
    request_id: int
    index: int
    prompt_len: int
    budget: int  # tokens it may generate: max_tokens within the context window
    widths: tuple[str, ...]  # narrowest first; one width: pinned
    slo: Slo
    arrival: float
    width: str | None = None  # chosen at admission
    generated: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    predicted_s: float | None = None  # arrival -> last token, predicted at admission
    running: bool = False
    changes: bool = False  # may change width while it runs (not pinned, nor opted out, and the server allows it)
    steps: list[tuple[str, int]] = field(default_factory=list)  # (width, first token generated at it)
    changed_at: int = 0  # tokens generated when its width last changed
    widest: str | None = None  # the widest width it ran at (its cache was built mostly there)
    # What the scheduler aims at (the targets less the margin), set by Scheduler.add.
    aim_end: float = INF
    aim_first: float = INF
    aim_tpot: float = INF

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.generated)

    @property
    def context(self) -> int:
        return self.prompt_len + self.generated

    @property
    def has_targets(self) -> bool:
        return self.aim_end < INF or self.aim_first < INF or self.aim_tpot < INF

    @property
    def promised(self) -> bool:
        """Refused rather than served late: its targets bind every decision."""
        return self.slo.shed and self.has_targets

    @property
    def edf_key(self) -> tuple[float, int]:
        return min(self.aim_end, self.aim_first), self.seq_id


@dataclass
class Plan:
    """A candidate batch: the running rows plus the ones admitted this iteration."""

    rows: list[SeqState]
    prefills: list[SeqState]
    extra_s: float = 0.0  # a pause before the iteration's work (a swap-in)
    reserve: int = 0  # free slots assumed taken by narrowest rows while these run
    step_scale: float = 1.0  # steps priced this much slower (the headroom a widening must leave)


class Pricing:
    """Predictions over plans (mixed into the scheduler: it sets ``latency``, ``path_of``, ``widths``
    and ``ffn_size``)."""

    latency: StepLatency
    path_of: Callable[[Sequence[str]], str]
    widths: list[str]
    ffn_size: dict[str, int]

    def shapes(self, rows: Sequence[SeqState], reserve: int = 0, midpoint: bool = True,
               width_of: Callable[[SeqState], str] | None = None) -> dict[str, tuple[int, int]]:
        """{width: (rows, context)} of a batch; ``midpoint`` prices each row at the middle of what it
        may still generate (the context grows as it runs); ``reserve`` more rows at the narrowest width;
        ``width_of`` prices each row at another width than its own."""
        shapes: dict[str, tuple[int, int]] = {}
        for s in rows:
            width = width_of(s) if width_of else s.width
            n, c = shapes.get(width, (0, 0))
            shapes[width] = (n + 1, max(c, s.context + (s.remaining // 2 if midpoint else 0)))
        if reserve:
            narrowest = self.widths[0]
            n, c = shapes.get(narrowest, (0, 0))
            shapes[narrowest] = (n + reserve, max(c, 1))
        return shapes

    def _step_s(self, rows: Sequence[SeqState], reserve: int = 0, midpoint: bool = True) -> float:
        if not rows:
            return 0.0
        path = self.path_of([s.width for s in rows])
        return self.latency.step_s(self.shapes(rows, reserve, midpoint), path)

    def _prefill_s(self, plan: Plan) -> float:
        by_width: dict[str, list[int]] = {}
        for s in plan.prefills:
            by_width.setdefault(s.width, []).append(s.prompt_len)
        # One left-padded batch per width: padded tokens are paid too.
        return sum(self.latency.prefill_s(w, len(lens) * max(lens)) for w, lens in by_width.items())

    def _iteration_s(self, plan: Plan) -> float:
        return plan.extra_s + self._prefill_s(plan) + self._step_s(plan.rows, midpoint=False)

    def _ends(self, plan: Plan, now: float) -> dict[int, float]:
        """Predicted time of every row's last token: this iteration's pause and prefills, then one
        decode step per token still to come, each at the batch's step time (with its reserve)."""
        start = now + plan.extra_s + self._prefill_s(plan)
        step = self._step_s(plan.rows, plan.reserve) * plan.step_scale
        ends = {}
        for s in plan.rows:
            # An admitted row's prefill makes its first token, its first decode step the second; even
            # a one-token row's answer goes out only when the iteration (its decode step) ends.
            steps = max(1, s.budget - 1) if s in plan.prefills else s.remaining
            ends[s.seq_id] = start + steps * step
        return ends

    def _late(self, plan: Plan, now: float, watched: set[int]) -> set[int]:
        """The watched rows of ``plan`` predicted to miss a target (end, first token, time per token)."""
        if not watched:
            return set()
        ends = self._ends(plan, now)
        # An admitted row's first token goes out when the iteration ends: after the decode step.
        first_token = now + plan.extra_s + self._prefill_s(plan) + self._step_s(plan.rows, plan.reserve) * plan.step_scale
        late = set()
        for s in plan.rows:
            if s.seq_id not in watched:
                continue
            end = ends[s.seq_id]
            first = s.first_token_at if s.first_token_at is not None else first_token
            tpot = (end - first) / (s.budget - 1) if s.budget > 1 else 0.0
            if misses(s, end, first, tpot):
                late.add(s.seq_id)
        return late

    def _late_waiting(self, plan: Plan, now: float, waiting: list[SeqState]) -> set[int]:
        """Waiting promised sequences that could no longer start in time: each takes the slot of the
        next row of ``plan`` to end, then runs at its narrowest in a batch like this one."""
        if not waiting:
            return set()
        ends = sorted(self._ends(plan, now).values())
        step = self._step_s(plan.rows, plan.reserve)
        late = set()
        for start, s in zip(ends, waiting, strict=False):
            first = start + self.latency.prefill_s(s.widths[0], s.prompt_len)
            end = first + max(0, s.budget - 1) * step
            if misses(s, end, first):
                late.add(s.seq_id)
        return late


def misses(seq: SeqState, end: float, first: float, tpot: float = 0.0) -> bool:
    """Whether a sequence whose last token comes at ``end``, its first at ``first``, ``tpot`` apart,
    misses one of its targets (by more than :data:`TOLERANCE_S`)."""
    return (end > seq.aim_end + TOLERANCE_S or first > seq.aim_first + TOLERANCE_S
            or tpot > seq.aim_tpot + TOLERANCE_S)
