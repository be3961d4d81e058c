"""The model runner: the weights, the KV cache, the forwards and the sampler; it runs what the scheduler decided.

Every running sequence, whatever its width, is decoded in one forward per step (attention,
norms, embeddings and the LM head shared; each FFN block of hidden units only for the rows
whose width includes it), with rows kept widest first so a block runs on a prefix of rows.
Decode steps go through :class:`serving.worker.compiled.DecodeSteps`: compiled per step signature once
its graph is loaded, eager otherwise (:meth:`ModelRunner.path_of` tells the scheduler which).

KV cache layout: the running rows keep one preallocated cache of row slots
(:class:`~matta.model.StaticKVCache`, per layer (slots, n_kv, capacity, head_dim)), row i holding
its own tokens at positions [0, length_i), no padding; a decode step writes each row's key and
value at that row's length, in place, under a mask the model derives from the lengths. No event
copies the batch. A join copies the new rows' prefill (its padding stripped) into free slots.
Rows stay grouped by width, widest first (the FFN then runs a prefix of rows per block), by
moving one row per group: a joining row takes the place of the first row of the narrowest
group, which moves to its group's end, and so on up to the joining row's group; a leaving row's
hole takes the last row of its group, whose slot takes the last row of the next narrower group,
and so on; a width change is a leave and a join of that row. A move copies one row's filled
part, so an event costs (rows moved <= number of widths) x their length, whatever the batch
size (``benchmarks/kv_cache.py``).

Chunked prefill (:meth:`ModelRunner.prefill_chunks`): a prompt too long for one iteration's token
budget runs as chunks over several iterations. The live rows must stay packed and grouped at the
front of the cache (each decode step runs over exactly them), so a row still prefilling keeps its
own one-row cache: each chunk writes its keys and values there in place, after the earlier
chunks', and attends to them (no other row is copied, nor its own earlier chunks). Its last chunk
samples its first token and the row joins the batch as a whole prompt's prefill does (one copy of
its filled part); it decodes from the next step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from matta.kv_cache import StaticKVCache
from matta.model import NestedGPT, ffn_plans
from serving.messages import GREEDY_BELOW, Logprob, Sampling
from serving.worker.compiled import DecodeSteps, rows_signature
from serving.worker.sampling import generator_for, prompt_logprobs, sample_rows, token_logprob


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
    next_id: int = 0  # the token this row feeds to the next decode step


@dataclass(eq=False)
class _Prefilling:
    """A sequence whose prompt runs in chunks: its row (not live yet) and its own one-row cache."""

    row: _Row
    prompt: list[int]
    cache: StaticKVCache
    prompt_logprobs: list[Logprob] | None  # gathered chunk by chunk, when the sequence asks for them


Chunk = tuple[int, list[int], str, Sampling, int, int]
"""A prompt chunk to run: (seq_id, prompt, width, sampling, start, tokens): ``prompt[start:start + tokens]``."""

ChunkTiming = tuple[str, int, int, float]
"""How long a prefill forward took: (width, tokens run (padding included), context cached before them, seconds)."""


class ModelRunner:
    """Prefill and decode for the scheduler's sequences (see the module doc). One thread only."""

    def __init__(self, model: NestedGPT, steps: DecodeSteps | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.steps = steps if steps is not None else DecodeSteps(model)
        self._ffn_size = {w: sum(self.config.resolve_width(w)) for w in self.config.served_widths}
        self.rows: list[_Row] = []  # row i lives in cache slot i: grouped by width, widest first
        self._cache: StaticKVCache | None = None
        self._prefilling: dict[int, _Prefilling] = {}  # seq_id -> a prompt part-way through its chunks
        self.chunks_run = 0  # prompt chunks run that were not a whole prompt
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
    def row_ids(self) -> list[int]:
        """The sequences a decode step runs now (the live rows; not those still prefilling)."""
        return [r.seq_id for r in self.rows]

    @property
    def context(self) -> int:
        return 0 if self._cache is None else self._cache.length

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
            prompt_lp = [prompt_logprobs(result.logits[i, P - n:], prompt, s) if s.prompt_logprobs else None
                         for i, ((_, prompt, _, s), n) in enumerate(zip(group, lengths, strict=True))]
            live = [i for i, (_, _, _, s) in enumerate(group) if s.max_tokens > 0]
            for i, (seq_id, _, _, s) in enumerate(group):
                if s.max_tokens == 0:
                    out[seq_id] = Sampled(-1, None, prompt_lp[i])
            if not live:
                continue
            index = torch.tensor(live, device=self.device)
            rows = [_Row(group[i][0], width, group[i][3], generator_for(group[i][3], self.device)) for i in live]
            tokens = self._sample(rows, result.logits.index_select(0, index)[:, -1])
            for row, i, (token, lp) in zip(rows, live, tokens, strict=True):
                out[row.seq_id] = Sampled(token, lp, prompt_lp[i])
            if self._cache is None:
                longest = max(group[i][3].max_tokens for i in live)
                self._cache = StaticKVCache.empty_like(result.past_key_values, len(live) + 1,
                                                       min(self.config.n_ctx, P + longest))
            for i, row, (token, _) in zip(live, rows, tokens, strict=True):
                self._join(row, token, [(k[i : i + 1], v[i : i + 1]) for k, v in result.past_key_values],
                           lengths[i], left_padded=True)
            timings[width] = (ids.numel(), time.perf_counter() - started)
        return out, timings

    def prefill_chunks(self, chunks: Sequence[Chunk]) -> tuple[dict[int, Sampled], list[ChunkTiming]]:
        """Run this iteration's prompt chunks (see the module doc): whole prompts as :meth:`prefill`
        does (one left-padded batch per width), every other chunk alone, in place in its sequence's
        own cache after its earlier chunks. A sequence whose last chunk ran has its first token in
        the result and has joined the batch (``max_tokens == 0``: token -1, it joins nothing).
        Also returns every forward's :data:`ChunkTiming`."""
        whole = [c for c in chunks if c[4] == 0 and c[5] == len(c[1])]
        out, by_width = self.prefill([c[:4] for c in whole])
        timings = [(width, tokens, 0, seconds) for width, (tokens, seconds) in by_width.items()]
        for seq_id, prompt, width, sampling, start, tokens in chunks:
            if start == 0 and tokens == len(prompt):
                continue
            started = time.perf_counter()
            sampled = self._chunk(seq_id, prompt, width, sampling, start, tokens)
            timings.append((width, tokens, start, time.perf_counter() - started))
            if sampled is not None:
                out[seq_id] = sampled
        return out, timings

    def _chunk(self, seq_id: int, prompt: list[int], width: str, sampling: Sampling, start: int,
               tokens: int) -> Sampled | None:
        """``prompt[start:start + tokens]`` of one sequence into its own cache; its first token after
        the last chunk."""
        state = self._prefilling.get(seq_id)
        if state is None:
            if start != 0:
                raise RuntimeError(f"sequence {seq_id}: a first chunk must start at 0, got {start}")
            weight = self.model.wte.weight
            cache = StaticKVCache.zeros(self.config.n_layer, self.config.kv_heads, self.config.head_dim, 1,
                                        len(prompt), dtype=weight.dtype, device=self.device)
            cache.set_batch_size(1)
            row = _Row(seq_id, width, sampling, generator_for(sampling, self.device))
            state = self._prefilling[seq_id] = _Prefilling(row, list(prompt), cache,
                                                           [] if sampling.prompt_logprobs else None)
        if start != state.cache.length or start + tokens > len(prompt):
            raise RuntimeError(f"sequence {seq_id}: chunk [{start}, {start + tokens}) does not follow its "
                               f"{state.cache.length} cached of {len(prompt)} prompt tokens")
        ids = torch.tensor([prompt[start : start + tokens]], device=self.device)
        # The LM head for the last position only, unless the sequence asked for its prompt's logprobs.
        keep = 0 if state.prompt_logprobs is not None else 1
        result = self.model(ids, width=state.row.width, past_key_values=state.cache, use_cache=True,
                            logits_to_keep=keep)  # writes the chunk's keys and values in place
        self.chunks_run += 1
        if state.prompt_logprobs is not None:
            state.prompt_logprobs += prompt_logprobs(result.logits[0], prompt, sampling, start)
        if start + tokens < len(prompt):
            return None
        del self._prefilling[seq_id]
        if sampling.max_tokens == 0:
            return Sampled(-1, None, state.prompt_logprobs)
        [(token, lp)] = self._sample([state.row], result.logits[:, -1])
        if self._cache is None:
            self._cache = StaticKVCache.empty_like(state.cache.as_list(), 2,
                                                   min(self.config.n_ctx, len(prompt) + sampling.max_tokens))
        self._join(state.row, token, state.cache.as_list(), len(prompt))
        return Sampled(token, lp, state.prompt_logprobs)

    def decode(self) -> dict[int, Sampled]:
        """One decode step for every running row: feed its last token, sample the next."""
        if not self.rows:
            return {}
        ids = torch.tensor([[r.next_id] for r in self.rows], device=self.device)
        plans = ffn_plans(self.config, [r.width for r in self.rows], self.device)
        # No mask: each row attends to its own filled length (the model derives the mask from it).
        logits = self.steps(ids, None, self._cache, plans)  # extends the cache in place
        tokens = self._sample(self.rows, logits)
        for row, (token, _) in zip(self.rows, tokens, strict=True):
            row.next_id = token
        self.decode_steps += 1
        return {row.seq_id: Sampled(token, lp) for row, (token, lp) in zip(self.rows, tokens, strict=True)}

    # --- rows ----------------------------------------------------------------------------------

    def remove(self, seq_ids: set[int]) -> None:
        """Drop rows (finished, cancelled; or still prefilling): each one's hole is filled by moving a
        row per group."""
        for seq_id in seq_ids:
            self._prefilling.pop(seq_id, None)
        for index in sorted((i for i, r in enumerate(self.rows) if r.seq_id in seq_ids), reverse=True):
            self._leave(index)
        if not self.rows:
            self.rows, self._cache = [], None

    def set_widths(self, widths: dict[int, str]) -> None:
        """Running rows continue at other widths ({seq_id: width}) on the caches they have: only the
        FFN is nested, so nothing is recomputed; each changed row leaves its width's group and joins
        the new one (a few rows moved, see the module doc)."""
        for seq_id, width in widths.items():
            index = next((i for i, r in enumerate(self.rows) if r.seq_id == seq_id), None)
            if index is None or self.rows[index].width == width:
                continue
            row = self.rows[index]
            spare = self._spare()
            self._cache.move_row(index, spare)  # parked while the others close the hole
            self._leave(index)
            self._cache.move_row(spare, len(self.rows))
            row.width = width
            self.rows.append(row)
            self._cache.set_batch_size(len(self.rows))
            self._into_group(len(self.rows) - 1)

    def clear(self) -> None:
        """Drop every row, prefilling ones included."""
        self.rows, self._cache, self._prefilling = [], None, {}

    def _join(self, row: _Row, token: int, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int,
              left_padded: bool = False) -> None:
        """A prefilled row joins the batch: its cache (``kv``, per layer (1, n_kv, T, hs) holding
        ``length`` tokens, its last ones when ``left_padded``) is copied in as the last live row, which
        then moves into its width's group; it feeds ``token`` to the next decode step."""
        self._cache.write_rows(kv, torch.tensor([length], device=self.device), left_padded=left_padded)
        row.next_id = token
        self.rows.append(row)
        self._into_group(len(self.rows) - 1)

    def _spare(self) -> int:
        """A free slot past the live rows (the cache grows when it has none)."""
        if self._cache.batch_size != len(self.rows):
            raise RuntimeError(f"{len(self.rows)} rows but {self._cache.batch_size} live cache rows")
        self._cache.reserve(0, 0, len(self.rows) + 1)
        return len(self.rows)

    def _into_group(self, index: int) -> None:
        """Move the last row (``index``) to the end of its width's group: the first row of each
        narrower group, narrowest first, moves to the slot after its group's end."""
        size = self._ffn_size[self.rows[index].width]
        target = next(i for i, r in enumerate(self.rows) if i == index or self._ffn_size[r.width] < size)
        if target == index:
            return
        starts = [i for i in range(target, index) if i == target or self.rows[i].width != self.rows[i - 1].width]
        spare = self._spare()
        joining = self.rows[index]
        self._cache.move_row(index, spare)
        hole = index
        for start in reversed(starts):  # the narrowest group first
            self._move(start, hole)
            hole = start
        self._cache.move_row(spare, hole)
        self.rows[hole] = joining

    def _leave(self, index: int) -> None:
        """Drop the row at ``index``: the last row of its group fills its slot, the last row of each
        narrower group the slot the previous move freed; the last slot ends free."""
        ends = [i for i in range(index, len(self.rows))
                if i == len(self.rows) - 1 or self.rows[i].width != self.rows[i + 1].width]
        hole = index
        for end in ends:
            self._move(end, hole)
            hole = end
        self.rows.pop()
        self._cache.set_batch_size(len(self.rows))

    def _move(self, source: int, target: int) -> None:
        """One row (its cache and state) from live slot ``source`` to slot ``target``."""
        if source != target:
            self._cache.move_row(source, target)
            self.rows[target] = self.rows[source]

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
        return [(t, token_logprob(logprobs[i], t, r.sampling.logprobs) if r.sampling.logprobs is not None else None)
                for i, (t, r) in enumerate(zip(tokens, rows, strict=True))]
