"""The nested (Matryoshka) GPT: GPT-2 whose FFN widths are leading slices of one weight matrix.

Pure torch. Architecture follows GPT-2 exactly (pre-LayerNorm, GELU-tanh, learned positions,
tied input/output embeddings, biases everywhere) so any uniform width exports to a plain HF
``GPT2LMHeadModel`` with ``n_inner`` = that width.

Both FFN matrices are stored hidden-unit-major, shape (ffn_dim, d_model): row i belongs to
hidden unit i. Width m is then ``weight[:m]`` for both, a contiguous view, so slicing copies
nothing and the matmuls run on the same BLAS path as a dense model of width m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from matta.config import ModelConfig, WidthSpec
from matta.kv_cache import KVCache, StaticKVCache


@dataclass
class GPTOutput:
    logits: torch.Tensor  # (B, T, vocab)
    past_key_values: KVCache | StaticKVCache | None = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
           causal: bool) -> torch.Tensor:
    """Scaled dot-product attention of q (B, nh, T, hs) over k, v (B, n_kv, S, hs), n_kv dividing nh
    (grouped-query attention: query head h reads key/value head h // (nh / n_kv)). ``causal`` asks
    for the plain causal mask when ``attn_mask`` is None. Returns (B, nh, T, hs)."""
    B, nh, T, hs = q.shape
    n_kv = k.shape[1]
    if T == 1 and k.shape[2] > 1:
        # One new token against a cache (a decode step): plain matmul-softmax-matmul, cheaper
        # than the CPU flash-attention kernel with a mask for a single query (interleaved A/B
        # at batch 16, context 96, 1 thread: Student step 0.89x, TA step 0.93x the time).
        # Grouped queries ride along as rows of their key/value head: no copy of the cache.
        qg = q.view(B, n_kv, nh // n_kv, hs)  # (B, n_kv, group, hs)
        scores = torch.matmul(qg, k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, n_kv, group, S)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        # Softmax in float32 whatever the cache's dtype (bf16 would round the probabilities).
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v).view(B, nh, 1, hs)
    gqa = n_kv != nh
    if attn_mask is None:
        # No padding and no cache: the plain causal fast path.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)


StaticSlice = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
"""One layer of a :class:`StaticKVCache` for a forward: key buffer, value buffer, each row's filled
length (B,) and the longest row's."""


def extend_cache(k: torch.Tensor, v: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                 static: StaticSlice | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's keys and values (B, n_kv, T, hs) appended to the cache: written in place into a
    static buffer (one token per row at that row's own length, or T tokens at the common length)
    or concatenated to ``past``."""
    if static is not None:
        k_buf, v_buf, lengths, length = static
        B, T = k.shape[0], k.shape[2]
        if T == 1:
            rows = torch.arange(B, device=k.device)
            k_buf[rows, :, lengths] = k[:, :, 0]  # (B, n_kv, hs) at (row, lengths[row])
            v_buf[rows, :, lengths] = v[:, :, 0]
        else:  # a chunk after a prefill: every row at the common length
            k_buf[:B, :, length : length + T] = k
            v_buf[:B, :, length : length + T] = v
        return k_buf[:B, :, : length + T], v_buf[:B, :, : length + T]
    if past is not None:
        return torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)  # (B, n_kv, Tp+T, hs)
    return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)
        self.c_proj = nn.Linear(config.d_model, config.d_model)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        static: StaticSlice | None = None,
        rope: object = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``static`` (:data:`StaticSlice`): write this step in place, attend to views.
        ``rope`` is unused: GPT-2 adds learned positions to the embeddings instead."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = extend_cache(k, v, past, static)
        y = attend(q, k, v, attn_mask, causal=past is None)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v)


FFNBlocks = list[tuple[int, int, "int | torch.Tensor"]]
"""One layer's plan of a mixed-width batch: hidden-unit blocks ``[lo, hi)`` in ascending order, each
with the rows that run it, as a prefix length (rows sorted widest first) or an index tensor."""


def ffn_plan(sizes: Sequence[int], device: torch.device | str = "cpu") -> int | FFNBlocks:
    """How one layer's FFN runs rows whose widths are ``sizes`` (one FFN size per row).

    A nested FFN decomposes by blocks of hidden units, out = sum over blocks of
    gelu(x W_in[block]) W_out[block], so the first block runs for every row and each further
    block only for the rows whose width includes it. One width for all rows is a plain int.
    """
    distinct = sorted(set(sizes))
    if len(distinct) == 1:
        return distinct[0]
    widest_first = all(a >= b for a, b in pairwise(sizes))
    blocks: FFNBlocks = [(0, distinct[0], len(sizes))]
    for lo, hi in pairwise(distinct):
        rows = [i for i, size in enumerate(sizes) if size >= hi]
        blocks.append((lo, hi, len(rows) if widest_first else torch.tensor(rows, device=device)))
    return blocks


def ffn_plans(config: ModelConfig, row_widths: Sequence[WidthSpec],
              device: torch.device | str = "cpu") -> list[int | FFNBlocks]:
    """Each layer's FFN plan (:func:`ffn_plan`) for rows whose widths are ``row_widths``."""
    per_row = [config.resolve_width(w) for w in row_widths]
    return [ffn_plan([sizes[i] for sizes in per_row], device) for i in range(config.n_layer)]


class NestedFFN(nn.Module):
    """An FFN whose hidden units are nested: width m runs on the first m units only.

    Subclasses store every per-unit weight hidden-unit-major (row i is unit i), say how a slice
    [lo, hi) of units turns the input into activations (:meth:`hidden`), and name the output
    weight (``out_weight``, (ffn_dim, d)) and bias. The width logic, one width or a mixed-width
    plan, is here once.
    """

    out_bias: torch.Tensor | None = None

    def hidden(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Activations of hidden units [lo, hi) for ``x`` (..., d): (..., hi - lo)."""
        raise NotImplementedError

    @property
    def out_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def unit_params(self) -> tuple[torch.Tensor, ...]:
        """Every parameter whose first dimension indexes hidden units (they permute together)."""
        raise NotImplementedError

    def unit_weight_norm(self) -> torch.Tensor:
        """Data-free importance of each unit: the product of its rows' norms, (ffn_dim,)."""
        norm = torch.ones(self.out_weight.shape[0], device=self.out_weight.device)
        for param in self.unit_params:
            if param.dim() == 2:
                norm = norm * param.detach().norm(dim=1)
        return norm

    def forward(self, x: torch.Tensor, width: int | FFNBlocks) -> torch.Tensor:
        """``width``: one FFN size for every row, or a mixed-width plan from :func:`ffn_plan`."""
        if isinstance(width, int):
            out = torch.matmul(self.hidden(x, 0, width), self.out_weight[:width])  # (B, T, m) @ (m, d)
        else:
            out = None
            for lo, hi, rows in width:
                xr = x[:rows] if isinstance(rows, int) else x.index_select(0, rows)  # (rows, T, d)
                y = torch.matmul(self.hidden(xr, lo, hi), self.out_weight[lo:hi])  # (rows, T, d)
                if out is None:  # the first block: every row
                    out = y
                elif isinstance(rows, int):
                    out[:rows] += y
                else:
                    out.index_add_(0, rows, y)
        return out if self.out_bias is None else out + self.out_bias


class NestedMLP(NestedFFN):
    """GPT-2 FFN: gelu(x W_in + b_in) W_out + b_out, nested by hidden units."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, m = config.d_model, config.ffn_dim
        self.fc_weight = nn.Parameter(torch.empty(m, d))  # W_in^T: row i feeds hidden unit i
        self.fc_bias = nn.Parameter(torch.zeros(m))
        self.proj_weight = nn.Parameter(torch.empty(m, d))  # W_out: row i is hidden unit i's output
        self.proj_bias = nn.Parameter(torch.zeros(d))

    def hidden(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return F.gelu(F.linear(x, self.fc_weight[lo:hi], self.fc_bias[lo:hi]), approximate="tanh")

    @property
    def out_weight(self) -> torch.Tensor:
        return self.proj_weight

    @property
    def out_bias(self) -> torch.Tensor:
        return self.proj_bias

    @property
    def unit_params(self) -> tuple[torch.Tensor, ...]:
        return (self.fc_weight, self.fc_bias, self.proj_weight)


class Block(nn.Module):
    """A pre-norm transformer block; an architecture's block names its norm, attention and FFN."""

    norm: type[nn.Module] = nn.LayerNorm
    attention: type[nn.Module] = CausalSelfAttention
    ffn: type[nn.Module] = NestedMLP

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = self.norm(config.d_model, eps=config.layer_norm_eps)
        self.attn = self.attention(config)
        self.ln_2 = self.norm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = self.ffn(config)

    def forward(self, x, width, attn_mask, past, static=None, rope=None):
        attn_out, present = self.attn(self.ln_1(x), attn_mask, past, static, rope)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x), width)
        return x, present


class NestedDecoder(nn.Module):
    """What every nested architecture shares: the forward interface the engine, the compiled steps
    and the trainer call (widths, per-row widths, per-layer plans, padding masks, KV caches).

    A subclass has ``wte`` (token embedding), ``h`` (blocks called as
    ``block(x, width, attn_mask, past, static, rope)``) and ``ln_f``, and says how tokens enter
    (:meth:`embed`), what positional input the blocks take (:meth:`rope`) and how logits leave
    (:meth:`lm_head`).
    """

    config: ModelConfig
    wte: nn.Embedding
    h: nn.ModuleList
    ln_f: nn.Module

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary (cos, sin) for the blocks, or None for an architecture without them."""
        return None

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wte.weight)  # tied embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        width: WidthSpec | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | StaticKVCache | None = None,
        use_cache: bool = False,
        row_widths: Sequence[WidthSpec] | None = None,
        plans: Sequence[int | FFNBlocks] | None = None,
        logits_to_keep: int = 0,
    ) -> GPTOutput:
        """Logits for ``input_ids`` (B, T) at ``width`` (name, FFN size, or one per layer).

        ``row_widths`` instead gives every row its own width (one spec per row): one forward
        then serves a mixed batch, attention, norms, embeddings and the LM head shared, each
        row's FFN exactly as it would run alone at its width (see :func:`ffn_plan`); rows sorted
        widest first take the cheapest path (prefixes instead of gathers).

        ``plans`` gives each layer's FFN plan directly (from :func:`ffn_plans`), for a caller that
        compiles this forward: the graph then depends on the plan's integers, not on width names.

        ``attention_mask`` (B, T_past + T) marks real tokens with 1 and padding with 0; with
        it, positions count only real tokens, so a left- or right-padded row computes exactly
        what the unpadded sequence would. ``past_key_values`` continues from a cache returned
        by an earlier call with ``use_cache=True``; a :class:`StaticKVCache` is extended in place
        and returned as the new cache.

        ``logits_to_keep`` > 0 computes logits for the last that many positions only (as in HF
        transformers): a prefill that samples only the next token skips the LM head, a quarter to
        a third of a short prompt's FLOPs here, for every other position. 0 keeps all.
        """
        B, T = input_ids.shape
        if sum(x is not None for x in (width, row_widths, plans)) > 1:
            raise ValueError("give one of width (all rows), row_widths (one per row) or plans (one per layer)")
        if plans is not None:
            if len(plans) != self.config.n_layer:
                raise ValueError(f"plans has {len(plans)} entries; the model has {self.config.n_layer} layers")
            widths = plans
        elif row_widths is not None:
            if len(row_widths) != B:
                raise ValueError(f"row_widths has {len(row_widths)} entries; the batch has {B} rows")
            widths = ffn_plans(self.config, row_widths, input_ids.device)
        else:
            widths = self.config.resolve_width(width)
        static = past_key_values if isinstance(past_key_values, StaticKVCache) else None
        if static is not None:
            past_len = static.length
        else:
            past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if past_len + T > self.config.n_ctx:
            raise ValueError(f"sequence length {past_len + T} exceeds the context window {self.config.n_ctx}")
        if attention_mask is not None and attention_mask.shape != (B, past_len + T):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != (batch, past + new) = {(B, past_len + T)}"
            )
        lengths = None
        if static is not None:
            if static.batch_size != B:
                raise ValueError(f"the cache holds {static.batch_size} rows; the batch has {B}")
            static.reserve(past_len + T, self.config.n_ctx)  # first: growing replaces the buffers and lengths
            lengths = static.lengths
            if T > 1 and bool((lengths != past_len).any()):
                raise ValueError("a chunk of several tokens needs every cached row at the same length")
            if attention_mask is None and T == 1:
                # Rows of their own lengths: each sees its filled part and the token it writes.
                attention_mask = torch.arange(past_len + 1, device=input_ids.device)[None, :] <= lengths[:, None]
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        attn_mask = None
        if attention_mask is not None or (past_key_values is not None and T > 1):
            attn_mask = self._attention_mask(attention_mask, B, T, past_len, input_ids.device, lengths)

        x = self.embed(input_ids, position_ids)  # (B, T, d)
        rope = self.rope(position_ids)
        if static is not None:
            for i, block in enumerate(self.h):
                x, _ = block(x, widths[i], attn_mask, None, (static.keys[i], static.values[i], lengths, past_len), rope)
            lengths.add_(T)
            static.length = past_len + T
            presents: KVCache | StaticKVCache = static
        else:
            presents = []
            for i, block in enumerate(self.h):
                past = None if past_key_values is None else past_key_values[i]
                x, present = block(x, widths[i], attn_mask, past, None, rope)
                presents.append(present)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        # Logits leave in float32 whatever the weights' dtype: sampling, logprobs and losses read them.
        logits = self.lm_head(self.ln_f(x)).float()  # (B, T or logits_to_keep, vocab)
        return GPTOutput(logits=logits, past_key_values=presents if use_cache else None)

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, B: int, T: int, past_len: int, device: torch.device,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean (B, 1, T, T_past + T) mask: causal and over real tokens only. ``lengths``: each
        row's filled length in a :class:`StaticKVCache`, where a decode step writes its token."""
        total = past_len + T
        if T == 1 and attention_mask is not None:
            # A decode step: the one query is the newest position, so causality is trivial; it
            # sees the real tokens and itself (two ops instead of seven, once per step).
            mask = attention_mask != 0  # a new tensor: the caller's mask is not written
            if lengths is None:
                mask[:, -1] = True
            else:
                mask[torch.arange(B, device=device), lengths] = True
            return mask[:, None, None, :]
        query_pos = torch.arange(past_len, total, device=device)[:, None]
        key_pos = torch.arange(total, device=device)[None, :]
        mask = (key_pos <= query_pos)[None, None]  # (1, 1, T, total)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
            # A padding query would see no key at all (softmax of nothing = NaN); let it see
            # itself. Its output is never used.
            mask = mask | (key_pos == query_pos)[None, None]
        return mask.expand(B, 1, T, total)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.inference_mode()
    def generate_greedy(self, input_ids: Sequence[int], max_new_tokens: int, width: WidthSpec | None = None) -> list[int]:
        """Reference greedy decode of one sequence with the KV cache; stops at end-of-text."""
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.wte.weight.device)
        out = self(ids, width=width, use_cache=True)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            next_id = int(out.logits[0, -1].argmax())
            generated.append(next_id)
            if next_id == self.config.eos_token_id or len(input_ids) + len(generated) >= self.config.n_ctx:
                break
            step = torch.tensor([[next_id]], device=ids.device)
            out = self(step, width=width, past_key_values=out.past_key_values, use_cache=True)
        return generated


class NestedGPT(NestedDecoder):
    """GPT-2 language model servable at every FFN width up to ``config.ffn_dim``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.is_llama:
            raise ValueError(f"NestedGPT is GPT-2; family {config.family!r} is NestedLlama (matta.llama)")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.n_ctx, config.d_model)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.h:
            nn.init.normal_(block.mlp.fc_weight, 0.0, std, generator=generator)
            nn.init.zeros_(block.mlp.fc_bias)
            nn.init.normal_(block.mlp.proj_weight, 0.0, residual_std, generator=generator)
            nn.init.zeros_(block.mlp.proj_bias)
            nn.init.normal_(block.attn.c_proj.weight, 0.0, residual_std, generator=generator)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids) + self.wpe(position_ids)  # (B, T, d)
