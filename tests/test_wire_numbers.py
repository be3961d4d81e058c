"""Numbers the wire cannot carry: every numeric field of a completion body, given any integer or
float a JSON text can spell, is brought into the range the engine and the process seam accept
(clamped where OpenAI semantics allow, as max_tokens beyond the context) or refused with a 400,
through HTTP, with the engine in its own process and in-process. Before the fix, ``max_tokens``
10**56 passed validation and failed in msgspec (``OverflowError``) with a 500 on ``--engine process``."""

from __future__ import annotations

import json
import types
import typing

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from benchmarks.harness import ServerThread
from matta.checkpoint import save_checkpoint
from matta.model import NestedGPT
from serving.api.protocol import WIRE_INT_MAX, CompletionRequest
from serving.app import build_app
from serving.settings import ServeSettings
from tests.helpers import tiny_config

N_CTX = 64


def _numeric(annotation) -> bool:
    """Whether a field's type holds a number anywhere (``int``, ``float | None``, ``list[list[int]]``)."""
    if annotation in (int, float):
        return True
    return any(_numeric(arg) for arg in typing.get_args(annotation) if arg is not types.NoneType)


# Every numeric field, read from the model: a field added later is generated too.
FIELDS = sorted(name for name, f in CompletionRequest.model_fields.items() if _numeric(f.annotation))
EDGES = ["1e400", "-1e400", "1e-400", "1E+308", "-1.7976931348623157e308", "5e-324", "1e56", "-0.0",
         str(2**64), str(2**64 - 1), str(2**63), str(2**63 - 1), str(-(2**63)), str(-(2**63) - 1), str(10**56),
         str(-(10**56)), "1" + "0" * 300, "-" + "9" * 400, "0", "1", "-1", "2", "20", "21"]
NUMBERS = st.one_of(st.sampled_from(EDGES), st.integers(-(10**400), 10**400).map(str),
                    st.integers(-(2**65), 2**65).map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr))


def body_text(field: str, literal: str, stream: bool) -> str:
    """A valid body whose ``field`` is the number ``literal`` exactly as written (no float rounding
    on the way). The prompt nearly fills the context, so even an unbounded max_tokens is 3 tokens."""
    prompt = [5] * (N_CTX - 3)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": stream}
    text = json.dumps({k: v for k, v in body.items() if k != field})
    value = f"[{literal}]" if field == "prompt" else literal
    return text[:-1] + f', "{field}": {value}}}'


@pytest.fixture(scope="module", params=["process", "inproc"])
def server(request, tmp_path_factory, tokenizer):
    model = NestedGPT(tiny_config(n_ctx=N_CTX)).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("wire") / "ckpt", model, tokenizer, {"recipe": "test"})
    app = build_app(ServeSettings(checkpoint=path, device="cpu", engine=request.param, max_batch=4))
    with ServerThread(app) as s:
        yield s


def test_every_numeric_field_is_generated():
    assert {"max_tokens", "temperature", "top_p", "seed", "logprobs", "n", "best_of", "latency_slo_ms",
            "presence_penalty", "frequency_penalty", "prompt"} <= set(FIELDS)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), literal=NUMBERS, stream=st.booleans())
@example(field="max_tokens", literal=str(10**56), stream=False)
@example(field="max_tokens", literal=str(2**64), stream=True)
@example(field="latency_slo_ms", literal="1e400", stream=False)
def test_any_number_in_any_numeric_field_is_served_or_a_400(server, field, literal, stream):
    r = httpx.post(f"{server.url}/v1/completions", content=body_text(field, literal, stream),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, (field, literal, r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error), error
    if r.status_code == 400:  # n, best_of and the penalties are refused by a check across fields (no param)
        assert r.json()["error"]["param"] in (field, None), r.text
    if r.status_code == 200 and not stream:
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("literal", [str(10**56), str(2**64), str(2**63), "1" + "0" * 300])
def test_max_tokens_beyond_the_wire_is_clamped_and_served_to_the_context(server, literal):
    r = httpx.post(f"{server.url}/v1/completions", content=body_text("max_tokens", literal, False),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3  # the context's end, or an end-of-text token
    assert CompletionRequest(model="x", prompt="y", max_tokens=int(literal)).max_tokens == WIRE_INT_MAX


@pytest.mark.parametrize(("field", "literal"), [("seed", str(10**56)), ("logprobs", str(2**64)),
                                                ("latency_slo_ms", "1e400"), ("n", str(10**56)),
                                                ("prompt", str(2**64))])
def test_numbers_no_semantics_can_clamp_are_a_400_naming_the_field(server, field, literal):
    r = httpx.post(f"{server.url}/v1/completions", content=body_text(field, literal, False),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_the_server_is_healthy_after_the_numbers(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
