"""Sampling for the model runner: one token per row from its logits, seeded draws that do not depend on
the batch, and the logprobs a request asks for (of its tokens, of its prompt)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from serving.messages import Logprob, Sampling


def generator_for(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """The row's own generator when the request gave a seed (its draws then ignore the batch), else None."""
    return torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None


def sample_rows(logits: torch.Tensor, params: Sequence[Sampling],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``logits`` (B, V) from softmax(logits / temperature) restricted to the
    row's top-p nucleus, for the whole batch in tensor ops.

    Draws use the exponential race (argmax of p / E with E ~ Exp(1) is a draw from p): unseeded
    rows take their noise in one call, a seeded row from its own generator, so its tokens do not
    depend on what else is in the batch.
    """
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]
        outside[:, 0] = False  # a top_p below float32's resolution (5e-324) would otherwise drop every token
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    for i, generator in enumerate(generators):
        if generator is not None:
            noise[i].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def token_logprob(logprobs: torch.Tensor, token_id: int, k: int) -> Logprob:
    """``token_id``'s logprob and the ``k`` most likely tokens' from one position's log-softmax (V,)."""
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return token_id, float(logprobs[token_id]), top


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], sampling: Sampling, start: int = 0) -> list[Logprob]:
    """Logprob of every prompt token given the ones before it (the first has none), from the logits
    (T, V) of positions ``start`` .. ``start + T - 1`` (a chunk's: the tokens after them)."""
    n = min(len(logits), len(prompt) - 1 - start)  # the last prompt position predicts no prompt token
    lp = F.log_softmax(logits[:n].float(), dim=-1)  # (n, V): position start + t predicts token start + t + 1
    targets = torch.tensor(prompt[start + 1 : start + 1 + n], device=lp.device)
    chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
    k = sampling.logprobs or 0
    tops: list[list] = [[]] * len(chosen)
    if k > 0:
        values, ids = lp.topk(k, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    head: list[Logprob] = [(prompt[0], None, [])] if start == 0 else []
    return head + [(t, c, top) for t, c, top in zip(prompt[start + 1 : start + 1 + n], chosen, tops, strict=True)]
