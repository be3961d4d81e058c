"""Hugging Face interop: export a width as a plain HF directory, import HF weights as a TA.

GPT-2 checkpoints export as ``GPT2LMHeadModel`` with ``n_inner`` = the width; Llama-family ones
(``family`` llama, qwen2, mistral) as ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` /
``MistralForCausalLM`` with ``intermediate_size`` = the width. An export loads offline with
``AutoModelForCausalLM`` / ``AutoTokenizer`` (and vLLM); its logits equal the elastic model's at
that width. Weights are written as safetensors only. ``transformers`` is imported lazily: the core
package does not need it to train or serve.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from matta.checkpoint import Checkpoint, replace_dir, save_checkpoint, sha256_file
from matta.config import ModelConfig, check_rope_scaling
from matta.llama import NestedLlama
from matta.model import NestedDecoder, NestedGPT
from matta.tokenizer import END_OF_TEXT, Tokenizer

EXPORT_INFO_FILE = "matta_export.json"
# Activations that are exactly GPT-2's tanh-approximated GELU.
_GELU_TANH = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a core dependency today
        raise ImportError("HF export/import needs `pip install transformers`") from exc
    return transformers


def gpt2_state_dict(model: NestedGPT, width: int) -> dict[str, torch.Tensor]:
    """The elastic model's weights at a uniform ``width``, in GPT-2's Conv1D (in, out) layout."""
    sd: dict[str, torch.Tensor] = {
        "transformer.wte.weight": model.wte.weight,
        "transformer.wpe.weight": model.wpe.weight,
        "transformer.ln_f.weight": model.ln_f.weight,
        "transformer.ln_f.bias": model.ln_f.bias,
    }
    for i, block in enumerate(model.h):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = block.ln_1.weight, block.ln_1.bias
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = block.ln_2.weight, block.ln_2.bias
        sd[p + "attn.c_attn.weight"] = block.attn.c_attn.weight.t()
        sd[p + "attn.c_attn.bias"] = block.attn.c_attn.bias
        sd[p + "attn.c_proj.weight"] = block.attn.c_proj.weight.t()
        sd[p + "attn.c_proj.bias"] = block.attn.c_proj.bias
        sd[p + "mlp.c_fc.weight"] = block.mlp.fc_weight[:width].t()  # (d, m)
        sd[p + "mlp.c_fc.bias"] = block.mlp.fc_bias[:width]
        sd[p + "mlp.c_proj.weight"] = block.mlp.proj_weight[:width]  # (m, d)
        sd[p + "mlp.c_proj.bias"] = block.mlp.proj_bias
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


def gpt2_config(config: ModelConfig, width: int):
    transformers = _require_transformers()
    return transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_ctx, n_embd=config.d_model, n_layer=config.n_layer,
        n_head=config.n_head, n_inner=width, activation_function="gelu_new",
        layer_norm_epsilon=config.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=config.eos_token_id, eos_token_id=config.eos_token_id, tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def hf_tokenizer(tokenizer: Tokenizer, n_ctx: int, bos_token_id: int | None = None,
                 chat_template: str | None = None):
    """Our tokenizer as a transformers fast tokenizer (saves tokenizer.json + tokenizer_config.json)."""
    transformers = _require_transformers()
    eos = tokenizer.eos_token
    bos = eos if bos_token_id is None else tokenizer.backend.id_to_token(bos_token_id)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend, bos_token=bos, eos_token=eos,
        unk_token=eos if eos == END_OF_TEXT else None, model_max_length=n_ctx,
    )
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    return hf_tok


# HF config classes and architectures of the Llama family, by matta family name.
LLAMA_FAMILY = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                "mistral": ("MistralConfig", "MistralForCausalLM")}


def llama_state_dict(model: NestedLlama, width: int) -> dict[str, torch.Tensor]:
    """The elastic Llama-family model's weights at a uniform ``width``, in HF's layout: width m is
    gate_proj/up_proj rows [:m] and down_proj columns [:m]."""
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    if model.lm_head_weight is not None:
        sd["lm_head.weight"] = model.lm_head_weight
    for i, block in enumerate(model.h):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = block.ln_1.weight
        sd[p + "post_attention_layernorm.weight"] = block.ln_2.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(block.attn, name)
            sd[p + f"self_attn.{name}.weight"] = linear.weight
            if linear.bias is not None:
                sd[p + f"self_attn.{name}.bias"] = linear.bias
        sd[p + "mlp.gate_proj.weight"] = block.mlp.gate_weight[:width]  # (m, d)
        sd[p + "mlp.up_proj.weight"] = block.mlp.up_weight[:width]  # (m, d)
        sd[p + "mlp.down_proj.weight"] = block.mlp.down_weight[:width].t()  # (d, m)
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


def llama_hf_config(config: ModelConfig, width: int):
    """The HF config (Llama / Qwen2 / Mistral, by ``config.family``) of one uniform width."""
    transformers = _require_transformers()
    config_class, architecture = LLAMA_FAMILY[config.family]
    if config.family == "qwen2" and not config.qkv_bias:
        raise ValueError("a qwen2 model always has q/k/v biases; this checkpoint has qkv_bias=False")
    if config.family != "qwen2" and config.qkv_bias:
        raise ValueError(f"HF {architecture} has no q/k/v-only biases; qkv_bias=True exports as family 'qwen2'")
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=width,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.n_ctx, rms_norm_eps=config.layer_norm_eps,
        rope_theta=float(config.rope_theta), rope_scaling=config.rope_scaling, hidden_act="silu",
        tie_word_embeddings=config.tie_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, attention_dropout=0.0, architectures=[architecture],
    )
    if config.family == "llama":
        kwargs.update(attention_bias=False, mlp_bias=False)
    else:
        kwargs.update(sliding_window=None)  # full attention over the whole context, as matta computes
    return getattr(transformers, config_class)(**kwargs)


def hf_model_at(model: NestedDecoder, size: int):
    """A transformers model of ``model``'s family holding its weights at FFN size ``size`` (eval mode)."""
    transformers = _require_transformers()
    config = model.config
    if config.is_llama:
        hf_model = getattr(transformers, LLAMA_FAMILY[config.family][1])(llama_hf_config(config, size))
        state = llama_state_dict(model, size)
    else:
        hf_model = transformers.GPT2LMHeadModel(gpt2_config(config, size))
        state = gpt2_state_dict(model, size)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # A tied LM head is the embedding; HF may also keep non-persistent attention-mask buffers.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)
               and not k.endswith("attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"HF {config.family} layout mismatch: missing {missing}, unexpected {unexpected}")
    hf_model.tie_weights()
    bos = config.eos_token_id if config.bos_token_id is None else config.bos_token_id
    hf_model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos, eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id,
    )
    return hf_model.eval()


def _add_legacy_rope_keys(path: Path, config: ModelConfig) -> None:
    """transformers 5 writes RoPE as ``rope_parameters``; readers on transformers 4 (vLLM's venv among
    them) look for ``rope_theta`` and ``rope_scaling`` and would silently take defaults: write both."""
    data = json.loads(path.read_text())
    data.setdefault("rope_theta", float(config.rope_theta))
    data.setdefault("rope_scaling", config.rope_scaling)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_width(ckpt: Checkpoint, width: str, out: str | Path) -> Path:
    """Write width ``width`` of ``ckpt`` as a HF directory of its family at ``out`` (atomically)."""
    config = ckpt.config
    if width in config.profiles:
        field = "intermediate_size" if config.is_llama else "n_inner"
        raise ValueError(f"width {width!r} is a per-layer Mix'n'Match profile {config.profiles[width]}; a HF "
                         f"{config.family} config has one {field} for every layer, so only uniform widths export: "
                         f"{config.width_names}")
    if width not in config.widths:
        raise ValueError(f"unknown width {width!r}; known: {config.width_names}")
    size = config.widths[width]
    out = Path(out)
    hf_model = hf_model_at(ckpt.model, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_model.save_pretrained(staging, safe_serialization=True)
        if config.is_llama:
            _add_legacy_rope_keys(staging / "config.json", config)
        hf_tokenizer(ckpt.tokenizer, config.n_ctx, config.bos_token_id, ckpt.chat_template).save_pretrained(staging)
        info = {
            "source_checkpoint": str(ckpt.path), "source_model": config.name, "width": width, "n_inner": size,
            "family": config.family,
            "source_weights_sha256": sha256_file(ckpt.path / "model.safetensors"),
        }
        (staging / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_hf_gpt2(path: str | Path):
    """Load a local HF causal-LM directory offline (safetensors only; never a pickle)."""
    transformers = _require_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; not a HF model directory")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path}: no .safetensors weights; matta does not load pickle (.bin) checkpoints")
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)


def load_hf_tokenizer(path: str | Path) -> Tokenizer:
    """The fast tokenizer of a HF directory as a matta Tokenizer."""
    transformers = _require_transformers()
    return _tokenizer_of(transformers.AutoTokenizer.from_pretrained(path, local_files_only=True), path)


def _tokenizer_of(hf_tok, path: str | Path) -> Tokenizer:
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{path}: needs a fast tokenizer (tokenizer.json)")
    return Tokenizer(backend, hf_tok.eos_token_id)


def load_hf_causal_lm(path: str | Path, tokenizer: Tokenizer):
    """A local HF causal LM used as a teacher; its vocabulary must equal the training data's."""
    model = load_hf_gpt2(path)
    teacher_vocab = load_hf_tokenizer(path).backend.get_vocab()
    if teacher_vocab != tokenizer.backend.get_vocab():
        raise ValueError(
            f"teacher {path} has a different vocabulary than the training data; prepare the data with "
            f"`matta data prepare --tokenizer {path}`"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def gpt2_as_nested(path: str | Path, widths: dict[str, int] | None = None,
                   name: str | None = None) -> tuple[NestedGPT, Tokenizer]:
    """Load a local HF GPT-2 directory as an in-memory :class:`NestedGPT` (full width = its FFN) and tokenizer.

    ``widths`` defaults to 1/8, 1/4, 1/2 and all of the FFN (s, m, l, ta). The narrower widths
    are only as good as the leading FFN units of the source: reorder them (``matta elastify``)
    or train with the ``matta`` recipe to make them good.
    """
    path = Path(path)
    hf_model = load_hf_gpt2(path)
    c = hf_model.config
    if c.model_type != "gpt2":
        raise ValueError(f"{path}: model_type {c.model_type!r}; only GPT-2 can be imported as a TA")
    if c.activation_function not in _GELU_TANH:
        raise ValueError(f"{path}: activation {c.activation_function!r} is not GPT-2's tanh GELU")
    ffn = c.n_inner or 4 * c.n_embd
    widths = widths or {"s": ffn // 8, "m": ffn // 4, "l": ffn // 2, "ta": ffn}
    if max(widths.values()) != ffn:
        raise ValueError(f"the widest width must equal the source FFN size {ffn}, got {widths}")
    tokenizer = load_hf_tokenizer(path)
    config = ModelConfig(
        vocab_size=c.vocab_size, n_ctx=c.n_positions, d_model=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        widths=widths, layer_norm_eps=float(c.layer_norm_epsilon), eos_token_id=tokenizer.eos_id,
        name=name or path.name,
    )
    model = NestedGPT(config)
    src = hf_model.state_dict()
    with torch.no_grad():
        model.wte.weight.copy_(src["transformer.wte.weight"])
        model.wpe.weight.copy_(src["transformer.wpe.weight"])
        model.ln_f.weight.copy_(src["transformer.ln_f.weight"])
        model.ln_f.bias.copy_(src["transformer.ln_f.bias"])
        for i, block in enumerate(model.h):
            p = f"transformer.h.{i}."
            block.ln_1.weight.copy_(src[p + "ln_1.weight"])
            block.ln_1.bias.copy_(src[p + "ln_1.bias"])
            block.ln_2.weight.copy_(src[p + "ln_2.weight"])
            block.ln_2.bias.copy_(src[p + "ln_2.bias"])
            block.attn.c_attn.weight.copy_(src[p + "attn.c_attn.weight"].t())
            block.attn.c_attn.bias.copy_(src[p + "attn.c_attn.bias"])
            block.attn.c_proj.weight.copy_(src[p + "attn.c_proj.weight"].t())
            block.attn.c_proj.bias.copy_(src[p + "attn.c_proj.bias"])
            block.mlp.fc_weight.copy_(src[p + "mlp.c_fc.weight"].t())
            block.mlp.fc_bias.copy_(src[p + "mlp.c_fc.bias"])
            block.mlp.proj_weight.copy_(src[p + "mlp.c_proj.weight"])
            block.mlp.proj_bias.copy_(src[p + "mlp.c_proj.bias"])
    return model.eval(), tokenizer


def import_hf(path: str | Path, out: str | Path, widths: dict[str, int] | None = None,
                name: str | None = None) -> Path:
    """Turn a local HF GPT-2, Llama, Qwen2 or Mistral directory into a matta checkpoint whose full
    width is its FFN (see :func:`gpt2_as_nested`, :func:`llama_as_nested`); a chat template comes along."""
    model, tokenizer, chat_template, source_format = hf_as_nested(path, widths, name)
    training = {"recipe": "import", "source": {"path": str(path), "format": source_format}}
    return save_checkpoint(out, model, tokenizer, training, chat_template=chat_template)


def llama_as_nested(path: str | Path, widths: dict[str, int] | None = None,
                    name: str | None = None) -> tuple[NestedLlama, Tokenizer, str | None]:
    """Load a local HF Llama / Qwen2 / Mistral directory as an in-memory :class:`NestedLlama` (full
    width = its FFN), its tokenizer and its chat template (None when it has none).

    ``widths`` defaults to 1/8, 1/4, 1/2 and all of the FFN (s, m, l, ta), as for GPT-2.
    """
    transformers = _require_transformers()
    path = Path(path)
    hf_model = load_hf_gpt2(path)
    c = hf_model.config
    if c.model_type not in LLAMA_FAMILY:
        raise ValueError(f"{path}: model_type {c.model_type!r} is not one of the Llama family {list(LLAMA_FAMILY)}")
    if c.hidden_act != "silu":
        raise ValueError(f"{path}: hidden_act {c.hidden_act!r}; the nested SwiGLU is silu-gated")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(c, flag, False):
            raise ValueError(f"{path}: {flag}=True is not supported (Llama-family checkpoints have none)")
    n_ctx = c.max_position_embeddings
    window = getattr(c, "sliding_window", None)
    if window is not None and (c.model_type == "mistral" or getattr(c, "use_sliding_window", False)):
        # Within the window, sliding-window attention is full causal attention: serve that much.
        n_ctx = min(n_ctx, window)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"{path}: head_dim {head_dim} x {c.num_attention_heads} heads != hidden_size "
                         f"{c.hidden_size}; matta needs head_dim = hidden_size / heads")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_theta = float(rope.pop("rope_theta", getattr(c, "rope_theta", 10000.0)))
    if not rope:
        rope = dict(getattr(c, "rope_scaling", None) or {})
    rope_scaling = None if rope.get("rope_type", rope.get("type", "default")) == "default" else rope
    try:
        check_rope_scaling(rope_scaling)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    ffn = c.intermediate_size
    widths = widths or {"s": ffn // 8, "m": ffn // 4, "l": ffn // 2, "ta": ffn}
    if max(widths.values()) != ffn:
        raise ValueError(f"the widest width must equal the source FFN size {ffn}, got {widths}")
    hf_tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer = _tokenizer_of(hf_tok, path)
    chat_template = hf_tok.chat_template if isinstance(hf_tok.chat_template, str) else None
    config = ModelConfig(
        family=c.model_type, vocab_size=c.vocab_size, n_ctx=n_ctx, d_model=c.hidden_size,
        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads,
        widths=widths, layer_norm_eps=float(c.rms_norm_eps), eos_token_id=tokenizer.eos_id,
        bos_token_id=hf_tok.bos_token_id, rope_theta=rope_theta, rope_scaling=rope_scaling,
        qkv_bias=c.model_type == "qwen2", tie_embeddings=bool(c.tie_word_embeddings), name=name or path.name,
    )
    model = NestedLlama(config)
    src = hf_model.state_dict()
    with torch.no_grad():
        model.wte.weight.copy_(src["model.embed_tokens.weight"])
        model.ln_f.weight.copy_(src["model.norm.weight"])
        if model.lm_head_weight is not None:
            model.lm_head_weight.copy_(src["lm_head.weight"])
        for i, block in enumerate(model.h):
            p = f"model.layers.{i}."
            block.ln_1.weight.copy_(src[p + "input_layernorm.weight"])
            block.ln_2.weight.copy_(src[p + "post_attention_layernorm.weight"])
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(block.attn, proj)
                linear.weight.copy_(src[p + f"self_attn.{proj}.weight"])
                if linear.bias is not None:
                    linear.bias.copy_(src[p + f"self_attn.{proj}.bias"])
            block.mlp.gate_weight.copy_(src[p + "mlp.gate_proj.weight"])
            block.mlp.up_weight.copy_(src[p + "mlp.up_proj.weight"])
            block.mlp.down_weight.copy_(src[p + "mlp.down_proj.weight"].t())
    return model.eval(), tokenizer, chat_template


def hf_model_type(path: str | Path) -> str:
    """The ``model_type`` of a local HF directory's config.json."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path}: no config.json; not a HF model directory")
    try:
        return str(json.loads(config_path.read_text()).get("model_type"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{config_path}: not a JSON object ({exc})") from exc


def hf_as_nested(path: str | Path, widths: dict[str, int] | None = None,
                 name: str | None = None) -> tuple[NestedDecoder, Tokenizer, str | None, str]:
    """Any supported local HF directory (GPT-2, Llama, Qwen2, Mistral) as a nested model: the model,
    tokenizer, chat template (or None) and source format (``hf-gpt2``, ``hf-llama``, ...)."""
    model_type = hf_model_type(path)
    if model_type == "gpt2":
        model, tokenizer = gpt2_as_nested(path, widths, name)
        return model, tokenizer, None, "hf-gpt2"
    if model_type in LLAMA_FAMILY:
        model, tokenizer, chat_template = llama_as_nested(path, widths, name)
        return model, tokenizer, chat_template, f"hf-{model_type}"
    raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported: ['gpt2', *{list(LLAMA_FAMILY)}]")
