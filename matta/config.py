"""Architecture config of the nested (Matryoshka) GPT, saved beside every checkpoint as config.json."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

WidthSpec = str | int | Sequence[str | int]
"""A width as a name (``"s"``), an FFN hidden size (``384``) or one of those per layer."""

DEFAULT_CHECKPOINT = Path("checkpoints/default")  # what `matta serve` and friends load when given none
DTYPE_CHOICES = ("float32", "bfloat16", "auto")
"""What a model may be loaded and served in (``auto``: bf16 where the device computes it natively)."""

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")

FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
"""Architecture families: GPT-2, and the Llama family, exported as HF Llama / Qwen2 / Mistral."""
LLAMA_ONLY_FIELDS = ("n_kv_head", "rope_theta", "rope_scaling", "qkv_bias", "tie_embeddings", "bos_token_id")
ROPE_TYPES = ("default", "linear", "llama3")
"""HF rope_scaling types the model implements; others (yarn, dynamic, longrope, ...) are refused."""


def check_rope_scaling(scaling: dict | None) -> None:
    """Refuse a rope_scaling the model does not implement, quoting it."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a mapping or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported ({scaling!r}); supported: {list(ROPE_TYPES)}")
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")}.get(kind, ())
    missing = [k for k in needed if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ValueError(f"rope_scaling {scaling!r} lacks numeric {missing}")


@dataclass
class ModelConfig:
    """A transformer whose FFN hidden units are nested: width m uses the first m units.

    ``family`` says the architecture, as litgpt's one config does: ``gpt2`` (LayerNorm, learned
    positions, GELU FFN, biases, tied embeddings; :class:`~matta.model.NestedGPT`) or the Llama family
    ``llama`` / ``qwen2`` / ``mistral`` (RMSNorm, rotary positions, ``n_kv_head`` key/value heads,
    SwiGLU FFN, ``qkv_bias`` for Qwen2, tied or untied embeddings; :class:`~matta.llama.NestedLlama`),
    each exported to that HF family. The Llama-only fields must stay at their defaults for GPT-2.

    ``widths`` maps names to FFN hidden sizes in strictly ascending order; the last one is
    the full (TA) width that the weights are stored at, the first one is the Student.
    ``profiles`` maps more names to per-layer FFN sizes (MatFormer Mix'n'Match, e.g. chosen by
    ``matta mixnmatch``): servable by name like a width, but not a uniform width, so training
    and HF export only ever see ``widths``.
    """

    vocab_size: int = 2048
    n_ctx: int = 256
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 2
    widths: dict[str, int] = field(default_factory=lambda: {"s": 32, "m": 128, "l": 384, "ta": 1024})
    layer_norm_eps: float = 1e-5  # LayerNorm's eps, or RMSNorm's for the Llama family
    eos_token_id: int = 0
    name: str = "matta"
    profiles: dict[str, list[int]] = field(default_factory=dict)
    family: str = "gpt2"
    n_kv_head: int | None = None  # None: as many key/value heads as query heads (no GQA)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF's rope_scaling: None, {"rope_type": "linear" | "llama3", ...}
    qkv_bias: bool = False  # Qwen2: biases on q, k, v (never on o)
    tie_embeddings: bool = True  # LM head = token embedding (GPT-2 always ties)
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        for attr in ("vocab_size", "n_ctx", "d_model", "n_layer", "n_head"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{attr} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if not isinstance(self.widths, dict) or not self.widths:
            raise ValueError(f"widths must be a non-empty mapping of name -> FFN size, got {self.widths!r}")
        previous = 0
        for width_name, size in self.widths.items():
            if not isinstance(width_name, str) or not _NAME_RE.match(width_name):
                raise ValueError(
                    f"width name {width_name!r} is invalid; use a letter then letters, digits, '_' or '-'"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"width {width_name!r} must be a positive int, got {size!r}")
            if size <= previous:
                raise ValueError(
                    f"widths must be strictly ascending; {width_name!r}={size} follows {previous} in {self.widths}"
                )
            previous = size
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id {self.eos_token_id!r} is outside the vocabulary 0..{self.vocab_size - 1}")
        if not isinstance(self.layer_norm_eps, float) or self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}")
        if not isinstance(self.profiles, dict):
            raise ValueError(f"profiles must be a mapping of name -> per-layer FFN sizes, got {self.profiles!r}")
        for profile_name, sizes in self.profiles.items():
            if not isinstance(profile_name, str) or not _NAME_RE.match(profile_name) or profile_name in self.widths:
                raise ValueError(f"profile name {profile_name!r} is invalid or already a width; use a letter then "
                                 f"letters, digits, '_' or '-', not one of {self.width_names}")
            if (not isinstance(sizes, list) or len(sizes) != self.n_layer
                    or any(isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= self.ffn_dim for m in sizes)):
                raise ValueError(f"profile {profile_name!r} must list {self.n_layer} FFN sizes in 1..{self.ffn_dim}, "
                                 f"got {sizes!r}")
            if len(set(sizes)) == 1:
                raise ValueError(f"profile {profile_name!r} is uniform ({sizes!r}); name it in widths instead")
        self._check_family()

    def _check_family(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; known: {list(FAMILIES)}")
        if self.family == "gpt2":
            defaults = {f.name: f.default for f in fields(self) if f.name in LLAMA_ONLY_FIELDS}
            changed = sorted(k for k, v in defaults.items() if getattr(self, k) != v)
            if changed:
                raise ValueError(f"{changed} apply to the Llama family only; family is 'gpt2'")
            return
        kv = self.n_kv_head
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or self.n_head % kv):
            raise ValueError(f"n_kv_head must be a positive int dividing n_head {self.n_head}, got {kv!r}")
        if self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        check_rope_scaling(self.rope_scaling)
        for attr in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, attr), bool):
                raise ValueError(f"{attr} must be a bool, got {getattr(self, attr)!r}")
        if self.qkv_bias != (self.family == "qwen2"):
            # What the HF classes build: Qwen2 always has q/k/v biases, Llama and Mistral never.
            raise ValueError(f"family {self.family!r} needs qkv_bias={self.family == 'qwen2'}, got {self.qkv_bias}")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ValueError(f"bos_token_id {self.bos_token_id!r} is outside the vocabulary 0..{self.vocab_size - 1}")

    @property
    def is_llama(self) -> bool:
        """RMSNorm, rotary positions, grouped-query attention and a nested SwiGLU FFN (NestedLlama)."""
        return self.family != "gpt2"

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer (``n_head`` without grouped-query attention)."""
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        """FFN hidden size the weights are stored at: the widest named width."""
        return max(self.widths.values())

    @property
    def width_names(self) -> list[str]:
        """Width names from narrowest (Student) to widest (TA)."""
        return list(self.widths)

    @property
    def served_widths(self) -> list[str]:
        """Every name a server accepts (widths and profiles), cheapest first by FLOPs per token.

        Width policies take this order as their ladder of operating points; on ties a uniform
        width comes first.
        """
        names = [*self.widths, *self.profiles]
        return sorted(names, key=lambda n: (self.flops_per_token(n), n in self.profiles))

    @property
    def student_width(self) -> str:
        return self.width_names[0]

    @property
    def full_width(self) -> str:
        return self.width_names[-1]

    def resolve_width(self, width: WidthSpec | None) -> tuple[int, ...]:
        """Turn a width name, FFN size, or per-layer list into one FFN size per layer.

        ``None`` means the full width. Any size in 1..ffn_dim is accepted, not only the named
        ones: every leading slice of the FFN is a valid model (MatFormer Mix'n'Match).
        """
        if width is None:
            return (self.ffn_dim,) * self.n_layer
        if isinstance(width, str) and width in self.profiles:
            return tuple(self.profiles[width])
        if isinstance(width, (str, int)) and not isinstance(width, bool):
            return (self._resolve_one(width),) * self.n_layer
        if isinstance(width, Sequence):
            if len(width) != self.n_layer:
                raise ValueError(f"per-layer width {list(width)!r} has {len(width)} entries; the model has {self.n_layer} layers")
            return tuple(self._resolve_one(w) for w in width)
        raise ValueError(f"width must be a name, an int or a per-layer list, got {width!r}")

    def _resolve_one(self, width: str | int) -> int:
        if isinstance(width, str):
            if width in self.widths:
                return self.widths[width]
            if width.isdigit():
                return self._resolve_one(int(width))
            raise ValueError(f"unknown width {width!r}; known: {[*self.width_names, *self.profiles]}")
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= self.ffn_dim:
            raise ValueError(f"width {width!r} is out of range 1..{self.ffn_dim}")
        return width

    def width_label(self, width: WidthSpec | None) -> str:
        """A short stable label for a width spec: its name when it has one, else the sizes."""
        sizes = self.resolve_width(width)
        if len(set(sizes)) == 1:
            for width_name, size in self.widths.items():
                if size == sizes[0]:
                    return width_name
            return str(sizes[0])
        for profile_name, profile in self.profiles.items():
            if tuple(profile) == sizes:
                return profile_name
        return "-".join(str(s) for s in sizes)

    def param_count(self, width: WidthSpec | None = None) -> int:
        """Parameters a forward at this width touches (tied LM head counted once)."""
        d = self.d_model
        if self.is_llama:
            kv = self.kv_heads * self.head_dim
            embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
            attention = d * d + 2 * d * kv + d * d + ((d + 2 * kv) if self.qkv_bias else 0)
            per_layer_fixed = 2 * d + attention  # 2 RMSNorms (weights only)
            ffn = sum(3 * d * m for m in self.resolve_width(width))
            return embeddings + self.n_layer * per_layer_fixed + ffn + d
        embeddings = self.vocab_size * d + self.n_ctx * d
        per_layer_fixed = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d)  # 2 LayerNorms + attention
        ffn = sum(2 * d * m + m + d for m in self.resolve_width(width))
        return embeddings + self.n_layer * per_layer_fixed + ffn + 2 * d

    def flops_per_token(self, width: WidthSpec | None = None, context: int | None = None) -> int:
        """Forward FLOPs per token: 2 x matmul weights used (incl. the LM head) + attention scores.

        ``context`` is the attended length (default: half the context window, the average over
        a full window). Embedding lookups, LayerNorms, biases and softmax are not counted.
        """
        d = self.d_model
        context = self.n_ctx // 2 if context is None else context
        attention_weights = 2 * d * d + 2 * d * self.kv_heads * self.head_dim  # q, o and the (grouped) k, v
        attention_scores = 2 * context * d  # q.k and attn.v, per layer
        ffn_matrices = 3 if self.is_llama else 2  # SwiGLU: gate, up, down
        ffn = sum(ffn_matrices * d * m for m in self.resolve_width(width))
        matmul_weights = self.n_layer * attention_weights + ffn + d * self.vocab_size
        return 2 * matmul_weights + 2 * self.n_layer * attention_scores

    def to_dict(self) -> dict:
        """The config.json mapping; a GPT-2 config leaves out the Llama-family keys, so GPT-2
        checkpoints stay readable by versions that predate them."""
        data = asdict(self)
        if not self.is_llama:
            for key in ("family", *LLAMA_ONLY_FIELDS):
                data.pop(key)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from a config.json mapping; unknown keys are an error, not silently dropped."""
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        return cls(**data)
