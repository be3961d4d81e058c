"""Width changes mid-generation: the rules by which the scheduler narrows and widens running sequences.

Only the FFN is nested: attention, embeddings and norms are shared, so the KV cache a sequence
built at one width has exactly the shape every other width reads, and a running sequence can
continue at another width with no recompute. :class:`~serving.engine.scheduler.Scheduler` decides
when (a promised deadline at risk, a waiting request it could then admit within its SLO, slack
to widen again); this module says which changes are allowed and applies them tentatively:

- **One rung at a time, never too far below the cache.** A change moves to the next narrower or
  wider of the request's widths. A sequence never narrows below ``MIN_KEPT_FFN`` of the FFN units
  of the widest width it ran at: on the shipped GPT-2 checkpoint, continuing at ``s`` (32 units)
  on a cache built at ``ta`` (1024) scored 8% worse than ``s`` alone, while every change that
  keeps 1/8 of the units cost 3% or less (docs/width_changes.md, benchmarks/width_switch.py).
- **Hysteresis.** A sequence widens only ``DWELL_TOKENS`` tokens after its last change, and only
  when every promised deadline still holds with ``WIDEN_HEADROOM`` more step time than predicted;
  it narrows whenever a deadline needs it. Widths follow load, not noise.
- **Opt-outs.** A pinned request (one width), a request with ``"width_changes": false`` and a
  server not started with ``--width-changes on`` never change (``SeqState.changes`` is False).

Pure Python and torch-free, as the scheduler is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

MIN_KEPT_FFN = 1 / 8  # narrowest a sequence goes: this share of the FFN units of the widest width it ran at
DWELL_TOKENS = 16  # tokens a sequence keeps a width before it may widen again
WIDEN_HEADROOM = 0.25  # widening must hold every promised target with steps this much slower than predicted


class SeqState(Protocol):
    """What these rules read and write of a running sequence (:class:`serving.engine.scheduler.SeqState`)."""

    seq_id: int
    widths: tuple[str, ...]  # narrowest first
    width: str | None
    widest: str | None
    changes: bool
    generated: int
    changed_at: int
    steps: list[tuple[str, int]]

    @property
    def edf_key(self) -> tuple[float, int]: ...


def narrower(seq: SeqState, ffn_size: Mapping[str, int]) -> str | None:
    """The width ``seq`` may narrow to now (one rung down), or None."""
    if not seq.changes or seq.width is None:
        return None
    rung = seq.widths.index(seq.width)
    if rung == 0:
        return None
    width = seq.widths[rung - 1]
    return width if ffn_size[width] >= MIN_KEPT_FFN * ffn_size[seq.widest or seq.width] else None


def floor_width(seq: SeqState, ffn_size: Mapping[str, int]) -> str:
    """The narrowest width ``seq`` could reach by narrowing, rung after rung (its width if none)."""
    if not seq.changes or seq.width is None:
        return seq.width
    least = MIN_KEPT_FFN * ffn_size[seq.widest or seq.width]
    rung = seq.widths.index(seq.width)
    while rung > 0 and ffn_size[seq.widths[rung - 1]] >= least:
        rung -= 1
    return seq.widths[rung]


def wider(seq: SeqState) -> str | None:
    """The width ``seq`` may widen to now (one rung up, after its dwell), or None."""
    if not seq.changes or seq.width is None or seq.generated - seq.changed_at < DWELL_TOKENS:
        return None
    rung = seq.widths.index(seq.width)
    return seq.widths[rung + 1] if rung + 1 < len(seq.widths) else None


Changes = dict[int, tuple[SeqState, str]]
"""The sequences whose width changed this iteration: seq_id -> (sequence, its width before)."""


def narrow_until(rows: Iterable[SeqState], ffn_size: Mapping[str, int], good: Callable[[], bool],
                 changes: Changes) -> bool:
    """Narrow the widest of ``rows`` one rung at a time until ``good()``: keep the narrowings (in
    ``changes``) and return True, or undo them all and return False when no rung is left."""
    rows = list(rows)
    trial: Changes = {}
    while True:
        movable = [(seq, width) for seq in rows if (width := narrower(seq, ffn_size)) is not None]
        if not movable:
            for seq, before in trial.values():
                seq.width = before
            return False
        widest = max(ffn_size[seq.width] for seq, _ in movable)
        for seq, width in movable:
            if ffn_size[seq.width] == widest:
                trial.setdefault(seq.seq_id, (seq, seq.width))
                seq.width = width
        if good():
            for seq_id, entry in trial.items():
                changes.setdefault(seq_id, entry)
            return True


def widen(rows: Iterable[SeqState], holds: Callable[[SeqState], bool], changes: Changes) -> None:
    """Widen each of ``rows`` that may (:func:`wider`) one rung, earliest deadline first, keeping the
    widening only if ``holds(seq)`` with it."""
    for seq in sorted(rows, key=lambda s: s.edf_key):
        width = wider(seq)
        if width is None or seq.seq_id in changes:
            continue
        before, seq.width = seq.width, width
        if holds(seq):
            changes[seq.seq_id] = (seq, before)
        else:
            seq.width = before


def record(changes: Changes, ffn_size: Mapping[str, int], counts: dict[str, int]) -> list[tuple[SeqState, str, str]]:
    """Write this iteration's changes into their sequences' width steps and ``counts`` ("from->to");
    returns them as (sequence, from, to) for the model runner."""
    out = []
    for seq, before in changes.values():
        if seq.width == before:
            continue
        out.append((seq, before, seq.width))
        seq.steps.append((seq.width, seq.generated))
        seq.changed_at = seq.generated
        if ffn_size[seq.width] > ffn_size[seq.widest]:
            seq.widest = seq.width
        pair = f"{before}->{seq.width}"
        counts[pair] = counts.get(pair, 0) + 1
    return out
