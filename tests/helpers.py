"""Helpers the test modules share (fixtures live in conftest.py; servers and load clients, which the
benchmarks share too, in benchmarks/harness.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch
import transformers
import yaml
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from matta.config import ModelConfig
from matta.hf import LLAMA_FAMILY

SERVED_N_CTX = 512  # long enough that a generation outlives a cancel or a burst of requests


REPO = Path(__file__).resolve().parents[1]


SAMPLE_TEXT = """
Now is the winter of our discontent made glorious summer by this sun of York;
and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.
"""


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=320, n_ctx=64, d_model=64, n_layer=3, n_head=2,
                  widths={"s": 32, "m": 64, "l": 128, "ta": 256}, name="tiny")
    values.update(overrides)
    return ModelConfig(**values)


def sharpen(model):
    """Scale a random model's weights up so its greedy text varies with the context and the width.

    At GPT-2 init a tiny random model repeats one token forever, which would make "batched
    equals alone" checks vacuous.
    """
    with torch.no_grad():
        model.wte.weight.mul_(3)
        model.wpe.weight.mul_(3)
        for block in model.h:
            for weight in (block.attn.c_attn.weight, block.attn.c_proj.weight, block.mlp.fc_weight,
                           block.mlp.proj_weight):
                weight.mul_(8)
    return model


WIDTHS = ["s", "m", "l", "ta"]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


CONFIG = {
    "name": "width-test", "salt": "2026-11", "unit": "user",
    "arms": [{"name": "control", "weight": 50, "policy": {"kind": "fixed", "width": "ta"}},
             {"name": "treatment", "weight": 50, "policy": {"kind": "fixed", "width": "s"}}],
}


def write_config(path, config=CONFIG):
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def rows(db, table="exposures"):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
    finally:
        conn.close()


# --- tiny random-init HF Llama-family models (tests/test_llama.py, tests/test_chat.py) ----------------

HF_WIDTHS = {"s": 16, "m": 48, "l": 96, "ta": 128}  # of the tiny HF models: intermediate_size 128
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# name -> (HF config class, config kwargs): GQA and not, tied and untied, biases, rope scaling.
FAMILIES = {
    "llama-gqa-untied-llama3": ("LlamaConfig", dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama-mha-tied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2-gqa-bias-tied": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1e6)),
    "mistral-gqa-untied-linear": ("MistralConfig", dict(
        num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def tiny_hf_tokenizer():
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([SAMPLE_TEXT] * 4, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                chat_template=CHAT_TEMPLATE)


def make_hf_dir(path, kind: str, n_ctx: int = 128, seed: int = 0):
    """A random-init HF model of ``kind`` (FAMILIES), sharpened so greedy text varies, saved with a tokenizer;
    the embedding is padded past the tokenizer (as real checkpoints do, and AutoTokenizer may add a token)."""
    config_class, extra = FAMILIES[kind]
    hf_tok = tiny_hf_tokenizer()
    config = getattr(transformers, config_class)(
        vocab_size=len(hf_tok) + 12, hidden_size=64, intermediate_size=HF_WIDTHS["ta"], num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=n_ctx, rms_norm_eps=1e-6,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, LLAMA_FAMILY[config.model_type][1])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # not all ones: parity covers the norm weights
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "embed" in name or "lm_head" in name:
                p.mul_(3)
            else:
                p.mul_(8)  # at init a tiny random model repeats one token forever
    model.save_pretrained(path, safe_serialization=True)
    hf_tok.save_pretrained(path)
    return path, model


async def generate_tokens(engine, cases, params) -> list[list[int]]:
    """The token ids an engine generates for each (prompt text, width) case, all submitted at once."""
    streams = [engine.submit([engine.tokenizer.encode(p)], w, params) for p, w in cases]
    results = []
    for stream in streams:
        tokens = []
        async for _, out in stream:
            tokens += out.token_ids
        results.append(tokens)
    return results


def assert_greedy_up_to_rounding(model, prompt: list[int], tokens: list[int], width, tolerance: float) -> None:
    """Each of ``tokens`` is, on the tokens before it, ``model``'s top logit at ``width`` or within
    ``tolerance`` of it (teacher forced in one forward). For low precision, where rounding differs
    between batch sizes and kernels (bf16 on a CPU without native bf16 matmuls), so a near-tie may
    break either way and exact text equality with the model alone is not a property. Not vacuous:
    at most positions the runner-up is more than ``tolerance`` behind, so a token from another
    width or a wrong cache fails."""
    with torch.inference_mode():
        ids = torch.tensor([list(prompt) + list(tokens)], device=model.wte.weight.device)
        logits = model(ids, width=width).logits[0, len(prompt) - 1:-1].float()
    top2 = logits.topk(2, dim=-1).values
    chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
    gaps = (top2[:, 0] - chosen).tolist()
    assert max(gaps) <= tolerance, f"token {gaps.index(max(gaps))} is {max(gaps):.3f} below the top logit"
    decisive = sum(g > tolerance for g in (top2[:, 0] - top2[:, 1]).tolist())
    assert decisive >= len(tokens) / 2, f"only {decisive} of {len(tokens)} positions decide beyond {tolerance}"
