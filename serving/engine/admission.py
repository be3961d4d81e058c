"""Admission and refusal: which waiting sequences the scheduler may admit, and which it refuses.

Mixed into :class:`serving.engine.scheduler.Scheduler` (as :class:`serving.engine.pricing.Pricing`
is): these checks price candidate plans and compare them with the sequences' targets. The order in
which they are applied, and why, is in the scheduler's module doc.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from serving.engine import width_changes as changes_rule
from serving.engine.pricing import TOLERANCE_S, Plan, Pricing, SeqState, misses, per_token_s

MAX_TRIES_PER_ITERATION = 64  # waiting sequences considered for admission per iteration (keeps an iteration O(batch))


class Admission(Pricing):
    """The refusal check, the admission check and the full-batch check (the scheduler sets
    ``waiting``, ``running``, ``max_batch``, ``width_changes`` and ``shed_count``)."""

    waiting: list[SeqState]
    running: list[SeqState]
    max_batch: int
    width_changes: bool
    shed_count: int

    def _shed_hopeless(self, now: float) -> list[SeqState]:
        """Refuse the promised waiting sequences that miss a target even started now at their narrowest.

        Each is priced alone beside the running rows (what :meth:`_late` computes for such a plan),
        with the running rows' shapes built once: this runs every iteration over the whole queue.
        Chunked, its prompt is priced first in line: one forward, over as many iterations as the
        budget left by the decoding rows takes, each with their decode step."""
        promised = [s for s in self.waiting if s.promised]
        if not promised:
            return []
        # Running rows that may narrow are priced at the narrowest they may reach: the scheduler would
        # narrow them before letting a promise go.
        floor = (lambda s: changes_rule.floor_width(s, self.ffn_size)) if self.width_changes else None
        base = self.shapes(self.running, width_of=floor)
        widths = [floor(s) if floor else s.width for s in self.running]
        decoding = [s for s in self.running if not s.prefill_left]
        decode_step = 0.0
        if self.chunked and decoding:
            decode_step = self.latency.step_s(self.shapes(decoding, width_of=floor),
                                              self.path_of([floor(s) if floor else s.width for s in decoding]))
        hopeless = []
        # A waiting sequence's prediction depends on its shape alone: priced once per shape, not once
        # per sequence (24 us each: 6 ms an iteration with 256 waiting, more than a batch's step).
        times: dict[tuple[str, int, int], tuple[float, float, float]] = {}
        for seq in promised:
            shape = shape_of(seq)
            if shape not in times:
                width = seq.widths[0]
                shapes = dict(base)
                rows, context = shapes.get(width, (0, 0))
                shapes[width] = (rows + 1, max(context, seq.context + seq.remaining // 2))
                step = self.latency.step_s(shapes, self.path_of([*widths, width]))
                start = now + self.latency.prefill_s(width, seq.prompt_len)
                if self.chunked:  # its first token at the end of its last chunk's iteration, then a token a step
                    iterations = math.ceil(seq.prompt_len / max(1, self.token_budget - len(decoding)))
                    first = start + iterations * decode_step
                    end = first + max(0, seq.budget - 1) * step
                else:
                    first, end = start + step, start + max(0, seq.budget - 1) * step
                times[shape] = first, end, per_token_s(seq, first, end)
            if misses(seq, times[shape][1], times[shape][0], times[shape][2]):
                hopeless.append(seq)
        for seq in hopeless:
            self.waiting.remove(seq)
        self.shed_count += len(hopeless)
        return hopeless

    def _admissible(self, plan: Plan, seq: SeqState, now: float, blocked: set | None = None,
                    old: Mapping[int, tuple[float, float]] | None = None) -> bool:
        """Whether ``seq`` at its narrowest keeps every promised sequence on time (itself included;
        a best-effort sequence may itself be late). When it would make another row late, its shape
        goes into ``blocked`` (see :meth:`schedule`); ``old``: ``plan``'s times, when known."""
        promised = {s.seq_id for s in plan.rows if s.promised} | ({seq.seq_id} if seq.promised else set())
        if not promised:
            return True
        old = old if old is not None else self._times(plan, now)
        with_seq = Plan([*plan.rows, seq], [*plan.prefills, seq])
        new = self._times(with_seq, now)
        before = self._late_in(plan.rows, old, promised)
        made_late = self._late_in(with_seq.rows, new, promised) - before
        if made_late:
            if blocked is not None and made_late - {seq.seq_id}:
                blocked.add(shape_of(seq))
            return False
        if not before:
            return True
        # A promised row already predicted late (the engine ran slower than priced since it was
        # admitted) is not made later still: without this, a burst's later admissions piled onto
        # rows they no longer counted, and every answer of the burst came late.
        if all(new[i][0] <= old[i][0] + TOLERANCE_S and new[i][1] <= old[i][1] + TOLERANCE_S for i in before):
            return True
        if blocked is not None:
            blocked.add(shape_of(seq))
        return False

    def _full_reserve(self, plan: Plan, now: float, free: int, full: dict, by_deadline: list[SeqState]) -> int:
        """How many of the free slots (besides one newcomer's) the queue will fill with sequences on
        time in that batch: the most ``r`` < ``free`` such that at least r + 1 waiting promised
        sequences are on time with r more rows beside them. 0 when the batch will not fill, as in a
        burst that only a small batch can serve in time: then admission is earliest deadline first.
        ``by_deadline``: the waiting sequences, earliest deadline first."""
        # Latest deadline first (the likeliest to be on time), and at most MAX_TRIES_PER_ITERATION of
        # them: a queue of many shapes would otherwise cost a prediction per shape per admission.
        admitted = {s.seq_id for s in plan.prefills}
        waiting = [s for s in reversed(by_deadline) if s.promised and s.seq_id not in admitted]
        waiting = waiting[:MAX_TRIES_PER_ITERATION]
        reserve = min(free - 1, len(waiting) - 1)
        while reserve > 0:
            on_time = 0
            for s in waiting:
                on_time += not self._late_in_full(plan, s, now, reserve, full)
                if on_time > reserve:
                    return reserve
            reserve = on_time - 1  # fewer fill it: fewer rows beside each, so maybe more are on time
        return max(0, reserve)

    def _late_in_full(self, plan: Plan, seq: SeqState, now: float, reserve: int, full: dict) -> bool:
        """Whether ``seq``, admitted now at its narrowest, misses a target of its own once ``reserve``
        more narrowest rows join ``plan``; priced once per shape and reserve (in ``full``)."""
        key = shape_of(seq), reserve
        if key not in full:
            width, seq.width = seq.width, seq.widths[0]
            first, end = self._times(Plan([*plan.rows, seq], [*plan.prefills, seq], reserve=reserve), now)[seq.seq_id]
            seq.width = width
            full[key] = end, first, per_token_s(seq, first, end)
        return misses(seq, *full[key])


def shape_of(seq: SeqState) -> tuple[str, int, int]:
    """What a waiting sequence's predictions depend on besides its targets: its narrowest width,
    prompt and token budget."""
    return seq.widths[0], seq.prompt_len, seq.budget


def dominated(shape: tuple[str, int, int], blocked: set[tuple[str, int, int]]) -> bool:
    """Whether a sequence of ``shape`` costs the other rows at least what one of the ``blocked``
    shapes does: the same narrowest width, and a prompt and a token budget at least as long."""
    width, prompt, budget = shape
    return any(w == width and prompt >= p and budget >= b for w, p, b in blocked)

