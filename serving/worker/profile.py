"""Measure the engine's step times on this machine and fit a :class:`~router.latency.LatencyModel`.

``matta profile CKPT`` times, for every width, decode steps over a grid of batch sizes and
context lengths, prefills over a grid of prompt sizes and prefill chunks after cached context,
using the same forward calls the engine makes (left-padded batches, KV cache, chunks written in
place, greedy pick of the next token), then fits the
linear models of :mod:`router.latency` by least squares on *relative* error (a 1 ms step
mispredicted by 1 ms matters as much as a 100 ms step mispredicted by 100 ms). The profile
records the fit's error on the measured points and on held-out points between them.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from matta.kv_cache import StaticKVCache
from matta.model import NestedGPT
from router.latency import LatencyModel, WidthCost

DEFAULT_BATCHES = (1, 4, 16, 32)
DEFAULT_CONTEXTS = (16, 64, 160)
DEFAULT_PREFILL = ((1, 16), (1, 64), (4, 32), (8, 64), (1, 160))  # (batch, prompt length)
# Chunks of a longer prompt (tokens, context cached before them), as chunked prefill runs them:
# they fit the prefill's per token x context coefficient.
DEFAULT_PREFILL_CHUNKS = ((64, 64), (64, 160), (32, 192))
HELD_OUT_DECODE = ((2, 32), (8, 100), (24, 48))  # (batch, context) not in the grid
# Mixed-width decode steps (batch, context): half narrowest and half widest rows, and every width
# in turn. The median of measured/predicted over the first is the profile's mixed_factor; the
# held-out ones report its error.
MIXED_DECODE = ((8, 64), (32, 64), (32, 160))
HELD_OUT_MIXED = ((16, 100), (24, 48))


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()  # warm-up: allocator, thread pool, first-call paths
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _decode_case(model: NestedGPT, width: str, batch: int, context: int, generator: torch.Generator):
    return decode_step_case(model, {"width": width}, batch, context, generator)


def _mixed_case(model: NestedGPT, row_widths: list[str], context: int, generator: torch.Generator):
    """One decode step over rows of several widths, rows widest first as the engine keeps them."""
    size = {w: sum(model.config.resolve_width(w)) for w in row_widths}
    rows = sorted(row_widths, key=lambda w: -size[w])
    return decode_step_case(model, {"row_widths": rows}, len(rows), context, generator)


def decode_step_case(model: NestedGPT, widths: dict, batch: int, context: int, generator: torch.Generator):
    """The engine's decode step for ``batch`` rows at ``context`` tokens, as a function to time:
    ``step(m=model)`` runs it on ``m`` (the same model, or a compiled wrapper of it) and returns the
    logits. ``widths`` is the forward's width argument (``{"width": w}`` for every row, or
    ``{"row_widths": [...]}`` one per row)."""
    vocab = model.config.vocab_size
    device = _device(model)
    ids = torch.randint(0, vocab, (batch, context - 1), generator=generator).to(device)
    mask = torch.ones(batch, context - 1, dtype=torch.long, device=device)
    cache = StaticKVCache.from_list(model(ids, attention_mask=mask, use_cache=True, **widths).past_key_values,
                                    capacity=context)
    step_ids = torch.randint(0, vocab, (batch, 1), generator=generator).to(device)

    def step(m=model) -> torch.Tensor:
        # What the model runner's decode does: the step is written into the preallocated cache at
        # each row's length (no mask: rows carry their lengths), the next token is picked. Rewind
        # so every run is alike.
        cache.rewind(context - 1)
        out = m(step_ids, past_key_values=cache, use_cache=True, **widths)
        out.logits[:, -1].float().argmax(dim=-1).tolist()
        return out.logits

    return step


def _mixes(widths: Sequence[str], batch: int) -> list[list[str]]:
    """Row widths of the mixed cases: half narrowest/half widest, and every width in turn."""
    half = [widths[-1]] * (batch // 2) + [widths[0]] * (batch - batch // 2)
    every = [widths[i % len(widths)] for i in range(batch)]
    return [half] if len(widths) == 2 else [half, every]


def _prefill_case(model: NestedGPT, width: str, batch: int, length: int, generator: torch.Generator):
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(_device(model))
    mask = torch.ones(batch, length, dtype=torch.long, device=_device(model))

    def step():
        out = model(ids, width=width, attention_mask=mask, use_cache=True)
        out.logits[:, -1].float().argmax(dim=-1).tolist()

    return step


def _chunk_case(model: NestedGPT, width: str, tokens: int, context: int, generator: torch.Generator):
    """A prefill chunk of ``tokens`` after ``context`` cached tokens of the same row, written in place
    into a one-row cache as the model runner's chunked prefill does."""
    config = model.config
    weight = model.wte.weight
    ids = torch.randint(0, config.vocab_size, (1, context + tokens), generator=generator).to(weight.device)
    cache = StaticKVCache.zeros(config.n_layer, config.kv_heads, config.head_dim, 1, context + tokens,
                                dtype=weight.dtype, device=weight.device)
    cache.set_batch_size(1)
    model(ids[:, :context], width=width, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def step():
        cache.rewind(context)
        out = model(ids[:, context:], width=width, past_key_values=cache, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].float().argmax(dim=-1).tolist()

    return step


def _fit_relative(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Least squares minimising sum(((X @ c) - y) / y)^2, coefficients clipped at 0 (costs are not negative)."""
    weights = 1.0 / seconds
    coef, *_ = np.linalg.lstsq(features * weights[:, None], np.ones_like(seconds), rcond=None)
    return np.clip(coef, 0.0, None)


def _relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    return [abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]


@torch.inference_mode()
def profile_model(model: NestedGPT, *, batches: Sequence[int] = DEFAULT_BATCHES,
                  contexts: Sequence[int] = DEFAULT_CONTEXTS, prefill: Sequence[tuple[int, int]] = DEFAULT_PREFILL,
                  chunks: Sequence[tuple[int, int]] = DEFAULT_PREFILL_CHUNKS, repeats: int = 5,
                  widths: Sequence[str] | None = None, seed: int = 0) -> LatencyModel:
    """Measure and fit every width of ``model``; the returned model's ``meta`` holds the samples and errors."""
    model.eval()
    n_ctx = model.config.n_ctx
    contexts = [c for c in contexts if 2 <= c <= n_ctx]
    prefill = [(b, p) for b, p in prefill if 1 <= p <= n_ctx]
    chunks = [(t, c) for t, c in chunks if t >= 1 and c >= 1 and t + c <= n_ctx]
    held_out = [(b, c) for b, c in HELD_OUT_DECODE if c <= n_ctx]
    generator = torch.Generator().manual_seed(seed)
    costs, samples, errors = {}, {}, {}
    for width in widths or model.config.served_widths:
        decode = [(b, c, median_time(_decode_case(model, width, b, c, generator), repeats))
                  for b in batches for c in contexts]
        # (tokens, context, seconds): whole prompts (batch x length tokens, no context), then chunks.
        pre = [(b * p, 0, median_time(_prefill_case(model, width, b, p, generator), repeats)) for b, p in prefill]
        pre += [(t, c, median_time(_chunk_case(model, width, t, c, generator), repeats)) for t, c in chunks]
        d = _fit_relative(np.array([[1.0, b, b * c] for b, c, _ in decode]), np.array([t for *_, t in decode]))
        f = _fit_relative(np.array([[1.0, t, t * c] for t, c, _ in pre]), np.array([s for *_, s in pre]))
        cost = WidthCost(decode_base=float(d[0]), decode_per_row=float(d[1]), decode_per_row_token=float(d[2]),
                         prefill_base=float(f[0]), prefill_per_token=float(f[1]),
                         prefill_per_token_context=float(f[2]))
        costs[width] = cost
        held = [(b, c, median_time(_decode_case(model, width, b, c, generator), repeats)) for b, c in held_out]
        fit_err = _relative_errors([cost.decode_s(b, c) for b, c, _ in decode], [t for *_, t in decode])
        fit_err += _relative_errors([cost.prefill_s(t, c) for t, c, _ in pre], [s for *_, s in pre])
        held_err = _relative_errors([cost.decode_s(b, c) for b, c, _ in held], [t for *_, t in held])
        errors[width] = {"fit_median": statistics.median(fit_err), "fit_max": max(fit_err),
                         "held_out_median": statistics.median(held_err) if held_err else None,
                         "held_out_max": max(held_err) if held_err else None}
        samples[width] = {"decode": [list(x) for x in decode], "prefill": [list(x) for x in pre],
                          "held_out_decode": [list(x) for x in held]}
    latency = LatencyModel(costs)
    uniform = [w for w in model.config.width_names if w in costs]
    if len(uniform) > 1:
        def ratios(cases):
            out = []
            for b, c in cases:
                for rows in _mixes(uniform, b):
                    measured = median_time(_mixed_case(model, rows, c, generator), repeats)
                    groups = {w: (rows.count(w), c) for w in set(rows)}
                    out.append((b, c, measured, measured / latency.step_s(groups)))
            return out

        fitted_cases = [(b, c) for b, c in MIXED_DECODE if c <= n_ctx] or [(max(batches), max(contexts))]
        fitted, held = ratios(fitted_cases), ratios([(b, c) for b, c in HELD_OUT_MIXED if c <= n_ctx])
        latency.mixed_factor = factor = statistics.median(r for *_, r in fitted)
        fit_err = [abs(r / factor - 1) for *_, r in fitted]
        held_err = [abs(r / factor - 1) for *_, r in held]
        errors["mixed_steps"] = {"factor": factor, "fit_median": statistics.median(fit_err),
                                 "held_out_median": statistics.median(held_err) if held_err else None,
                                 "held_out_max": max(held_err, default=None)}
        samples["mixed_steps"] = {"decode": [list(x) for x in fitted], "held_out_decode": [list(x) for x in held]}
    latency.meta = {"device": str(_device(model)), "torch_threads": torch.get_num_threads(),
                    "torch": str(torch.__version__), "machine": platform.machine(),
                    "processor": platform.processor(), "model": model.config.name, "created_unix": time.time(),
                    "relative_error": errors, "samples": samples}
    return latency


def _device(model: NestedGPT) -> torch.device:
    return next(model.parameters()).device
