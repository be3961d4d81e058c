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
   With more sequences waiting than free slots, and enough of them on time in a full batch to fill
   it, a promised one is admitted only if it is on time in that batch too: under load the oldest
   sequences have the least slack, and admitting them first kept the batch small while the queue
   grew. When the batch will not fill so (a burst only a small batch serves in time), admission
   stays earliest deadline first.
3. **Width at dispatch (SlackFit).** Each admitted sequence with a choice of widths is widened
   one width at a time, earliest deadline first, while every promised deadline still holds with
   the batch's free slots taken by narrowest rows (a burst reaches the engine a few requests per
   iteration; the first ones must not take the width the rest of it needs) and the waiting
   sequences can still start in time at their narrowest; and never past the **load ceiling**,
   the widest width whose full-batch capacity covers the recent arrival rate
   (:class:`router.slo.LoadCeiling`), once half the batch is taken: a width that fits the
   deadlines of a momentarily short queue is the one that makes the next arrivals miss, so
   sustained load narrows the whole batch.
4. **Width changes mid-generation** (:mod:`serving.engine.width_changes`, when the server runs
   ``--width-changes on``). Running sequences narrow, widest first and one rung at a time, when
   a promised one among them is predicted late, or when a promised waiting sequence could then
   be admitted within its targets (step 2); a hopeless one is refused only if it misses even with
   the running rows at the narrowest they may reach. With no one waiting, running sequences widen
   one rung, earliest deadline first, while every promised target holds with headroom; pinned
   and opted-out requests never change.
5. **Chunked prefill** (``token_budget`` > 0, the server's ``--max-num-batched-tokens``). An
   iteration's forwards hold at most that many tokens: one per decoding row first, then prompt
   chunks of the rows still prefilling (admitted earlier or now), earliest deadline first; a
   waiting sequence is admitted only while tokens are left for its first chunk. A prompt longer
   than what is left spans iterations, and the running rows decode in each of them instead of
   stalling for the whole prompt. Its row takes a batch slot at admission and decodes from the
   iteration after its last chunk (which makes its first token); it never changes width while it
   prefills. Pricing covers both (:mod:`serving.engine.pricing`).
6. **Compiled steps.** A compiled decode step waiting to be swapped in is loaded only in an
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
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from router.slo import LoadCeiling
from serving.engine import width_changes as changes_rule
from serving.engine.admission import MAX_TRIES_PER_ITERATION, Admission, dominated, shape_of
from serving.engine.pricing import NoLatency, Plan, SeqState, StepLatency
from serving.messages import Load, Slo

# Aim at 70% of every target: the rest is for time the engine cannot see (a loaded HTTP side parsing
# and answering, the event loop, the client): tests/test_overload.py's 10x burst.
DEFAULT_MARGIN = 0.7
SWAP_PATIENCE_S = 10.0  # without a latency model, how long a compiled step may wait for an idle engine


class QueueFullError(RuntimeError):
    """The waiting queue cannot take the request now; retry later."""


@dataclass
class SchedulerOutput:
    """What one iteration runs: the sequences admitted (with ``width`` set), the ones refused, the
    running ones whose width changes (sequence, from, to), and how many compiled steps to swap in
    before running. With chunked prefill, ``chunks`` are the prompt chunks to run after the decode
    step, in budget order (an admitted sequence's prompt runs only as its chunks); without it, each
    admitted prompt is prefilled whole before the decode step."""

    admitted: list[SeqState] = field(default_factory=list)
    chunks: list[tuple[SeqState, int, int]] = field(default_factory=list)  # chunked: (sequence, start, tokens)
    shed: list[SeqState] = field(default_factory=list)
    changes: list[tuple[SeqState, str, str]] = field(default_factory=list)
    swap_in: int = 0
    predicted_s: float = 0.0  # the whole iteration: swap-ins, prefills and the decode step


class Scheduler(Admission):
    """Earliest-deadline-first admission, width at dispatch and every refusal (see the module doc)."""

    def __init__(self, widths: Sequence[str], ffn_size: Mapping[str, int], *, max_batch: int, max_queue: int,
                 latency: StepLatency | None = None, path_of: Callable[[Sequence[str]], str] | None = None,
                 margin: float = DEFAULT_MARGIN, width_changes: bool = False, token_budget: int = 0,
                 utilization: float = 0.9) -> None:
        """``width_changes``: whether running sequences may change width (``--width-changes``);
        ``token_budget``: tokens per iteration with chunked prefill, 0 for none
        (``--max-num-batched-tokens``); ``utilization``: the load ceiling's (0 turns it off)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if not 0 < margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {margin}")
        if token_budget < 0 or 0 < token_budget < max_batch:
            # Every decoding row takes a token first: a smaller budget could leave a prefill none.
            raise ValueError(f"max_num_batched_tokens must be 0 (unchunked) or at least max_batch ({max_batch}), "
                             f"got {token_budget}")
        self.widths = list(widths)
        self.ffn_size = dict(ffn_size)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.latency = latency if latency is not None else NoLatency()
        self.path_of = path_of or (lambda rows: "eager")
        self.margin = margin
        self.width_changes = width_changes
        self.token_budget = token_budget
        self.changes_by_pair: dict[str, int] = {}  # "from->to" -> width changes made
        self.load_ceiling = LoadCeiling(len(self.widths), utilization)  # widening stops at what the arrival rate allows
        self.waiting: list[SeqState] = []
        self.running: list[SeqState] = []
        self._ids = itertools.count()
        self.finished = self.cancelled = self.shed_count = 0
        self.swap_s = 0.5  # seconds a compiled step's swap-in holds the engine (measured online)
        self.swaps_deferred = 0
        self._pending_since: float | None = None  # since when a compiled step waits to be swapped in

    # --- requests ----------------------------------------------------------------------------

    def add(self, request_id: int, prompt_lens: Sequence[int], budgets: Sequence[int], widths: Sequence[str],
            slo: Slo, arrival: float, width_changes: bool = True) -> list[SeqState]:
        """Queue one sequence per prompt, all or none; :class:`QueueFullError` when they do not fit.
        ``width_changes``: the request lets its sequences change width while they run."""
        unknown = [w for w in widths if w not in self.ffn_size]
        if not widths or unknown:
            raise ValueError(f"unknown width(s) {unknown or list(widths)!r}; known: {self.widths}")
        self.load_ceiling.arrive(arrival, len(prompt_lens))  # demand, whether or not it fits
        if len(self.waiting) + len(prompt_lens) > self.max_queue:
            raise QueueFullError(f"the queue is full ({len(self.waiting)} waiting, limit {self.max_queue}); "
                                 "retry later")
        ordered = tuple(sorted(dict.fromkeys(widths), key=self.ffn_size.__getitem__))
        seqs = [SeqState(next(self._ids), request_id, i, n, b, ordered, slo, arrival)
                for i, (n, b) in enumerate(zip(prompt_lens, budgets, strict=True))]
        for seq in seqs:
            self._set_aims(seq)
            seq.changes = width_changes and self.width_changes and len(ordered) > 1
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
        changed: changes_rule.Changes = {}
        running = [s for s in self.running if not s.prefill_left]  # a row still prefilling keeps its width
        if self.width_changes:
            # A promised running row predicted late: narrow as far as brings them all back on time
            # (else not at all: a lost deadline is not bought with quality).
            current = Plan(list(self.running), [])
            promised = {s.seq_id for s in self.running if s.promised}
            if promised and self._late(current, now, promised):
                changes_rule.narrow_until(running, self.ffn_size, lambda: not self._late(current, now, promised),
                                          changed)
        free = self.max_batch - len(self.running)
        plan = Plan(list(self.running), [])
        tried = 0
        # Shapes whose admission would make a promised row of this plan late: a later sequence of the
        # same shape would too, and so would one as wide with a prompt and a budget at least as long
        # (it costs every other row at least as much), so it is not priced until the plan changes.
        # Unchunked that is exact (a sequence's cost to the others is its shape alone); chunked, a later deadline takes
        # its chunks later and may cost some rows less, so at worst such a sequence waits one more
        # iteration. Not with width changes: a narrowing may still admit one whose own deadline is
        # later. Under load this repricing was a quarter of the engine's time (64 tries pricing the
        # same plan: 9-19 ms an iteration with 64-256 waiting, against a 2-5 ms step;
        # docs/benchmarks.md, "Scheduling cost").
        blocked: set[tuple[str, int, int]] | None = None if self.width_changes else set()
        # With more sequences waiting than free slots, and enough of them on time in a full batch to
        # fill it, a sequence is admitted only if it is on time in that batch too (see
        # :meth:`_full_reserve`), so the rows admitted under load leave room for the next ones.
        # Without this, earliest-deadline-first admitted the oldest sequences, those with the least
        # slack left, and a single row more would make them late: on the slo_router ramp the batch
        # shrank from ~28 rows to ~10 as the queue grew past 100.
        # {(shape, reserve): (end, first token, time per token)}, as ``blocked``: for this plan only.
        full: dict[tuple[tuple[str, int, int], int], tuple[float, float, float]] = {}
        reserve: int | None = None  # this plan's, when first needed
        tokens_left = self.chunk_tokens_left(plan.rows) if self.chunked else 0
        times = self._times(plan, now) if self.priced and self.waiting and free > 0 else None  # the plan's, until it changes
        by_deadline = sorted(self.waiting, key=lambda s: s.edf_key)
        for seq in by_deadline:
            if free <= 0 or tried >= MAX_TRIES_PER_ITERATION:
                break
            if self.chunked and tokens_left <= 0:
                break  # no token left for its first chunk this iteration
            if blocked and dominated(shape_of(seq), blocked):
                continue
            seq.width = seq.widths[0]
            if self.priced and seq.promised and free > 1:
                if reserve is None:
                    reserve = self._full_reserve(plan, now, free, full, by_deadline)
                if reserve > 0 and self._late_in_full(plan, seq, now, reserve, full):
                    seq.width = None
                    continue
            tried += 1
            if not self._admissible(plan, seq, now, blocked, times) and not (
                    seq.promised and self.width_changes
                    and changes_rule.narrow_until(running, self.ffn_size, lambda s=seq: self._admissible(plan, s, now),
                                                  changed)):
                seq.width = None
                continue
            plan.rows.append(seq)
            plan.prefills.append(seq)
            free -= 1
            if self.chunked:
                tokens_left = self.chunk_tokens_left(plan.rows)
            if times is not None and free > 0:
                times = self._times(plan, now)
            if blocked:
                blocked.clear()
            full.clear()
            reserve = None
        if plan.prefills:
            self._widen(plan, now, free)
        elif self.width_changes and not self.waiting:
            # Widen with headroom and the free slots taken by narrowest rows (as at dispatch).
            plan.reserve, plan.step_scale = max(0, free), 1 + changes_rule.WIDEN_HEADROOM
            promised = {s.seq_id for s in plan.rows if s.promised}
            limit = self._ceiling_ffn(plan.rows, now)
            changes_rule.widen([s for s in plan.rows if not s.prefill_left],
                               lambda s: self.ffn_size[s.width] <= limit
                               and not self._late(plan, now, promised | {s.seq_id}), changed)
            plan.reserve, plan.step_scale = 0, 1.0
        for seq in plan.prefills:
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.running, seq.admitted_at = True, now
            seq.steps, seq.widest = [(seq.width, 0)], seq.width
        out.changes = changes_rule.record(changed, self.ffn_size, self.changes_by_pair)
        if self.priced:
            ends = self._ends(plan, now)
            for seq in plan.prefills:
                seq.predicted_s = ends[seq.seq_id] - seq.arrival
        out.admitted = plan.prefills
        out.swap_in = self._swaps(plan, now, swaps_pending)
        plan.extra_s = out.swap_in * self.swap_s
        out.predicted_s = self._iteration_s(plan) if self.priced else 0.0
        # The prompt tokens run this iteration count as cached from now on (as vLLM's scheduler
        # advances num_computed_tokens): the next iteration prices and schedules what is left.
        if self.chunked:
            out.chunks = [(seq, seq.prefilled, tokens) for seq, tokens in self.chunks(plan.rows)]
            for seq, _, tokens in out.chunks:
                seq.prefilled += tokens
        else:
            for seq in plan.prefills:
                seq.prefilled = seq.prompt_len
        return out

    @property
    def priced(self) -> bool:
        """Whether decisions are priced by a latency model (else first come, first served)."""
        return not isinstance(self.latency, NoLatency)

    def _widen(self, plan: Plan, now: float, free: int) -> None:
        """SlackFit: widen the admitted sequences, earliest deadline first, while no promised deadline
        (nor the widened sequence's own) becomes late, with the free slots filled by narrowest rows."""
        plan.reserve = max(0, free)
        limit = self._ceiling_ffn(plan.prefills, now)
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
                if self.ffn_size[wider] > limit:
                    break
                narrower, seq.width = seq.width, wider
                if self._late(plan, now, watched) or self._late_waiting(plan, now, waiting):
                    seq.width = narrower
                    break
        plan.reserve = 0

    def _ceiling_ffn(self, seqs: Sequence[SeqState], now: float) -> int:
        """FFN size of the load ceiling: the widest width whose full-batch capacity, for sequences
        shaped as ``seqs``, covers the recent arrival rate (:class:`router.slo.LoadCeiling`), once
        at least half the batch is taken (running or waiting). A sequence occupies a slot for its
        budget of decode steps and pays its prefill, so a width's capacity is
        1 / (budget x step(max_batch rows) / max_batch + prefill) sequences per second."""
        if not self.priced or not seqs or len(self.running) + len(self.waiting) < self.max_batch / 2:
            # Below half a batch, arrivals take free slots as they come; and a rate estimated from a
            # handful of them is no evidence of sustained load (one request after a quiet spell reads
            # as 1 / window rows a second, which a width whose rows take minutes does not "cover").
            return max(self.ffn_size.values())
        budget = max(1, round(sum(s.budget for s in seqs) / len(seqs)))
        prompt = max(1, round(sum(s.prompt_len for s in seqs) / len(seqs)))
        capacity = []
        for width in self.widths:
            step = self.latency.step_s({width: (self.max_batch, prompt + budget // 2)},
                                       self.path_of([width] * self.max_batch))
            seconds = budget * step / self.max_batch + self.latency.prefill_s(width, prompt)
            capacity.append(1 / seconds if seconds > 0 else math.inf)
        return self.ffn_size[self.widths[self.load_ceiling.ceiling(now, capacity)]]

    def _swaps(self, plan: Plan, now: float, pending: int) -> int:
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
        paused = Plan(plan.rows, plan.prefills, extra_s=self.swap_s)
        if self._late(paused, now, promised) - late_now:
            self.swaps_deferred += 1
            return 0
        self._pending_since = None
        return 1

    def observe_swap(self, seconds: float) -> None:
        """A swap-in took ``seconds``: what the next one is expected to cost (EWMA, quick to rise)."""
        self.swap_s = max(seconds, 0.7 * self.swap_s + 0.3 * seconds)

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
                    swap_ins_deferred=self.swaps_deferred, width_changes=dict(self.changes_by_pair),
                    prefilling=sum(1 for s in self.running if s.prefill_left), **engine)
