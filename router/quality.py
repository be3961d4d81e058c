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
