"""What the scheduler's decisions rest on: a sequence as it sees it, and how long a batch will take.

:class:`SeqState` is one sequence's scheduling state; a :class:`Plan` is a candidate batch (the
running rows and the ones it would admit). :class:`Pricing`, the part of
:class:`~serving.engine.scheduler.Scheduler` that predicts, turns a plan into the times its rows
will end and the targets they would miss, from a :class:`StepLatency` (the engine's latency model)
and the ``path_of`` callback (how the model runner will run a step over given row widths). Pure
Python and torch-free, as the scheduler is.

**Chunked prefill** (``token_budget`` > 0, ``--max-num-batched-tokens``): each iteration runs
one decode step over the rows whose prompts are done (one token each), then prefill chunks of
the rows still prefilling, earliest deadline first, within the tokens left of the budget; a row
whose last chunk ran has its first token at the iteration's end and decodes from the next one.
This iteration is priced as it will run (:meth:`Pricing.chunks`); later ones by bounds that
hold whatever the chunk sizes turn out to be (:meth:`Pricing._chunked_times`), so a promise made
on them is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from serving.messages import Slo

INF = float("inf")
# A prediction this close past its target counts as on time. Predicted ends are sums of many float
# step times: without it, rounding (1e-17 s) judged a row exactly on its deadline late, and a row
# already predicted late is not protected by admission (see Admission._admissible), so a later
# admission made it really late (by its prefill: 1-2 ms in tests/test_scheduler.py's simulation).
TOLERANCE_S = 1e-9


class StepLatency(Protocol):
    """What the scheduler asks of the latency model."""

    def step_s(self, groups: Mapping[str, tuple[int, int]], path: str = "eager") -> float:
        """Seconds of one decode step over ``groups`` {width: (rows, context)} run on ``path``."""
        ...

    def prefill_s(self, width: str, tokens: int, context: int = 0) -> float:
        """Seconds to prefill ``tokens`` prompt tokens at ``width`` after ``context`` cached ones."""
        ...


class NoLatency:
    """Without a latency model every prediction is zero: only a target already passed counts."""

    def step_s(self, groups: Mapping[str, tuple[int, int]], path: str = "eager") -> float:
        return 0.0

    def prefill_s(self, width: str, tokens: int, context: int = 0) -> float:
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
    prefilled: int = 0  # prompt tokens in its KV cache (chunked prefill: counted when a chunk is scheduled)
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
    def prefill_left(self) -> int:
        """Prompt tokens still to prefill (0: it decodes)."""
        return self.prompt_len - self.prefilled

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
    """Predictions over plans (mixed into the scheduler: it sets ``latency``, ``path_of``, ``widths``,
    ``ffn_size`` and ``token_budget``)."""

    latency: StepLatency
    path_of: Callable[[Sequence[str]], str]
    widths: list[str]
    ffn_size: dict[str, int]
    token_budget: int = 0  # tokens per iteration with chunked prefill; 0: every prompt prefilled whole at admission

    @property
    def chunked(self) -> bool:
        """Whether prompts are prefilled in chunks within ``token_budget`` (see the module doc)."""
        return self.token_budget > 0

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

    # --- prefill chunks -------------------------------------------------------------------------

    def chunks(self, rows: Sequence[SeqState]) -> list[tuple[SeqState, int]]:
        """This iteration's prefill chunks over ``rows``, (sequence, tokens) in the order they take the
        budget: each decoding row takes one token of ``token_budget``, then the rows still prefilling
        take what they have left, earliest deadline first, until it is spent (only the last one
        gets less than it has left)."""
        left = self.token_budget - sum(1 for s in rows if not s.prefill_left)
        out = []
        for s in sorted((s for s in rows if s.prefill_left), key=lambda s: s.edf_key):
            if left <= 0:
                break
            tokens = min(s.prefill_left, left)
            out.append((s, tokens))
            left -= tokens
        return out

    def chunk_tokens_left(self, rows: Sequence[SeqState]) -> int:
        """Tokens of this iteration's budget that ``rows`` leave unclaimed (a newcomer's first chunk)."""
        return self.token_budget - sum(max(1, s.prefill_left) for s in rows)

    def chunks_s(self, chunks: Sequence[tuple[SeqState, int]]) -> float:
        """Seconds of prefill ``chunks`` (sequence, tokens), as the model runner runs them: whole
        prompts in one left-padded batch per width (padding paid too), every other chunk alone,
        attending to the prompt tokens its sequence has cached."""
        whole: dict[str, list[int]] = {}
        seconds = 0.0
        for s, tokens in chunks:
            if s.prefilled == 0 and tokens == s.prompt_len:
                whole.setdefault(s.width, []).append(tokens)
            else:
                seconds += self.latency.prefill_s(s.width, tokens, s.prefilled)
        return seconds + sum(self.latency.prefill_s(w, len(lens) * max(lens)) for w, lens in whole.items())

    def _prefill_s(self, plan: Plan) -> float:
        """Seconds of the admitted rows' prefills, each prompt whole (unchunked)."""
        return self.chunks_s([(s, s.prompt_len) for s in plan.prefills])

    def chunk_floor(self, slots: int, unfinished: int) -> int:
        """Tokens an iteration surely gives to prefill chunks while ``unfinished`` of ``slots`` rows
        are still prefilling: every other row may be decoding, one token each."""
        return max(1, self.token_budget - (slots - unfinished))

    def _later_chunks_s(self, seq: SeqState, done: int, left: int, floor: int) -> float:
        """A bound on the seconds of ``seq``'s chunks for its last ``left`` prompt tokens after ``done``,
        in iterations that give prefills at least ``floor`` tokens: at most ceil(left / floor) + 1
        chunks (each pays the forward's fixed cost), whose tokens attend on average to at most
        done + left / 2 cached ones."""
        if left <= 0:
            return 0.0
        extra_chunks = math.ceil(left / floor)
        return (self.latency.prefill_s(seq.width, left, done + (left + 1) // 2)
                + extra_chunks * self.latency.prefill_s(seq.width, 0))

    # --- times ----------------------------------------------------------------------------------

    def _iteration_s(self, plan: Plan) -> float:
        if self.chunked:
            decoding = [s for s in plan.rows if not s.prefill_left]
            return plan.extra_s + self.chunks_s(self.chunks(plan.rows)) + self._step_s(decoding, midpoint=False)
        return plan.extra_s + self._prefill_s(plan) + self._step_s(plan.rows, midpoint=False)

    def _times(self, plan: Plan, now: float) -> dict[int, tuple[float, float]]:
        """Predicted time of every row's first and last token (the first as it happened, for a row
        that has it)."""
        return self._chunked_times(plan, now) if self.chunked else self._whole_times(plan, now)

    def _whole_times(self, plan: Plan, now: float) -> dict[int, tuple[float, float]]:
        """Unchunked: this iteration's pause and prefills, then one decode step per token still to
        come, each at the batch's step time (with its reserve)."""
        start = now + plan.extra_s + self._prefill_s(plan)
        step = self._step_s(plan.rows, plan.reserve) * plan.step_scale
        times = {}
        for s in plan.rows:
            # An admitted row's prefill makes its first token, its first decode step the second; even
            # a one-token row's answer goes out only when the iteration (its decode step) ends.
            steps = max(1, s.budget - 1) if s in plan.prefills else s.remaining
            first = s.first_token_at if s.first_token_at is not None else start + step
            times[s.seq_id] = (first, start + steps * step)
        return times

    def _chunked_times(self, plan: Plan, now: float) -> dict[int, tuple[float, float]]:
        """Chunked: every iteration is a decode step (at most the whole batch's, with its reserve; a
        row still prefilling is not in it) plus chunks. This iteration's chunks are priced as they
        will run; after it, row j of the prefilling rows in deadline order (the order chunks take
        the budget) has its first token once the rows up to it have prefilled, in at most
        ceil(tokens left up to j / the chunk floor) more iterations whose chunks are those rows'
        (bounded by :meth:`_later_chunks_s`) and, in its last one, at most one iteration's worth of
        the rows after it. Only the rows after j prefill after j's first token; a decoding row pays
        at most one iteration's chunks per iteration it still runs, each attending to at most what
        is cached by then."""
        start = now + plan.extra_s
        step = self._step_s(plan.rows, plan.reserve) * plan.step_scale
        now_chunks = self.chunks(plan.rows)
        first_iteration = self.chunks_s(now_chunks)
        given = {s.seq_id: tokens for s, tokens in now_chunks}
        prefilling = sorted((s for s in plan.rows if s.prefill_left), key=lambda s: s.edf_key)
        slots = len(plan.rows) + plan.reserve
        left = [s.prefill_left - given.get(s.seq_id, 0) for s in prefilling]
        later = [self._later_chunks_s(s, s.prefilled + given.get(s.seq_id, 0), n,
                                      self.chunk_floor(slots, len(prefilling) - j))
                 for j, (s, n) in enumerate(zip(prefilling, left, strict=True))]
        unfinished = [s for s, n in zip(prefilling, left, strict=True) if n]
        per_iteration = 0.0  # the most one later iteration's chunks may cost
        if unfinished:
            context = max(s.prompt_len for s in unfinished)
            per_iteration = (max(self.latency.prefill_s(s.width, self.token_budget, context) for s in unfinished)
                             + (len(unfinished) - 1) * max(self.latency.prefill_s(s.width, 0) for s in unfinished))
        total_later = sum(later)
        # A decoding row pays the chunks of each iteration it still runs. Iteration k after this one
        # gives at most token_budget tokens, attending to at most (most cached now) + (k-1) budgets:
        # the bound grows with the prompts as they fill, not at the longest prompt's end from the start.
        cached = max((s.prefilled + given.get(s.seq_id, 0) for s in unfinished), default=0)
        per_chunk, per_cached = self._chunk_cost_line(unfinished, self.token_budget,
                                                      max((s.prompt_len for s in unfinished), default=0))
        times = {}
        ahead_tokens, ahead_s = 0, 0.0
        decoding = [s for s in plan.rows if not s.prefill_left]
        for j, s in enumerate(prefilling):
            ahead_tokens += left[j]
            ahead_s += later[j]
            after_s = total_later - ahead_s
            # Until its first token a row is not decoded: the iterations before it decode the rows
            # decoding now and those ahead of it in the chunks' order (they finish their prompts first).
            step_before = self._step_s([*decoding, *prefilling[:j]], plan.reserve) * plan.step_scale
            if ahead_tokens == 0:  # its last chunk runs this iteration
                first = start + step_before + first_iteration
            else:
                iterations = 1 + math.ceil(ahead_tokens / self.chunk_floor(slots, len(prefilling) - j))
                first = start + iterations * step_before + first_iteration + ahead_s + min(after_s, per_iteration)
            times[s.seq_id] = (first, first + max(0, s.budget - 1) * step + after_s)
        for s in plan.rows:
            if not s.prefill_left:
                iterations = max(0, s.remaining - 1)
                contexts = _capped_sum(cached, self.token_budget, max((u.prompt_len for u in unfinished), default=0),
                                       iterations)
                chunks_s = first_iteration + min(total_later, iterations * per_chunk + per_cached * contexts)
                times[s.seq_id] = (s.first_token_at, start + s.remaining * step + chunks_s)
        return times

    def _chunk_cost_line(self, unfinished: Sequence[SeqState], tokens: int, longest: int) -> tuple[float, float]:
        """(seconds, seconds per cached token) bounding one iteration's chunks of ``unfinished`` rows:
        ``tokens`` tokens in all, attending to at most ``longest`` cached ones (the slowest of their
        widths, and the fixed cost of one forward per row that gets a chunk). Chunk costs are affine
        in the context, so the line bounds them at every context up to ``longest``."""
        if not unfinished:
            return 0.0, 0.0
        fixed = (max(self.latency.prefill_s(s.width, tokens) for s in unfinished)
                 + (len(unfinished) - 1) * max(self.latency.prefill_s(s.width, 0) for s in unfinished))
        if longest <= 0:
            return fixed, 0.0
        slope = max((self.latency.prefill_s(s.width, tokens, longest) - self.latency.prefill_s(s.width, tokens))
                    / longest for s in unfinished)
        return fixed, max(0.0, slope)

    def _ends(self, plan: Plan, now: float) -> dict[int, float]:
        """Predicted time of every row's last token."""
        return {seq_id: end for seq_id, (_, end) in self._times(plan, now).items()}

    def _late(self, plan: Plan, now: float, watched: set[int]) -> set[int]:
        """The watched rows of ``plan`` predicted to miss a target (end, first token, time per token)."""
        if not watched:
            return set()
        return self._late_in(plan.rows, self._times(plan, now), watched)

    @staticmethod
    def _late_in(rows: Sequence[SeqState], times: Mapping[int, tuple[float, float]], watched: set[int]) -> set[int]:
        """The watched ``rows`` that miss a target at their predicted ``times`` (see :meth:`_times`)."""
        late = set()
        for s in rows:
            if s.seq_id not in watched:
                continue
            first, end = times[s.seq_id]
            if misses(s, end, first, per_token_s(s, first, end)):
                late.add(s.seq_id)
        return late

    def _late_waiting(self, plan: Plan, now: float, waiting: list[SeqState]) -> set[int]:
        """Waiting promised sequences that could no longer start in time: each takes the slot of the
        next row of ``plan`` to end, then runs at its narrowest in a batch like this one (chunked: its
        prompt over as many iterations as the chunk floor takes)."""
        if not waiting:
            return set()
        ends = sorted(self._ends(plan, now).values())
        step = self._step_s(plan.rows, plan.reserve)
        floor = self.chunk_floor(len(plan.rows) + plan.reserve, 1)
        late = set()
        for start, s in zip(ends, waiting, strict=False):
            first = start + self.latency.prefill_s(s.widths[0], s.prompt_len)
            if self.chunked:
                first += math.ceil(s.prompt_len / floor) * step
            end = first + max(0, s.budget - 1) * step
            if misses(s, end, first):
                late.add(s.seq_id)
        return late


def per_token_s(seq: SeqState, first: float, end: float) -> float:
    """Seconds per output token after the first, for a sequence whose first token comes at ``first``
    and its last at ``end`` (0 for a one-token budget)."""
    return (end - first) / (seq.budget - 1) if seq.budget > 1 else 0.0


def misses(seq: SeqState, end: float, first: float, tpot: float = 0.0) -> bool:
    """Whether a sequence whose last token comes at ``end``, its first at ``first``, ``tpot`` apart,
    misses one of its targets (by more than :data:`TOLERANCE_S`)."""
    return (end > seq.aim_end + TOLERANCE_S or first > seq.aim_first + TOLERANCE_S
            or tpot > seq.aim_tpot + TOLERANCE_S)


def _capped_sum(first: int, step: int, cap: int, count: int) -> int:
    """sum(min(cap, first + k * step) for k in range(count)), in O(1)."""
    if count <= 0:
        return 0
    if first >= cap:
        return cap * count
    below = min(count, -(-(cap - first) // step))  # the terms still under the cap
    return below * first + step * below * (below - 1) // 2 + (count - below) * cap
