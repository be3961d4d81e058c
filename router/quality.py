"""Quality of each width, from the checkpoint's own held-out evaluation (``training.json``).

The router's "effective quality" (Clipper's effective accuracy) is the mean quality of the
answers delivered within their latency SLO; a late or refused answer scores 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

QUALITY_METRICS = ("cloze_acc", "inverse_ppl")


def width_quality(training: dict, widths: Sequence[str], metric: str = "cloze_acc") -> dict[str, float]:
    """``{width: quality}`` from ``training["eval"]["widths"]``.

    ``cloze_acc`` is the whole-word cloze accuracy; ``inverse_ppl`` is 1 / perplexity. Without an
    evaluation for every width the widths score their rank fraction (1/n .. 1), with a warning:
    still monotone in width, but not a measurement.
    """
    if metric not in QUALITY_METRICS:
        raise ValueError(f"unknown quality metric {metric!r}; known: {list(QUALITY_METRICS)}")
    evals = ((training or {}).get("eval") or {}).get("widths") or {}
    out = {}
    for w in widths:
        e = evals.get(w) or {}
        value = e.get("cloze_acc") if metric == "cloze_acc" else (1.0 / e["ppl"] if e.get("ppl") else None)
        if value is None:
            log.warning("no %s for width %r in training.json; using width rank as quality", metric, w)
            return {name: (i + 1) / len(widths) for i, name in enumerate(widths)}
        out[w] = float(value)
    return out


WidthSteps = list[tuple[str, int]]
"""The widths one answer was served at: (width, index of the first token generated at it), ascending."""


def format_width_steps(steps: WidthSteps) -> str:
    """``[("ta", 0), ("s", 17)]`` -> ``"ta@0,s@17"`` (the ``x-matta-widths`` header)."""
    return ",".join(f"{width}@{first}" for width, first in steps)


def parse_width_steps(text: str) -> WidthSteps:
    """``"ta@0,s@17"`` -> ``[("ta", 0), ("s", 17)]``; ValueError for anything else."""
    steps = []
    for part in text.split(","):
        width, sep, first = part.strip().rpartition("@")
        if not sep or not width or not first.isdigit():
            raise ValueError(f"not a width step (width@token): {part!r} in {text!r}")
        steps.append((width, int(first)))
    return steps


def tokens_by_width(steps: WidthSteps, tokens: int) -> dict[str, int]:
    """How many of an answer's ``tokens`` each width generated."""
    out: dict[str, int] = {}
    for (width, first), following in zip(steps, [*steps[1:], (None, tokens)], strict=True):
        count = max(0, min(tokens, following[1]) - first)
        if count:
            out[width] = out.get(width, 0) + count
    return out


def token_quality(quality: dict[str, float], width_tokens: dict[str, int]) -> float | None:
    """The mean of the widths' qualities over tokens generated at each (None: no tokens)."""
    total = sum(width_tokens.values())
    return sum(quality.get(w, 0.0) * n for w, n in width_tokens.items()) / total if total else None


def answer_quality(quality: dict[str, float], steps: WidthSteps, tokens: int) -> float:
    """The quality of an answer served at ``steps``: the mean of its widths' qualities over its
    tokens (an answer that never changed width scores its width's quality)."""
    mean = token_quality(quality, tokens_by_width(steps, tokens))
    if mean is None:
        return quality.get(steps[0][0], 0.0) if steps else 0.0
    return mean
