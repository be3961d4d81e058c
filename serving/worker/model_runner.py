"""The model runner: the weights, the KV cache, the forwards and the sampler; it runs what the scheduler decided.

Every running sequence, whatever its width, is decoded in one forward per step (attention,
norms, embeddings and the LM head shared; each FFN block of hidden units only for the rows
whose width includes it), with rows kept widest first so a block runs on a prefix of rows.
Decode steps go through :class:`serving.worker.compiled.DecodeSteps`: compiled per step signature once
its graph is loaded, eager otherwise (:meth:`ModelRunner.path_of` tells the scheduler which).

KV cache layout: the running rows keep one left-padded, preallocated cache
(:class:`~matta.model.StaticKVCache`, per layer (B, n_head, capacity, head_dim), filled to L)
with an attention mask (B, L) marking real tokens. ``NestedGPT.forward`` derives positions from
the mask, so a padded row computes exactly what it would alone. A decode step writes its keys
and values in place and attends to views. Joins pad and concatenate once; leaves gather the
surviving rows once and trim columns that became padding in every row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from matta.model import NestedGPT, StaticKVCache, ffn_plans
from serving.messages import GREEDY_BELOW, Logprob, Sampling
from serving.worker.compiled import DecodeSteps, rows_signature


@dataclass(frozen=True)
class Sampled:
    """One sequence's token from one forward, with its logprobs when asked."""

    token: int
    logprob: Logprob | None = None
    prompt_logprobs: list[Logprob] | None = None  # the prefill's, when the sequence asked for them


@dataclass(eq=False)
class _Row:
    seq_id: int
    width: str
    sampling: Sampling
    generator: torch.Generator | None


class ModelRunner:
    """Prefill and decode for the scheduler's sequences (see the module doc). One thread only."""

    def __init__(self, model: NestedGPT, steps: DecodeSteps | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.steps = steps if steps is not None else DecodeSteps(model)
        self._ffn_size = {w: sum(self.config.resolve_width(w)) for w in self.config.served_widths}
        self.rows: list[_Row] = []
        self._cache: StaticKVCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L) long, 1 = real token
        self._next_ids: torch.Tensor | None = None  # (B, 1) the last sampled token of each row
        self.decode_steps = 0
        self._paths: dict[tuple, str] = {}

    def path_of(self, row_widths: Sequence[str]) -> str:
        """How a decode step over rows of these widths runs now: "compiled" or "eager" (the
        scheduler asks for every batch it prices, so answers are kept until a swap-in)."""
        if not row_widths or not self.steps.ready_signatures:
            return "eager"
        key = (len(row_widths), frozenset(row_widths), tuple(sorted(w for w in set(row_widths)
                                                                    if row_widths.count(w) == 1)))
        path = self._paths.get(key)
        if path is None:
            ordered = sorted(row_widths, key=lambda w: -self._ffn_size[w])
            path = "compiled" if rows_signature(self.config, ordered) in self.steps.ready_signatures else "eager"
            self._paths[key] = path
        return path

    def forget_paths(self) -> None:
        """A compiled step was swapped in: the paths known so far may have changed."""
        self._paths.clear()

    @property
    def context(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    # --- forwards ------------------------------------------------------------------------------

    def prefill(self, seqs: Sequence[tuple[int, list[int], str, Sampling]]
                ) -> tuple[dict[int, Sampled], dict[str, tuple[int, float]]]:
        """Run the prompts of newly admitted sequences (one left-padded batch per width) and sample
        their first tokens; ``seqs`` are (seq_id, prompt, width, sampling). A sequence with
        ``max_tokens == 0`` only scores its prompt (when asked; token -1) and joins no batch.
        Also returns, per width, the padded prompt tokens run and the seconds they took."""
        out: dict[int, Sampled] = {}
        timings: dict[str, tuple[int, float]] = {}
        by_width: dict[str, list[tuple[int, list[int], str, Sampling]]] = {}
        for seq in seqs:
            by_width.setdefault(seq[2], []).append(seq)
        for width, group in by_width.items():
            lengths = [len(prompt) for _, prompt, _, _ in group]
            P = max(lengths)
            ids = torch.zeros(len(group), P, dtype=torch.long)
            mask = torch.zeros(len(group), P, dtype=torch.long)
            for i, (_, prompt, _, _) in enumerate(group):
                ids[i, P - len(prompt):] = torch.tensor(prompt)
                mask[i, P - len(prompt):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            started = time.perf_counter()
            # Logits at every prompt position only when a sequence asks for its prompt's logprobs;
            # otherwise the LM head runs for the last position alone (logits (B, 1, V)).
            keep = 0 if any(s.prompt_logprobs for _, _, _, s in group) else 1
            result = self.model(ids, width=width, attention_mask=mask, use_cache=True, logits_to_keep=keep)
            prompt_lp = [_prompt_logprobs(result.logits[i, P - n:], prompt, s) if s.prompt_logprobs else None
                         for i, ((_, prompt, _, s), n) in enumerate(zip(group, lengths, strict=True))]
            live = [i for i, (_, _, _, s) in enumerate(group) if s.max_tokens > 0]
            for i, (seq_id, _, _, s) in enumerate(group):
                if s.max_tokens == 0:
                    out[seq_id] = Sampled(-1, None, prompt_lp[i])
            if not live:
                continue
            index = torch.tensor(live, device=self.device)
            rows = [_Row(group[i][0], width, group[i][3], _generator(group[i][3], self.device)) for i in live]
            tokens = self._sample(rows, result.logits.index_select(0, index)[:, -1])
            for row, i, (token, lp) in zip(rows, live, tokens, strict=True):
                out[row.seq_id] = Sampled(token, lp, prompt_lp[i])
            longest = max(group[i][3].max_tokens for i in live)
            cache = StaticKVCache.from_list(
                [(k.index_select(0, index), v.index_select(0, index)) for k, v in result.past_key_values],
                capacity=min(self.config.n_ctx, P + longest))
            next_ids = torch.tensor([[t] for t, _ in tokens], device=self.device)
            self._join(rows, cache, mask.index_select(0, index), next_ids)
            timings[width] = (ids.numel(), time.perf_counter() - started)
        return out, timings

    def decode(self) -> dict[int, Sampled]:
        """One decode step for every running row: feed its last token, sample the next."""
        if not self.rows:
            return {}
        B = len(self.rows)
        mask = torch.cat([self._mask, torch.ones(B, 1, dtype=torch.long, device=self.device)], dim=1)
        plans = ffn_plans(self.config, [r.width for r in self.rows], self.device)
        logits = self.steps(self._next_ids, mask, self._cache, plans)  # extends the cache in place
        self._mask = mask
        tokens = self._sample(self.rows, logits)
        self._next_ids = torch.tensor([[t] for t, _ in tokens], device=self.device)
        self.decode_steps += 1
        return {row.seq_id: Sampled(token, lp) for row, (token, lp) in zip(self.rows, tokens, strict=True)}

    # --- rows ----------------------------------------------------------------------------------

    def remove(self, seq_ids: set[int]) -> None:
        """Drop rows (finished, cancelled): gather the survivors and trim all-padding columns, once."""
        keep = [i for i, r in enumerate(self.rows) if r.seq_id not in seq_ids]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        lead = int(mask.any(dim=0).int().argmax())  # first column holding a real token
        self._mask = mask[:, lead:]
        self._cache = StaticKVCache.from_list(
            [(k.index_select(0, index)[:, :, lead:], v.index_select(0, index)[:, :, lead:])
             for k, v in self._cache.as_list()],
            capacity=self._cache.capacity - lead)
        self._next_ids = self._next_ids.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]

    def clear(self) -> None:
        self.rows, self._cache, self._mask, self._next_ids = [], None, None, None

    def _join(self, rows: list[_Row], cache: StaticKVCache, mask: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Add freshly prefilled rows to the running batch (left-padding the shorter), widest first."""
        if not self.rows:
            self.rows, self._cache, self._mask, self._next_ids = rows, cache, mask, next_ids
        else:
            L, P = self._mask.shape[1], mask.shape[1]
            T = max(L, P)
            merged = [
                (torch.cat([F.pad(ko, (0, 0, T - L, 0)), F.pad(kn, (0, 0, T - P, 0))]),
                 torch.cat([F.pad(vo, (0, 0, T - L, 0)), F.pad(vn, (0, 0, T - P, 0))]))
                for (ko, vo), (kn, vn) in zip(self._cache.as_list(), cache.as_list(), strict=True)
            ]
            capacity = max(self._cache.capacity - L, cache.capacity - P) + T
            self._cache = StaticKVCache.from_list(merged, capacity=capacity)
            self._mask = torch.cat([F.pad(self._mask, (T - L, 0)), F.pad(mask, (T - P, 0))])
            self._next_ids = torch.cat([self._next_ids, next_ids])
            self.rows = self.rows + rows
        self._sort_widest_first()

    def _sort_widest_first(self) -> None:
        """Reorder rows by FFN size, widest first (stable; a no-op when sorted)."""
        sizes = [self._ffn_size[r.width] for r in self.rows]
        order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
        if order == list(range(len(sizes))):
            return
        index = torch.tensor(order, device=self.device)
        self._cache = StaticKVCache([k.index_select(0, index) for k in self._cache.keys],
                                    [v.index_select(0, index) for v in self._cache.values], self._cache.length)
        self._mask = self._mask.index_select(0, index)
        self._next_ids = self._next_ids.index_select(0, index)
        self.rows = [self.rows[i] for i in order]

    # --- sampling ------------------------------------------------------------------------------

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[tuple[int, Logprob | None]]:
        """One token per row of ``logits`` (B, V), with its logprobs where the row asks for them."""
        logits = logits.float()
        next_ids = logits.argmax(dim=-1)  # (B,) greedy rows are done here, in one call
        sampled = [i for i, r in enumerate(rows) if r.sampling.temperature >= GREEDY_BELOW]
        if sampled:
            next_ids[sampled] = sample_rows(logits[sampled], [rows[i].sampling for i in sampled],
                                            [rows[i].generator for i in sampled])
        tokens = next_ids.tolist()
        if not any(r.sampling.logprobs is not None for r in rows):
            return [(t, None) for t in tokens]
        logprobs = F.log_softmax(logits, dim=-1)
        return [(t, _token_logprob(logprobs[i], t, r.sampling.logprobs) if r.sampling.logprobs is not None else None)
                for i, (t, r) in enumerate(zip(tokens, rows, strict=True))]


def _generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
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


def _token_logprob(logprobs: torch.Tensor, token_id: int, k: int) -> Logprob:
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return token_id, float(logprobs[token_id]), top


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], sampling: Sampling) -> list[Logprob]:
    """Logprob of every prompt token given the ones before it (the first has none)."""
    lp = F.log_softmax(logits[:-1].float(), dim=-1)  # (P-1, V): position t predicts token t+1
    targets = torch.tensor(prompt[1:], device=lp.device)
    chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
    k = sampling.logprobs or 0
    tops: list[list] = [[]] * len(chosen)
    if k > 0:
        values, ids = lp.topk(k, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return [(prompt[0], None, [])] + [(t, c, top) for t, c, top in zip(prompt[1:], chosen, tops, strict=True)]
