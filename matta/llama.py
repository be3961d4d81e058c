"""The nested Llama family: Llama / Qwen2 / Mistral whose SwiGLU FFN widths are leading slices.

Pure torch. The architecture is HF ``LlamaForCausalLM``'s (pre-RMSNorm, rotary positions with
HF's ``rotate_half`` layout, grouped-query attention, SwiGLU FFN, no biases), with the knobs the
family's checkpoints differ in taken from :class:`~matta.config.ModelConfig`: ``n_kv_head``,
``qkv_bias`` (Qwen2), ``tie_embeddings``, ``rope_theta`` and ``rope_scaling`` (linear, llama3).
Any uniform width exports to that HF family with ``intermediate_size`` = the width.

The SwiGLU FFN is nested by hidden units, as Gemma 3n slices E2B out of E4B: width m is the
leading m rows of gate_proj and up_proj and the leading m columns of down_proj. All three are
stored hidden-unit-major, (ffn_dim, d_model), so width m is ``weight[:m]`` of each, a contiguous
view, as in the GPT-2 model. Attention, masks, caches and the forward interface are
:mod:`matta.model`'s, shared with GPT-2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from matta.config import ModelConfig
from matta.model import Block, NestedDecoder, NestedFFN, NestedGPT, attend, extend_cache


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim / 2,), with HF's ``rope_scaling`` applied (float32)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, heads, T, hs) by positions whose cos/sin are (B, 1, T, hs)."""
    return x * cos + rotate_half(x) * sin


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with ``kv_heads`` key/value heads shared by groups of query heads."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hs = config.d_model, config.head_dim
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.kv_heads, hs
        self.q_proj = nn.Linear(d, self.n_head * hs, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hs, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hs, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * hs, d, bias=False)

    def forward(self, x, attn_mask, past, static, rope):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = extend_cache(k, v, past, static)  # the cache holds rotated keys, as HF's does
        y = attend(q, k, v, attn_mask, causal=past is None)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.o_proj(y), (k, v)


class NestedSwiGLU(NestedFFN):
    """SwiGLU FFN, (silu(x G^T) * x U^T) D^T, nested by hidden units (no biases)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, m = config.d_model, config.ffn_dim
        self.gate_weight = nn.Parameter(torch.empty(m, d))  # gate_proj.weight: row i feeds unit i
        self.up_weight = nn.Parameter(torch.empty(m, d))  # up_proj.weight
        self.down_weight = nn.Parameter(torch.empty(m, d))  # down_proj.weight^T: row i is unit i's output

    def hidden(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return F.silu(F.linear(x, self.gate_weight[lo:hi])) * F.linear(x, self.up_weight[lo:hi])  # (.., hi-lo)

    @property
    def out_weight(self) -> torch.Tensor:
        return self.down_weight

    @property
    def unit_params(self) -> tuple[torch.Tensor, ...]:
        return (self.gate_weight, self.up_weight, self.down_weight)


class LlamaBlock(Block):
    norm = nn.RMSNorm
    attention = GroupedQueryAttention
    ffn = NestedSwiGLU


class NestedLlama(NestedDecoder):
    """A Llama-family language model servable at every FFN width up to ``config.ffn_dim``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.is_llama:
            raise ValueError(f"NestedLlama is the Llama family; family {config.family!r} is NestedGPT (matta.model)")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.h = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head_weight = None if config.tie_embeddings else nn.Parameter(torch.empty(config.vocab_size, config.d_model))
        # Not saved: derived from the config, and a checkpoint holds weights only.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """N(0, 0.02) as HF initialises Llama, residual projections (o, down) scaled by 1/sqrt(2 n_layer)."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        if self.lm_head_weight is not None:
            nn.init.normal_(self.lm_head_weight, 0.0, std, generator=generator)
        for block in self.h:
            nn.init.normal_(block.mlp.gate_weight, 0.0, std, generator=generator)
            nn.init.normal_(block.mlp.up_weight, 0.0, std, generator=generator)
            nn.init.normal_(block.mlp.down_weight, 0.0, residual_std, generator=generator)
            nn.init.normal_(block.attn.o_proj.weight, 0.0, residual_std, generator=generator)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)  # (B, T, d): positions enter as rotations in attention

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, head_dim) of ``position_ids`` (B, T), in float32 as HF computes them."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
        dtype = self.wte.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wte.weight if self.lm_head_weight is None else self.lm_head_weight)


def build_model(config: ModelConfig) -> NestedDecoder:
    """The nested model of ``config``'s family: :class:`~matta.model.NestedGPT` or :class:`NestedLlama`."""
    return NestedLlama(config) if config.is_llama else NestedGPT(config)
