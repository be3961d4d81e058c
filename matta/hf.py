"""Hugging Face interop: export a width as a plain GPT-2 directory, import GPT-2 weights as a TA.

An export loads offline with ``AutoModelForCausalLM`` / ``AutoTokenizer`` (and vLLM) as
``GPT2LMHeadModel`` with ``n_inner`` = the width; its logits equal the elastic model's at that
width. Weights are written as safetensors only. ``transformers`` is imported lazily: the core
package does not need it to train or serve.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from matta.checkpoint import Checkpoint, replace_dir, save_checkpoint, sha256_file
from matta.config import ModelConfig
from matta.model import NestedGPT
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


def hf_tokenizer(tokenizer: Tokenizer, n_ctx: int):
    """Our tokenizer as a transformers fast tokenizer (saves tokenizer.json + tokenizer_config.json)."""
    transformers = _require_transformers()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT, model_max_length=n_ctx,
    )


def export_width(ckpt: Checkpoint, width: str, out: str | Path) -> Path:
    """Write width ``width`` of ``ckpt`` as a HF GPT-2 directory at ``out`` (atomically)."""
    transformers = _require_transformers()
    config = ckpt.config
    if width in config.profiles:
        raise ValueError(f"width {width!r} is a per-layer Mix'n'Match profile {config.profiles[width]}; a HF GPT-2 "
                         f"has one n_inner for every layer, so only uniform widths export: {config.width_names}")
    if width not in config.widths:
        raise ValueError(f"unknown width {width!r}; known: {config.width_names}")
    size = config.widths[width]
    out = Path(out)
    hf_config = gpt2_config(config, size)
    hf_model = transformers.GPT2LMHeadModel(hf_config)
    missing, unexpected = hf_model.load_state_dict(gpt2_state_dict(ckpt.model, size), strict=False)
    # The LM head is tied to wte; HF may also keep non-persistent attention-mask buffers.
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith("attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 layout mismatch: missing {missing}, unexpected {unexpected}")
    hf_model.tie_weights()
    hf_model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.eos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_model.save_pretrained(staging, safe_serialization=True)
        hf_tokenizer(ckpt.tokenizer, config.n_ctx).save_pretrained(staging)
        info = {
            "source_checkpoint": str(ckpt.path), "source_model": config.name, "width": width, "n_inner": size,
            "source_weights_sha256": sha256_file(ckpt.path / "model.safetensors"),
        }
        (staging / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_hf_gpt2(path: str | Path):
    """Load a local GPT-2 directory offline (safetensors only; never a pickle)."""
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
    hf_tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{path}: needs a fast tokenizer (tokenizer.json)")
    return Tokenizer(backend)


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


def import_gpt2(path: str | Path, out: str | Path, widths: dict[str, int] | None = None,
                name: str | None = None) -> Path:
    """Turn a local HF GPT-2 directory into a matta checkpoint whose full width is its FFN (see :func:`gpt2_as_nested`)."""
    model, tokenizer = gpt2_as_nested(path, widths, name)
    training = {"recipe": "import", "source": {"path": str(path), "format": "hf-gpt2"}}
    return save_checkpoint(out, model, tokenizer, training)
