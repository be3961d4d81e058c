"""The scheduler: the one place that decides which sequences run, at which width, and which are refused.

vLLM V1's shape (``Scheduler.schedule()`` returns what to run, the model runner runs it,
``update`` applies the result) with SuperServe's policy inside: the widest width that every
deadline allows. Pure Python and torch-free, so it is unit-tested as a function of its state
and a latency model.

Each iteration :meth:`Scheduler.schedule` decides, in this order:

1. **Refusals.** A waiting sequence whose request asked to be shed rather than served late
   (``Slo.shed``) is refused ("shed") when even its narrowest allowed width, started now, is
   predicted to miss one of its targets. The queue itself is bounded: :meth:`Scheduler.add`
   refuses a request that does not fit ("queue_full"), all prompts or none.
2. **Admission, earliest deadline first.** A waiting sequence takes a free batch slot at its
   narrowest width if no *promised* sequence (one with ``shed``: it would have been refused
   rather than served late) becomes predicted late by it, itself included. A request without
   ``shed`` is served best effort: admitted when a slot frees up, never at a promised one's cost.
3. **Width at dispatch (SlackFit).** Each admitted sequence with a choice of widths is widened
   one width at a time, earliest deadline first, while every promised deadline still holds with
   the batch's free slots taken by narrowest rows (a burst reaches the engine a few requests per
   iteration; the first ones must not take the width the rest of it needs) and the waiting
   sequences can still start in time at their narrowest.
4. **Compiled steps.** A compiled decode step waiting to be swapped in is loaded only in an
   iteration whose promised deadlines survive the pause it costs (measured, online); otherwise it
   waits. An idle engine loads everything waiting.

Predictions come from a :class:`StepLatency` (the engine's :class:`router.latency.LatencyModel`,
calibrated online on the steps that actually run, per path: compiled or eager) and the
``path_of`` callback, which says how the model runner will run a step over given row widths.
The scheduler aims inside every target by ``margin`` (the rest is for what it cannot see: the
HTTP side, the event loop, sending the answer).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from serving.messages import Load, Slo

INF = float("inf")
# Aim at 70% of every target: the rest is for time the engine cannot see (a loaded HTTP side parsing
# and answering, the event loop, the client): tests/test_overload.py's 10x burst.
DEFAULT_MARGIN = 0.7
SWAP_PATIENCE_S = 10.0  # without a latency model, how long a compiled step may wait for an idle engine
MAX_TRIES_PER_ITERATION = 64  # waiting sequences considered for admission per iteration (keeps an iteration O(batch))


class StepLatency(Protocol):
    """What the scheduler asks of the latency model."""

    def step_s(self, groups: Mapping[str, tuple[int, int]], path: str = "eager") -> float:
        """Seconds of one decode step over ``groups`` {width: (rows, context)} run on ``path``."""
        ...

    def prefill_s(self, width: str, tokens: int) -> float:
        """Seconds to prefill ``tokens`` prompt tokens at ``width``."""
        ...


class _NoLatency:
    """Without a latency model every prediction is zero: only a target already passed counts."""

    def step_s(self, groups: Mapping[str, tuple[int, int]], path: str = "eager") -> float:
        return 0.0

    def prefill_s(self, width: str, tokens: int) -> float:
        return 0.0


class QueueFullError(RuntimeError):
    """The waiting queue cannot take the request now; retry later."""


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
class SchedulerOutput:
    """What one iteration runs: the sequences admitted (with ``width`` set), the ones refused, and
    how many compiled steps to swap in before running."""

    admitted: list[SeqState] = field(default_factory=list)
    shed: list[SeqState] = field(default_factory=list)
    swap_in: int = 0
    predicted_s: float = 0.0  # the whole iteration: swap-ins, prefills and the decode step


@dataclass
class _Plan:
    """A candidate batch: the running rows plus the ones admitted this iteration."""

    rows: list[SeqState]
    prefills: list[SeqState]
    extra_s: float = 0.0  # a pause before the iteration's work (a swap-in)
    reserve: int = 0  # free slots assumed taken by narrowest rows while these run


class Scheduler:
    """Earliest-deadline-first admission, width at dispatch and every refusal (see the module doc)."""

    def __init__(self, widths: Sequence[str], ffn_size: Mapping[str, int], *, max_batch: int, max_queue: int,
                 latency: StepLatency | None = None, path_of: Callable[[Sequence[str]], str] | None = None,
                 margin: float = DEFAULT_MARGIN) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if not 0 < margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {margin}")
        self.widths = list(widths)
        self.ffn_size = dict(ffn_size)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.latency = latency if latency is not None else _NoLatency()
        self.path_of = path_of or (lambda rows: "eager")
        self.margin = margin
        self.waiting: list[SeqState] = []
        self.running: list[SeqState] = []
        self._ids = itertools.count()
        self.finished = self.cancelled = self.shed_count = 0
        self.swap_s = 0.5  # seconds a compiled step's swap-in holds the engine (measured online)
        self.swaps_deferred = 0
        self._pending_since: float | None = None  # since when a compiled step waits to be swapped in

    # --- requests ----------------------------------------------------------------------------

    def add(self, request_id: int, prompt_lens: Sequence[int], budgets: Sequence[int], widths: Sequence[str],
            slo: Slo, arrival: float) -> list[SeqState]:
        """Queue one sequence per prompt, all or none; :class:`QueueFullError` when they do not fit."""
        unknown = [w for w in widths if w not in self.ffn_size]
        if not widths or unknown:
            raise ValueError(f"unknown width(s) {unknown or list(widths)!r}; known: {self.widths}")
        if len(self.waiting) + len(prompt_lens) > self.max_queue:
            raise QueueFullError(f"the queue is full ({len(self.waiting)} waiting, limit {self.max_queue}); "
                                 "retry later")
        ordered = tuple(sorted(dict.fromkeys(widths), key=self.ffn_size.__getitem__))
        seqs = [SeqState(next(self._ids), request_id, i, n, b, ordered, slo, arrival)
                for i, (n, b) in enumerate(zip(prompt_lens, budgets, strict=True))]
        for seq in seqs:
            self._set_aims(seq)
        self.waiting += seqs
        return seqs

    def _set_aims(self, seq: SeqState) -> None:
        slo, m = seq.slo, self.margin
        if slo.e2e_deadline is not None:
            seq.aim_end = seq.arrival + m * (slo.e2e_deadline - seq.arrival)
        if slo.ttft_deadline is not None:
            seq.aim_first = seq.arrival + m * (slo.ttft_deadline - seq.arrival)
        if slo.tpot_s is not None:
            seq.aim_tpot = m * slo.tpot_s

    def remove(self, seq: SeqState, cancelled: bool = False) -> None:
        """A sequence left: finished, cancelled or aborted (idempotent)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            seq.running = False
        else:
            return
        if cancelled:
            self.cancelled += 1
        else:
            self.finished += 1

    def update(self, seq: SeqState, tokens: int, now: float) -> None:
        """``seq`` produced ``tokens`` more tokens this iteration."""
        if tokens and seq.first_token_at is None:
            seq.first_token_at = now
        seq.generated += tokens

    # --- the decision ------------------------------------------------------------------------

    def schedule(self, now: float, swaps_pending: int = 0) -> SchedulerOutput:
        """Decide this iteration (see the module doc); the admitted sequences move to ``running``."""
        out = SchedulerOutput(shed=self._shed_hopeless(now))
        free = self.max_batch - len(self.running)
        plan = _Plan(list(self.running), [])
        tried = 0
        for seq in sorted(self.waiting, key=lambda s: s.edf_key):
            if free <= 0 or tried >= MAX_TRIES_PER_ITERATION:
                break
            tried += 1
            seq.width = seq.widths[0]
            if not self._admissible(plan, seq, now):
                seq.width = None
                continue
            plan.rows.append(seq)
            plan.prefills.append(seq)
            free -= 1
        if plan.prefills:
            self._widen(plan, now, free)
        for seq in plan.prefills:
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.running, seq.admitted_at = True, now
        if self.priced:
            ends = self._ends(plan, now)
            for seq in plan.prefills:
                seq.predicted_s = ends[seq.seq_id] - seq.arrival
        out.admitted = plan.prefills
        out.swap_in = self._swaps(plan, now, swaps_pending)
        plan.extra_s = out.swap_in * self.swap_s
        out.predicted_s = self._iteration_s(plan) if self.priced else 0.0
        return out

    @property
    def priced(self) -> bool:
        """Whether decisions are priced by a latency model (else first come, first served)."""
        return not isinstance(self.latency, _NoLatency)

    def _shed_hopeless(self, now: float) -> list[SeqState]:
        """Refuse the promised waiting sequences that miss a target even started now at their narrowest.

        Each is priced alone beside the running rows (what :meth:`_late` computes for such a plan),
        with the running rows' shapes built once: this runs every iteration over the whole queue."""
        promised = [s for s in self.waiting if s.promised]
        if not promised:
            return []
        base = self.shapes(self.running)
        widths = [s.width for s in self.running]
        hopeless = []
        for seq in promised:
            width = seq.widths[0]
            shapes = dict(base)
            rows, context = shapes.get(width, (0, 0))
            shapes[width] = (rows + 1, max(context, seq.context + seq.remaining // 2))
            step = self.latency.step_s(shapes, self.path_of([*widths, width]))
            start = now + self.latency.prefill_s(width, seq.prompt_len)
            first, end = start + step, start + max(0, seq.budget - 1) * step
            tpot = (end - first) / (seq.budget - 1) if seq.budget > 1 else 0.0
            if end > seq.aim_end or first > seq.aim_first or tpot > seq.aim_tpot:
                hopeless.append(seq)
        for seq in hopeless:
            self.waiting.remove(seq)
        self.shed_count += len(hopeless)
        return hopeless

    def _admissible(self, plan: _Plan, seq: SeqState, now: float) -> bool:
        """Whether ``seq`` at its narrowest keeps every promised sequence on time (itself included;
        a best-effort sequence may itself be late)."""
        promised = {s.seq_id for s in plan.rows if s.promised} | ({seq.seq_id} if seq.promised else set())
        if not promised:
            return True
        before = self._late(plan, now, promised)
        after = self._late(_Plan([*plan.rows, seq], [*plan.prefills, seq]), now, promised)
        return not (after - before)

    def _widen(self, plan: _Plan, now: float, free: int) -> None:
        """SlackFit: widen the admitted sequences, earliest deadline first, while no promised deadline
        (nor the widened sequence's own) becomes late, with the free slots filled by narrowest rows."""
        plan.reserve = max(0, free)
        waiting = [s for s in sorted(self.waiting, key=lambda s: s.edf_key)
                   if s not in plan.prefills and s.promised][: self.max_batch]
        for seq in sorted(plan.prefills, key=lambda s: s.edf_key):
            if len(seq.widths) == 1:
                continue
            watched = {s.seq_id for s in plan.rows if s.promised} | {seq.seq_id}
            if self._late(plan, now, watched) or self._late_waiting(plan, now, waiting):
                # Some target is missed even with this row at its narrowest: the queue drains fastest
                # at the narrowest widths, so nothing is widened.
                break
            for wider in seq.widths[1:]:
                narrower, seq.width = seq.width, wider
                if self._late(plan, now, watched) or self._late_waiting(plan, now, waiting):
                    seq.width = narrower
                    break
        plan.reserve = 0

    def _swaps(self, plan: _Plan, now: float, pending: int) -> int:
        """How many compiled steps to swap in this iteration: all when idle, one when the promised
        deadlines survive the pause, else none."""
        if not pending:
            self._pending_since = None
            return 0
        if not plan.rows and not self.waiting:
            return pending
        if self._pending_since is None:
            self._pending_since = now
        if not self.priced:
            # Nothing is promised, but a pause still stalls every running row: wait for an idle
            # moment, and only past SWAP_PATIENCE_S take one anyway.
            return 1 if now - self._pending_since >= SWAP_PATIENCE_S else 0
        promised = {s.seq_id for s in plan.rows if s.promised}
        late_now = self._late(plan, now, promised)
        paused = _Plan(plan.rows, plan.prefills, extra_s=self.swap_s)
        if self._late(paused, now, promised) - late_now:
            self.swaps_deferred += 1
            return 0
        self._pending_since = None
        return 1

    def observe_swap(self, seconds: float) -> None:
        """A swap-in took ``seconds``: what the next one is expected to cost (EWMA, quick to rise)."""
        self.swap_s = max(seconds, 0.7 * self.swap_s + 0.3 * seconds)

    # --- predictions ------------------------------------------------------------------------

    def shapes(self, rows: Sequence[SeqState], reserve: int = 0, midpoint: bool = True) -> dict[str, tuple[int, int]]:
        """{width: (rows, context)} of a batch; ``midpoint`` prices each row at the middle of what it
        may still generate (the context grows as it runs); ``reserve`` more rows at the narrowest width."""
        shapes: dict[str, tuple[int, int]] = {}
        for s in rows:
            n, c = shapes.get(s.width, (0, 0))
            shapes[s.width] = (n + 1, max(c, s.context + (s.remaining // 2 if midpoint else 0)))
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

    def _prefill_s(self, plan: _Plan) -> float:
        by_width: dict[str, list[int]] = {}
        for s in plan.prefills:
            by_width.setdefault(s.width, []).append(s.prompt_len)
        # One left-padded batch per width: padded tokens are paid too.
        return sum(self.latency.prefill_s(w, len(lens) * max(lens)) for w, lens in by_width.items())

    def _iteration_s(self, plan: _Plan) -> float:
        return plan.extra_s + self._prefill_s(plan) + self._step_s(plan.rows, midpoint=False)

    def _ends(self, plan: _Plan, now: float) -> dict[int, float]:
        """Predicted time of every row's last token: this iteration's pause and prefills, then one
        decode step per token still to come, each at the batch's step time (with its reserve)."""
        start = now + plan.extra_s + self._prefill_s(plan)
        step = self._step_s(plan.rows, plan.reserve)
        ends = {}
        for s in plan.rows:
            # An admitted row's prefill makes its first token, its first decode step the second.
            steps = max(0, s.budget - 1) if s in plan.prefills else s.remaining
            ends[s.seq_id] = start + steps * step
        return ends

    def _late(self, plan: _Plan, now: float, watched: set[int]) -> set[int]:
        """The watched rows of ``plan`` predicted to miss a target (end, first token, time per token)."""
        if not watched:
            return set()
        ends = self._ends(plan, now)
        # An admitted row's first token goes out when the iteration ends: after the decode step.
        first_token = now + plan.extra_s + self._prefill_s(plan) + self._step_s(plan.rows, plan.reserve)
        late = set()
        for s in plan.rows:
            if s.seq_id not in watched:
                continue
            end = ends[s.seq_id]
            first = s.first_token_at if s.first_token_at is not None else first_token
            tpot = (end - first) / (s.budget - 1) if s.budget > 1 else 0.0
            if end > s.aim_end or first > s.aim_first or tpot > s.aim_tpot:
                late.add(s.seq_id)
        return late

    def _late_waiting(self, plan: _Plan, now: float, waiting: list[SeqState]) -> set[int]:
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
            if end > s.aim_end or first > s.aim_first:
                late.add(s.seq_id)
        return late

    # --- the load view ------------------------------------------------------------------------

    def load(self, **engine: object) -> Load:
        """The one load view the core publishes (``engine``: the model runner's and core's counters)."""
        running_by_width = dict.fromkeys(self.widths, 0)
        for s in self.running:
            running_by_width[s.width] += 1
        waiting_by_width = dict.fromkeys(self.widths, 0)
        for s in self.waiting:
            waiting_by_width[s.widths[0]] += 1
        return Load(running=len(self.running), waiting=len(self.waiting), running_by_width=running_by_width,
                    waiting_by_width=waiting_by_width, max_batch=self.max_batch, max_queue=self.max_queue,
                    finished=self.finished, cancelled=self.cancelled, shed=self.shed_count,
                    groups=self.shapes(self.running, midpoint=False),
                    remaining_tokens=sorted(s.remaining for s in self.running),
                    swap_ins_deferred=self.swaps_deferred, **engine)
