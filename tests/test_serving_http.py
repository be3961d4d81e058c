"""The OpenAI-compatible server end to end: a real uvicorn on port 0, the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from benchmarks.harness import ServerThread, metric
from matta.model import NestedGPT
from serving.app import build_app
from serving.settings import ServeSettings
from tests.helpers import SERVED_N_CTX

N_CTX = SERVED_N_CTX
WIDTHS = ["s", "m", "l", "ta"]


@dataclass
class Served:
    url: str
    app: object
    model: NestedGPT
    tokenizer: object

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    @property
    def engine(self):
        return self.app.state.engine


@pytest.fixture(scope="module")
def served(checkpoint_512, tokenizer):
    model, path = checkpoint_512
    app = build_app(ServeSettings(checkpoint=path, max_batch=32, max_queue=64, device="cpu"))
    with ServerThread(app) as server:
        yield Served(server.url, app, model, tokenizer)


def expected_text(served, prompt, n, width):
    """What the model's own greedy decode says, as completion text (end-of-text is not text)."""
    tokens = served.model.generate_greedy(served.tokenizer.encode(prompt), n, width=width)
    return served.tokenizer.decode([t for t in tokens if t != served.tokenizer.eos_id]), len(tokens)


def test_models_lists_the_routed_id_and_one_pinned_id_per_width(served):
    ids = [m.id for m in served.client().models.list().data]
    assert ids == ["tiny"] + [f"tiny:{w}" for w in WIDTHS]


@pytest.mark.parametrize("width", WIDTHS)
def test_greedy_completion_equals_the_models_own_greedy_decode(served, width):
    raw = served.client().completions.with_raw_response.create(
        model=f"tiny:{width}", prompt="Now is the winter", max_tokens=20, temperature=0)
    completion = raw.parse()
    text, n_tokens = expected_text(served, "Now is the winter", 20, width)
    assert raw.headers["x-matta-width"] == width
    assert completion.choices[0].text == text
    assert completion.usage.completion_tokens == n_tokens
    assert completion.usage.prompt_tokens == len(served.tokenizer.encode("Now is the winter"))


def test_the_routed_model_uses_the_policy_and_the_width_field_pins(served):
    client = served.client()
    routed = client.completions.with_raw_response.create(model="tiny", prompt="To be", max_tokens=3, temperature=0)
    assert routed.headers["x-matta-width"] == "ta"  # default policy: the full width
    pinned = client.completions.with_raw_response.create(model="tiny", prompt="To be", max_tokens=3, temperature=0,
                                                         extra_body={"width": "s"})
    assert pinned.headers["x-matta-width"] == "s"
    assert pinned.parse().choices[0].text == expected_text(served, "To be", 3, "s")[0]


def test_streaming_yields_the_same_text_and_names_the_width(served):
    client = served.client()
    with client.completions.with_streaming_response.create(model="tiny:m", prompt="Friends, Romans", max_tokens=25,
                                                           temperature=0, stream=True) as response:
        assert response.headers["x-matta-width"] == "m"
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text(served, "Friends, Romans", 25, "m")[0]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    streamed = client.completions.create(model="tiny:m", prompt="Friends, Romans", max_tokens=25, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "".join(c["choices"][0]["text"] for c in chunks)


def test_a_list_of_prompts_gets_one_choice_each(served):
    prompts = ["Now is the winter", "To be, or not to be", "lend me your ears"]
    completion = served.client().completions.create(model="tiny:l", prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, completion.choices, strict=True):
        assert choice.text == expected_text(served, prompt, 8, "l")[0]
    ids = served.tokenizer.encode(prompts[0])
    by_ids = served.client().completions.create(model="tiny:l", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == completion.choices[0].text


@pytest.mark.parametrize("max_tokens", [0, 4])
def test_echo_logprobs_equal_the_models_log_softmax(served, max_tokens):
    prompt = "To be, or not to be, that is the question"
    ids = served.tokenizer.encode(prompt)
    completion = served.client().completions.create(model="tiny:s", prompt=prompt, max_tokens=max_tokens,
                                                    temperature=0, echo=True, logprobs=2)
    choice = completion.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + completion.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # Score prompt + completion in one forward: every returned logprob must match the model's.
    generated = served.model.generate_greedy(ids, max_tokens, width="s") if max_tokens else []
    full = ids + generated
    logits = served.model(torch.tensor([full]), width="s").logits[0]
    want = torch.log_softmax(logits, dim=-1)[torch.arange(len(full) - 1), full[1:]]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-4, rtol=0)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]


def test_32_concurrent_mixed_width_requests_return_what_each_returns_alone(served):
    prompts = ["Now is the winter of", "To be, or not", "Friends, Romans, countrymen", "the slings and arrows",
               "and all the clouds", "I come to bury Caesar", "whether 'tis nobler", "a sea of troubles"]
    requests = []
    for i in range(32):
        kwargs = dict(model=f"tiny:{WIDTHS[i % 4]}", prompt=prompts[i % 8] + " " * (i // 8), max_tokens=6 + i % 11)
        # Three in four greedy; the rest sampled with a seed, which must be just as reproducible.
        kwargs.update(temperature=0) if i % 4 else kwargs.update(temperature=0.8, top_p=0.95, seed=i)
        requests.append(kwargs)
    client = served.client()
    alone = [client.completions.create(**kw).choices[0].text for kw in requests]

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0) as aclient:
            results = await asyncio.gather(*(aclient.completions.create(**kw) for kw in requests))
        return [r.choices[0].text for r in results]

    assert asyncio.run(together()) == alone
    assert len(set(alone)) > 16  # the outputs really differ, so equality means something


def test_a_cancelled_stream_frees_its_slot(served):
    engine = served.engine
    before = engine.stats().cancelled
    body = {"model": "tiny:ta", "prompt": "Now", "max_tokens": N_CTX - 10, "temperature": 0, "stream": True}
    with httpx.Client(base_url=served.url, timeout=30) as http, http.stream("POST", "/v1/completions",
                                                                          json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
        assert engine.stats().running == 1
    deadline = time.monotonic() + 5
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.005)
    stats = engine.stats()
    assert stats.running == 0
    assert stats.cancelled == before + 1


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(served):
    engine = served.engine
    before = engine.stats().cancelled
    body = {"model": "tiny:ta", "prompt": "Now", "max_tokens": N_CTX - 10, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.1))
    deadline = time.monotonic() + 5
    while (engine.stats().running or engine.stats().cancelled == before) and time.monotonic() < deadline:
        time.sleep(0.005)
    stats = engine.stats()
    assert (stats.running, stats.cancelled) == (0, before + 1)


def error_of(response):
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "prompt": "hi", "n": 2}, 400, None),
    ({"model": "tiny", "prompt": "hi", "best_of": 3}, 400, None),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": "hi", "seed": 2**70}, 400, "seed"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 2, -1]}, 400, "prompt"),
    ({"model": "tiny", "prompt": {"text": "hi"}}, 400, "prompt"),
    ({"model": "tiny:s", "prompt": "hi", "width": "m"}, 400, "width"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny:xl", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": "hi", "width": "xl"}, 404, "width"),
    ({"model": "tiny", "prompt": [7] * (N_CTX + 1)}, 413, "prompt"),
    ({"model": "tiny", "prompt": ["ok", [7] * (N_CTX + 1)]}, 400, "prompt"),  # mixed list: not a valid prompt
])
def test_bad_inputs_get_the_documented_status_and_error_body(served, body, status, param):
    response = httpx.post(f"{served.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert error_of(response)["param"] == param


@pytest.mark.parametrize("content, headers", [
    (b"{not json", {"content-type": "application/json"}),
    (b"[1, 2]", {"content-type": "application/json"}),
    (b"\xff\xfe", {"content-type": "application/json"}),
    (b"model=tiny", {"content-type": "application/x-www-form-urlencoded"}),
])
def test_malformed_bodies_are_400_not_422_or_500(served, content, headers):
    response = httpx.post(f"{served.url}/v1/completions", content=content, headers=headers, timeout=30)
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_request_error"


def test_the_openai_client_sees_typed_errors(served):
    client = served.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="n=3"):
        client.completions.create(model="tiny", prompt="hi", n=3)


def test_a_full_queue_answers_429_with_retry_after(checkpoint_512):
    _, path = checkpoint_512
    app = build_app(ServeSettings(checkpoint=path, max_batch=1, max_queue=1, device="cpu", retry_after_s=2))

    async def burst(url):
        body = {"model": "tiny:ta", "prompt": "Now", "max_tokens": 200, "temperature": 0}
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(12)))

    with ServerThread(app) as server:
        responses = asyncio.run(burst(server.url))
        metrics = httpx.get(f"{server.url}/metrics").text
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 1, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "2"
    assert refused.headers["x-matta-width"] == "ta"
    assert error_of(refused)["type"] == "rate_limit_error"
    assert f'matta_requests_total{{status="429",width="ta"}} {statuses.count(429)}.0' in metrics


def test_health_and_metrics(served):
    served.client().completions.create(model="tiny:s", prompt="Now is", max_tokens=5, temperature=0)
    httpx.post(f"{served.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "n": 2})
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    response = httpx.get(f"{served.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for series in ("matta_request_e2e_latency_seconds_bucket", "matta_time_to_first_token_seconds_count",
                   "matta_inter_token_latency_seconds_sum", "matta_request_queue_time_seconds_count",
                   "matta_prompt_tokens_total", "matta_generation_tokens_total",
                   'matta_requests_running{width="s"}', 'matta_requests_waiting{width="ta"}'):
        assert series in text, series
    assert 'matta_requests_total{status="200",width="s"}' in text
    assert 'matta_requests_total{status="400",width="none"}' in text
    # Where the engine's time went, carried from the engine core's process: it prefilled and decoded.
    busy = {phase: metric(text, "matta_engine_busy_seconds_total", phase=phase) for phase in ("prefill", "decode")}
    assert all(seconds > 0 for seconds in busy.values()), busy
    assert metric(text, "matta_decode_steps_total", path="eager") > 0


def test_unknown_routes_use_the_error_shape(served):
    response = httpx.get(f"{served.url}/v1/nothing")
    assert response.status_code == 404
    error_of(response)
