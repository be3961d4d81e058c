"""``/v1/chat/completions`` against references: prompt text equals transformers' apply_chat_template
for the same messages; greedy answers through a real server (port 0) and the official ``openai``
client, with and without stream, equal HF generate on the export of the width served; ``matta
route`` forwards chat to its backends; a model without a template gets a clear 400."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
import transformers

from benchmarks.harness import ServerThread, metric
from matta.checkpoint import load_checkpoint
from matta.hf import export_width, import_hf
from serving.api.chat_template import BUILTIN_TEMPLATES, ChatTemplate, ChatTemplateError
from serving.api.route import build_route_app
from serving.app import build_app
from serving.settings import RouteSettings, ServeSettings
from tests.helpers import HF_WIDTHS, make_hf_dir, tiny_hf_tokenizer

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
         "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<|im_start|>assistant\n' }}{% endif %}")
# Mistral's: block tags on their own lines (trim_blocks / lstrip_blocks matter) and raise_exception.
MISTRAL = """{{ bos_token }}{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + message['content'] + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ message['content'] + eos_token }}
    {% endif %}
{% endfor %}"""
TOJSON = "{% for m in messages %}{{ m | tojson }}{{ m['content'] | tojson(indent=2) }}{% endfor %}"
MESSAGES = [{"role": "user", "content": "Now is the winter"}, {"role": "assistant", "content": " of our discontent"},
            {"role": "user", "content": "To be, or not — «to be»?"}]


@pytest.mark.parametrize("source", [LLAMA3, QWEN2, MISTRAL, TOJSON, BUILTIN_TEMPLATES["chatml"].read_text()],
                         ids=["llama3", "qwen2", "mistral", "tojson", "chatml"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_prompt_text_equals_apply_chat_template(source, add_generation_prompt):
    hf_tok = tiny_hf_tokenizer()
    template = ChatTemplate(source, {"bos_token": hf_tok.bos_token, "eos_token": hf_tok.eos_token})
    want = hf_tok.apply_chat_template(MESSAGES, chat_template=source, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    assert template.render(MESSAGES, add_generation_prompt=add_generation_prompt) == want


def test_template_errors_are_chat_template_errors_quoting_the_cause():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate(MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}).render(MESSAGES[:2] + MESSAGES[1:2])
    with pytest.raises(ChatTemplateError, match="not a valid jinja template"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError):  # the sandbox: no attribute tricks
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(MESSAGES)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    """An imported tiny Qwen2 (GQA, q/k/v biases) with a ChatML-like template, and its exports per width."""
    root = tmp_path_factory.mktemp("chat")
    src, _ = make_hf_dir(root / "hf", "qwen2-gqa-bias-tied", n_ctx=256)
    path = import_hf(src, root / "ckpt", widths=HF_WIDTHS, name="tiny-qwen")
    ckpt = load_checkpoint(path)
    exports = {w: export_width(ckpt, w, root / f"export-{w}") for w in ("s", "ta")}
    return ckpt, exports


def hf_greedy_text(export_dir, prompt_ids: list[int], n: int) -> str:
    """HF generate on an export, decoded as the server decodes (the end-of-text token has no text)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_dir, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    ids = torch.tensor([prompt_ids])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)[0, len(prompt_ids):]
    return tok.decode([t for t in out.tolist() if t != tok.eos_token_id and t < len(tok)])


def rendered_ids(ckpt, messages) -> list[int]:
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt.path.parent / "export-ta", local_files_only=True)
    return hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_openai_client_chat_with_and_without_stream_equals_hf_generate(llama_ckpt):
    ckpt, exports = llama_ckpt
    settings = ServeSettings(checkpoint=ckpt.path, device="cpu", engine="inproc", max_batch=8, threads=1)
    messages = [{"role": "system", "content": "Speak as Hamlet."}, {"role": "user", "content": "To be, or not to be"}]
    prompt_ids = rendered_ids(ckpt, messages)
    with ServerThread(build_app(settings)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for model_id, width in (("tiny-qwen", "ta"), ("tiny-qwen:s", "s")):
            raw = client.chat.completions.with_raw_response.create(model=model_id, messages=messages, max_tokens=10,
                                                                   temperature=0, seed=1, user="u1")
            assert raw.headers["x-matta-width"] == width and raw.headers["x-request-id"]
            answer = raw.parse()
            assert answer.object == "chat.completion" and answer.id == raw.headers["x-request-id"]
            choice = answer.choices[0]
            assert choice.message.role == "assistant"
            assert choice.message.content == hf_greedy_text(exports[width], prompt_ids, 10)
            assert answer.usage.prompt_tokens == len(prompt_ids)
            assert choice.finish_reason in ("stop", "length")
            chunks = list(client.chat.completions.create(model=model_id, messages=messages, max_completion_tokens=10,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
            assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
            assert all(c.object == "chat.completion.chunk" for c in chunks)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert content == choice.message.content
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
        # The width extension, logprobs and stop apply as on completions.
        lp = client.chat.completions.create(model="tiny-qwen", messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=2, extra_body={"width": "s"})
        entries = lp.choices[0].logprobs.content
        assert len(entries) == lp.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)
        assert all(e.logprob <= 0 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)
        text = lp.choices[0].message.content
        if len(text) > 2:
            stopped = client.chat.completions.create(model="tiny-qwen:s", messages=messages, max_tokens=6,
                                                     temperature=0, stop=[text[1:3]])
            assert stopped.choices[0].message.content == text[: text.index(text[1:3])]
            assert stopped.choices[0].finish_reason == "stop"
        bad = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny-qwen", "messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        bad = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny-qwen", "messages": messages,
                                                                    "ttft_slo_ms": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "ttft_slo_ms"
        slo = httpx.post(f"{server.url}/v1/chat/completions", json={
            "model": "tiny-qwen", "messages": messages, "max_tokens": 2, "ttft_slo_ms": 60000, "tpot_slo_ms": 60000})
        assert slo.status_code == 200 and slo.json()["object"] == "chat.completion"
        unknown = httpx.post(f"{server.url}/v1/chat/completions",
                             json={"model": "tiny-qwen:xl", "messages": messages})
        assert unknown.status_code == 404
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric(metrics, "matta_requests_total", width="s", status="200") >= 3  # chat counts as completions


def test_a_model_without_a_template_gets_a_clear_400_and_chatml_serves_it(checkpoint_512, tokenizer):
    model, path = checkpoint_512
    messages = [{"role": "user", "content": "Now is the winter"}]
    with ServerThread(build_app(ServeSettings(checkpoint=path, device="cpu", engine="inproc", threads=1))) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": messages})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "no_chat_template" and "--chat-template" in error["message"]
    settings = ServeSettings(checkpoint=path, device="cpu", engine="inproc", threads=1, chat_template="chatml")
    with ServerThread(build_app(settings)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="tiny:m", messages=messages, max_tokens=8, temperature=0)
    prompt = "<|im_start|>user\nNow is the winter<|im_end|>\n<|im_start|>assistant\n"
    tokens = model.generate_greedy(tokenizer.encode(prompt), 8, width="m")
    assert answer.choices[0].message.content == tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])
    assert answer.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_matta_route_forwards_chat_to_its_backends(llama_ckpt):
    ckpt, exports = llama_ckpt
    messages = [{"role": "user", "content": "Friends, Romans"}]
    prompt_ids = rendered_ids(ckpt, messages)
    backends = {w: ServerThread(build_app(ServeSettings(checkpoint=ckpt.path, device="cpu", engine="inproc", threads=1,
                                                        policy=f"fixed:{w}"))) for w in ("s", "ta")}
    with backends["s"] as s, backends["ta"] as ta:
        settings = RouteSettings.model_validate({
            "model": "tiny-qwen", "checkpoint": str(ckpt.path),
            "backends": [{"width": "s", "url": s.url, "model": "tiny-qwen:s"},
                         {"width": "ta", "url": ta.url, "model": "tiny-qwen:ta"}]})
        with ServerThread(build_route_app(settings)) as proxy:
            client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
            for model_id, width in (("tiny-qwen:s", "s"), ("tiny-qwen", "ta")):
                raw = client.chat.completions.with_raw_response.create(model=model_id, messages=messages,
                                                                       max_tokens=8, temperature=0)
                assert raw.headers["x-matta-width"] == width
                assert raw.parse().choices[0].message.content == hf_greedy_text(exports[width], prompt_ids, 8)
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="tiny-qwen:s", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices)
            assert streamed == hf_greedy_text(exports["s"], prompt_ids, 8)
