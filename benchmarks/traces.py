"""Replay of public LLM inference traces, scaled to this machine: arrival times and token counts.

Formats (the loader takes a local path; :func:`load` tells them apart by extension and header):
- ``azure``: the Azure LLM inference trace (2023/2024), CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``,
  timestamps like ``2023-11-16 18:15:46.6805900``;
- ``burstgpt``: BurstGPT's CSV ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``,
  timestamps in seconds; rows with 0 response tokens (failed requests) are skipped;
- ``mooncake``: Mooncake's JSON lines ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``.

Small files in each format ship in ``benchmarks/trace_samples/`` (made for the tests, not
excerpts of the real traces). :func:`scale` maps a trace onto a small server: timestamps times
``time_scale`` (0.1 replays 10x faster), token counts times ``length_scale``, clamped to the
context; :func:`requests` turns it into :class:`benchmarks.client.Request` s whose prompts are
windows of the built-in English text of the right length.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from benchmarks.client import Request

SAMPLES = Path(__file__).resolve().parent / "trace_samples"
FORMATS = ("azure", "burstgpt", "mooncake")


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace: when (s after the trace's first) and how long its prompt and answer."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def detect_format(path: Path) -> str:
    """``mooncake`` for JSON lines; ``azure`` or ``burstgpt`` from a CSV's header."""
    if path.suffix in (".jsonl", ".json"):
        return "mooncake"
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if "ContextTokens" in header:
        return "azure"
    if "Request tokens" in header:
        return "burstgpt"
    raise ValueError(f"{path}: unknown trace format (header {header!r}); known: {list(FORMATS)}")


def load(path: Path, fmt: str | None = None) -> list[TraceRecord]:
    """A trace file's requests in arrival order, times relative to the first."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; known: {list(FORMATS)}")
    rows = {"azure": _azure, "burstgpt": _burstgpt, "mooncake": _mooncake}[fmt](path)
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [TraceRecord(t - t0, prompt, output) for t, prompt, output in rows]


def _azure(path: Path) -> list[tuple[float, int, int]]:
    with open(path, newline="") as f:
        return [(datetime.fromisoformat(row["TIMESTAMP"].strip()).timestamp(), int(row["ContextTokens"]),
                 int(row["GeneratedTokens"])) for row in csv.DictReader(f)]


def _burstgpt(path: Path) -> list[tuple[float, int, int]]:
    with open(path, newline="") as f:
        return [(float(row["Timestamp"]), int(row["Request tokens"]), int(row["Response tokens"]))
                for row in csv.DictReader(f) if int(row["Response tokens"]) > 0]


def _mooncake(path: Path) -> list[tuple[float, int, int]]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.append((row["timestamp"] / 1000, int(row["input_length"]), int(row["output_length"])))
    return out


def scale(records: list[TraceRecord], time_scale: float = 1.0, length_scale: float = 1.0,
          max_prompt_tokens: int = 128, max_output_tokens: int = 64, duration_s: float | None = None) -> list[TraceRecord]:
    """Timestamps times ``time_scale``, token counts times ``length_scale`` clamped to
    [1, max]; with ``duration_s``, only the requests arriving before it (after scaling)."""
    if time_scale <= 0 or length_scale <= 0:
        raise ValueError(f"scales must be > 0, got time_scale={time_scale}, length_scale={length_scale}")
    out = []
    for r in records:
        t = r.arrival_s * time_scale
        if duration_s is not None and t >= duration_s:
            break
        out.append(TraceRecord(t, min(max_prompt_tokens, max(1, round(r.prompt_tokens * length_scale))),
                               min(max_output_tokens, max(1, round(r.output_tokens * length_scale)))))
    return out


def text_tokens(tokenizer) -> list[int]:
    """The built-in English text (``benchmarks.harness.TEXT``) as the tokenizer's token ids."""
    from benchmarks.harness import TEXT

    return tokenizer.encode(" ".join(TEXT.split()))


def prompt_of_length(tokens: list[int], length: int, index: int) -> list[int]:
    """A ``length``-token window of ``tokens`` (wrapping around), a different start per ``index``."""
    if not tokens:
        raise ValueError("no tokens to cut prompts from")
    start = (index * 97) % len(tokens)
    return [tokens[(start + k) % len(tokens)] for k in range(length)]


def requests(records: list[TraceRecord], tokens: list[int], model: str, extra: dict | None = None) -> list[Request]:
    """One open-loop request per trace record: a prompt of its length, ``max_tokens`` its output length."""
    return [Request(prompt_of_length(tokens, r.prompt_tokens, i), r.output_tokens, r.arrival_s, model, dict(extra or {}))
            for i, r in enumerate(records)]
