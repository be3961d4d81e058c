"""Property tests: whatever JSON a client sends to /v1/completions or /v1/feedback, the server
answers below 500, errors have the documented body, and it stays healthy."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.harness import ServerThread
from serving.app import build_app
from serving.settings import ServeSettings

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "logprobs", "echo",
          "user", "n", "best_of", "latency_slo_ms", "width", "stream_options", "suffix"]
# Mostly-valid bodies with up to three fields replaced by anything: reaches deep validation paths.
VALID_CORE = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "tiny:s", "tiny:ta", "tiny:xl", "other", ""]),
     "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 5000), max_size=6),
                         st.lists(st.text(max_size=10), max_size=3))},
    optional={"max_tokens": st.integers(-3, 6), "temperature": st.floats(-1, 3, allow_nan=False)})
NOISE = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=3)


def bounded(body: dict) -> dict:
    """Keep generations short: a fuzz case may ask for many tokens, which is valid but slow."""
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8
    return body


@pytest.fixture(scope="module")
def server(checkpoint_512):
    _, path = checkpoint_512
    with ServerThread(build_app(ServeSettings(checkpoint=path, device="cpu", max_batch=8))) as s:
        yield s


def check_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(core=VALID_CORE, noise=NOISE)
def test_any_completion_body_gets_a_documented_answer(server, core, noise):
    with httpx.Client(timeout=30) as client:
        check_answer(client.post(f"{server.url}/v1/completions", json=bounded({**core, **noise})))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSON_VALUES)
def test_any_json_at_all_gets_a_documented_answer(server, body):
    with httpx.Client(timeout=30) as client:
        check_answer(client.post(f"{server.url}/v1/completions", json=bounded(body) if isinstance(body, dict) else body))
        check_answer(client.post(f"{server.url}/v1/feedback", json=body))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), content_type=st.sampled_from(["application/json", "text/plain", "", "x/y"]))
def test_arbitrary_bytes_get_a_documented_answer(server, raw, content_type):
    with httpx.Client(timeout=30) as client:
        check_answer(client.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": content_type}))


def test_the_server_is_healthy_after_the_fuzzing(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


@pytest.mark.parametrize("prompt", ["\x00\x01\x02 nul and control \x1b[31m", "é ü ß 漢字 🙂 \u202e rtl \u200b zero-width",
                                    '{"not": "json"} \\ " \n\t\r', "\U0010ffff" * 50])
def test_unicode_and_control_characters_in_prompts_are_served(server, prompt):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1}
    raw = json.dumps(body)  # \\ud800 travels as a JSON escape, as a client's encoder would send it
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    check_answer(r)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["logprobs"]["tokens"], choice  # the prompt was tokenized and scored, not dropped


@pytest.mark.parametrize("field", ["prompt", "stop", "user"])
def test_a_lone_surrogate_is_a_400_naming_the_field_not_a_500(server, field):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, field: "a \ud800 b"}
    r = httpx.post(f"{server.url}/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert "lone surrogate" in r.json()["error"]["message"]
