"""Held-out perplexity and whole-word cloze accuracy, per width."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from matta.config import WidthSpec
from matta.model import NestedDecoder
from matta.tokenizer import Tokenizer
from training.data import ClozeItem

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps input ids (B, T) to logits (B, T, V): a width of a NestedDecoder, or a HF teacher."""


def width_logits_fn(model: NestedDecoder, width: WidthSpec | None) -> LogitsFn:
    return lambda ids: model(ids, width=width).logits


@torch.inference_mode()
def perplexity(logits_fn: LogitsFn, tokens: np.ndarray, window: int, batch_size: int = 16,
               max_windows: int | None = None, device: str | torch.device = "cpu") -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``window + 1`` tokens."""
    n_windows = (len(tokens) - 1) // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"need more than {window} tokens to measure perplexity, got {len(tokens)}")
    data = torch.from_numpy(tokens[: n_windows * window + 1].astype(np.int64))
    total_nll, total_tokens = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        x = torch.stack([data[r * window : r * window + window] for r in rows]).to(device)
        y = torch.stack([data[r * window + 1 : r * window + window + 1] for r in rows]).to(device)
        logits = logits_fn(x).float()
        total_nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        total_tokens += y.numel()
    return math.exp(total_nll / total_tokens)


@torch.inference_mode()
def cloze_accuracy(logits_fn: LogitsFn, tokenizer: Tokenizer, items: Sequence[ClozeItem], n_ctx: int,
                   batch_size: int = 32, device: str | torch.device = "cpu") -> dict:
    """Whole-word cloze: correct when greedy prediction reproduces every token of the target word.

    Returns accuracy with a 95% Wilson interval, and the mean log-probability of the word.
    """
    encoded = []
    for item in items:
        context, target = tokenizer.encode(item.context), tokenizer.encode(item.target)
        context = context[-(n_ctx - len(target)) :]
        encoded.append((context, target))
    correct, logprob_sum = 0, 0.0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        length = max(len(c) + len(t) for c, t in chunk)
        # Right padding: causal attention never lets a real token see the padding after it.
        ids = torch.full((len(chunk), length), tokenizer.eos_id, dtype=torch.long)
        for row, (context, target) in enumerate(chunk):
            ids[row, : len(context) + len(target)] = torch.tensor(context + target)
        log_probs = F.log_softmax(logits_fn(ids.to(device)).float(), dim=-1).cpu()
        for row, (context, target) in enumerate(chunk):
            positions = torch.arange(len(context) - 1, len(context) + len(target) - 1)
            target_ids = torch.tensor(target)
            predicted = log_probs[row, positions].argmax(-1)
            correct += bool((predicted == target_ids).all())
            logprob_sum += log_probs[row, positions, target_ids].sum().item()
    n = len(encoded)
    low, high = wilson_interval(correct, n)
    return {"acc": correct / n if n else 0.0, "ci95": [low, high], "n": n,
            "mean_word_logprob": logprob_sum / n if n else 0.0}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at proportions near 0)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
