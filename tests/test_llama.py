"""The nested Llama family against transformers: tiny random-init HF Llama / Qwen2 / Mistral models
(GQA, tied and untied embeddings, Qwen2's q/k/v biases, RoPE scaling) imported, exported at every
width and compared logit for logit; greedy through the engine equals HF generate on the export."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
import torch
import transformers

from matta.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from matta.config import ModelConfig
from matta.hf import LLAMA_FAMILY, export_width, import_hf, llama_as_nested
from matta.kv_cache import StaticKVCache
from matta.llama import NestedLlama, build_model
from matta.model import NestedGPT
from matta.tokenizer import Tokenizer
from serving.engine.inproc import Engine
from serving.messages import Sampling
from tests.helpers import CHAT_TEMPLATE, FAMILIES, make_hf_dir, tiny_hf_tokenizer
from tests.helpers import HF_WIDTHS as WIDTHS

TOL = dict(atol=1e-4, rtol=0)

@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory):
    """(HF source model, imported matta checkpoint path) per family variant."""
    root = tmp_path_factory.mktemp(request.param)
    src, hf_model = make_hf_dir(root / "hf", request.param)
    return request.param, hf_model, import_hf(src, root / "ckpt", widths=WIDTHS)


def sliced_reference(hf_model, width: int):
    """An independent reference for a width: the HF model of that family with intermediate_size =
    width, its weights sliced from the source as Gemma 3n slices E2B from E4B (gate/up rows, down columns)."""
    config = hf_model.config.__class__(**{**hf_model.config.to_dict(), "intermediate_size": width})
    ref = hf_model.__class__(config).eval()
    state = {}
    for name, tensor in hf_model.state_dict().items():
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            tensor = tensor[:width]
        elif name.endswith("down_proj.weight"):
            tensor = tensor[:, :width]
        state[name] = tensor
    ref.load_state_dict(state)
    return ref


def test_every_width_equals_transformers_sliced_and_exported(imported, tmp_path):
    _, hf_model, ckpt_path = imported
    ckpt = load_checkpoint(ckpt_path)
    assert isinstance(ckpt.model, NestedLlama) and ckpt.config.family == hf_model.config.model_type
    assert ckpt.config.kv_heads == hf_model.config.num_key_value_heads
    x = torch.randint(0, ckpt.config.vocab_size, (2, 40))  # past llama3's 16-position original window
    seen = []
    for name, size in WIDTHS.items():
        out = export_width(ckpt, name, tmp_path / name)
        exported = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        assert exported.config.intermediate_size == size
        assert exported.config.architectures == [LLAMA_FAMILY[ckpt.config.family][1]]
        with torch.no_grad():
            ours = ckpt.model(x, width=name).logits
            torch.testing.assert_close(ours, exported(x).logits, **TOL)
            torch.testing.assert_close(ours, sliced_reference(hf_model, size)(x).logits, **TOL)
        seen.append(ours)
    assert all((a - b).abs().max() > 1e-2 for a, b in itertools.pairwise(seen))  # widths differ
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ta", local_files_only=True)
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>" and tok.chat_template == CHAT_TEMPLATE


def test_padding_cache_and_mixed_rows_equal_the_plain_forward(imported):
    _, _, ckpt_path = imported
    model = load_checkpoint(ckpt_path).model
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    with torch.no_grad():
        full = {w: model(ids, width=w).logits for w in ("s", "ta")}
        # Left-padded rows compute what the unpadded sequence would (positions count real tokens).
        padded = torch.cat([torch.zeros(3, 4, dtype=torch.long), ids], dim=1)
        mask = torch.cat([torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 12, dtype=torch.long)], dim=1)
        torch.testing.assert_close(model(padded, width="s", attention_mask=mask).logits[:, 4:], full["s"], **TOL)
        # Prefill 8, then decode 4 one token at a time through a static cache.
        out = model(ids[:, :8], width="ta", use_cache=True)
        cache = StaticKVCache.from_list(out.past_key_values, capacity=9)  # grows as it must
        assert cache.keys[0].shape[1] == model.config.kv_heads  # the cache holds KV heads, not query heads
        steps = [model(ids[:, t : t + 1], width="ta", past_key_values=cache, use_cache=True,
                       attention_mask=torch.ones(3, t + 1, dtype=torch.long)).logits for t in range(8, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full["ta"][:, 8:], **TOL)
        mixed = model(ids, row_widths=["ta", "s", "ta"]).logits
        torch.testing.assert_close(mixed[[0, 2]], full["ta"][[0, 2]], **TOL)
        torch.testing.assert_close(mixed[1], full["s"][1], **TOL)


def test_engine_greedy_equals_hf_generate_on_the_export(imported, tmp_path):
    """The unchanged engine serves the Llama family through the model's forward interface alone:
    greedy tokens for rows of several widths decoding together equal HF generate on each export."""
    _, _, ckpt_path = imported
    ckpt = load_checkpoint(ckpt_path)
    tokenizer = ckpt.tokenizer
    prompts = [("Now is the winter", "ta"), ("To be, or not to be", "s"), ("Friends, Romans", "m")]
    n = 12
    engine = Engine(ckpt.model, tokenizer, max_batch=8, max_queue=16)

    async def collect(stream):
        tokens = []
        async for _, event in stream:
            tokens += event.token_ids
        return tokens

    async def main():
        streams = [engine.submit([tokenizer.encode(p)], w, Sampling(max_tokens=n, temperature=0.0))
                   for p, w in prompts]
        engine.start()  # queued before the first step: the widths decode in one mixed batch
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        outputs = asyncio.run(main())
    finally:
        engine.stop()
    for (text, width), tokens in zip(prompts, outputs, strict=True):
        hf = transformers.AutoModelForCausalLM.from_pretrained(export_width(ckpt, width, tmp_path / width),
                                                               local_files_only=True).eval()
        ids = torch.tensor([tokenizer.encode(text)])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        assert tokens == want[0, ids.shape[1]:].tolist(), (text, width)
    assert len(set(map(tuple, outputs))) == len(outputs)  # not one repeated token for everyone


def test_checkpoint_round_trip_keeps_family_eos_and_chat_template(imported, tmp_path):
    _, _, ckpt_path = imported
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.chat_template == CHAT_TEMPLATE
    assert ckpt.tokenizer.eos_token == "</s>" and ckpt.config.eos_token_id == ckpt.tokenizer.eos_id
    data = json.loads((ckpt_path / "config.json").read_text())
    assert data["family"] in LLAMA_FAMILY and "n_kv_head" in data
    again = load_checkpoint(save_checkpoint(tmp_path / "again", ckpt.model, ckpt.tokenizer, {"recipe": "test"},
                                            chat_template=ckpt.chat_template))
    x = torch.randint(0, ckpt.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again.model(x, width="m").logits, ckpt.model(x, width="m").logits, rtol=0, atol=0)
    (tmp_path / "again" / "chat_template.jinja").write_text("tampered")
    with pytest.raises(CheckpointError, match="chat_template.jinja: sha256 mismatch"):
        load_checkpoint(tmp_path / "again")


def test_gpt2_config_json_has_no_llama_keys_and_build_model_picks_the_class():
    gpt2 = ModelConfig(widths={"s": 8, "ta": 16})
    assert "family" not in gpt2.to_dict() and "n_kv_head" not in gpt2.to_dict()
    assert isinstance(build_model(gpt2), NestedGPT)
    llama = ModelConfig(family="qwen2", n_kv_head=1, qkv_bias=True, widths={"s": 8, "ta": 16})
    assert isinstance(build_model(llama), NestedLlama)
    assert ModelConfig.from_dict(llama.to_dict()) == llama
    # GQA and SwiGLU in the counts: 3 FFN matrices; k, v at kv_heads x head_dim.
    assert llama.flops_per_token("ta") - llama.flops_per_token("s") == 2 * 3 * 128 * (16 - 8) * llama.n_layer
    assert llama.param_count() == sum(p.numel() for p in build_model(llama).parameters())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"n_kv_head": 3}, "n_kv_head must be a positive int dividing n_head 2, got 3"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks numeric"),
    ({"family": "gemma"}, "unknown family 'gemma'"),
])
def test_config_refuses_bad_llama_settings_quoting_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"family": "llama", "widths": {"s": 8, "ta": 16}, **overrides})


def test_gpt2_config_refuses_llama_only_keys():
    with pytest.raises(ValueError, match=r"\['n_kv_head'\] apply to the Llama family only"):
        ModelConfig(n_kv_head=1)


def test_import_refuses_unsupported_rope_scaling_and_sliding_window_clamps_context(tmp_path):
    src, _ = make_hf_dir(tmp_path / "hf", "llama-mha-tied")
    data = json.loads((src / "config.json").read_text())
    data["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        llama_as_nested(src)
    mistral, _ = make_hf_dir(tmp_path / "mistral", "mistral-gqa-untied-linear", n_ctx=128)
    data = json.loads((mistral / "config.json").read_text())
    data["sliding_window"] = 32
    (mistral / "config.json").write_text(json.dumps(data))
    model, _, _ = llama_as_nested(mistral, widths=WIDTHS)
    assert model.config.n_ctx == 32  # within the window, sliding-window attention is full attention


def test_mixnmatch_profile_export_is_refused_clearly(imported, tmp_path):
    _, _, ckpt_path = imported
    ckpt = load_checkpoint(ckpt_path)
    config = ModelConfig.from_dict({**ckpt.config.to_dict(), "profiles": {"mix": [16, 128]}})
    ckpt.config = config
    ckpt.model.config = config
    with pytest.raises(ValueError, match="one intermediate_size for every layer"):
        export_width(ckpt, "mix", tmp_path / "mix")


def test_tokenizer_refuses_an_eos_id_outside_its_vocabulary():
    with pytest.raises(ValueError, match="end-of-text id 9999 is not in the tokenizer's vocabulary"):
        Tokenizer(tiny_hf_tokenizer().backend_tokenizer, 9999)
