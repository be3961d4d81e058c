"""Width changes seen from HTTP: a real server on port 0 narrows a running answer to admit a tight-SLO
request, and says so in ``x-matta-widths``, ``usage`` and ``/metrics``.

The server's latency profile prices a TA row at 0.5 s a step and a Student row at 0.1 ms (online
corrections can scale that by no less than 0.1): whatever this machine's real step times, a short
request with a 300 ms SLO cannot start beside a running TA row, and can beside one at ``l``.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

from benchmarks.harness import ServerThread, metric
from router.latency import LatencyModel, WidthCost
from router.quality import parse_width_steps, tokens_by_width
from serving.app import build_app
from serving.settings import ServeSettings

COSTS = {"s": 0.0001, "m": 0.0002, "l": 0.002, "ta": 0.5}  # seconds per row per decode step


@pytest.fixture(scope="module")
def served(checkpoint_512, tmp_path_factory):
    model, path = checkpoint_512
    profile = LatencyModel({w: WidthCost(0.001, per_row, 0.0, 0.001, 0.0) for w, per_row in COSTS.items()})
    profile_path = profile.save(tmp_path_factory.mktemp("profile") / "profile.json")
    app = build_app(ServeSettings(checkpoint=path, max_batch=4, max_queue=16, device="cpu", engine="inproc",
                                  policy="slo", shed=True, profile=profile_path, width_changes="on"))
    with ServerThread(app) as server:
        yield server.url, model, app.state.checkpoint.tokenizer


async def long_then_tight(url: str, long_body: dict) -> tuple[httpx.Response, httpx.Response]:
    """Start a long routed answer; once it runs, send a short one with a 300 ms SLO."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        long = asyncio.ensure_future(client.post("/v1/completions", json=long_body))
        deadline = time.monotonic() + 20
        while (await client.get("/health")).json()["running"] < 1:
            assert time.monotonic() < deadline and not long.done(), "the long request never ran"
            await asyncio.sleep(0.005)
        tight = await client.post("/v1/completions", json={"model": long_body["model"], "prompt": "To be or not",
                                                           "max_tokens": 8, "temperature": 0, "latency_slo_ms": 300})
        return await long, tight


def greedy_with_schedule(model, prompt: list[int], steps: list[tuple[str, int]], tokens: int) -> list[int]:
    """The model's greedy decode over one cache, token j sampled at the width ``steps`` names for it."""
    def width_at(j: int) -> str:
        return [w for w, first in steps if first <= j][-1]

    with torch.inference_mode():
        out = model(torch.tensor([prompt]), width=width_at(0), use_cache=True)
        ids = []
        for j in range(tokens):
            if j:
                out = model(torch.tensor([[ids[-1]]]), width=width_at(j), past_key_values=out.past_key_values,
                            use_cache=True)
            ids.append(int(out.logits[0, -1].argmax()))
    return ids


def test_a_running_answer_narrows_for_a_tight_request_and_names_every_width(served):
    url, model, tokenizer = served
    prompt = tokenizer.encode("Now is the winter of our discontent")
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 150, "temperature": 0}
    long, tight = asyncio.run(long_then_tight(url, body))
    assert long.status_code == 200 and tight.status_code == 200, (long.text, tight.text)
    steps = parse_width_steps(long.headers["x-matta-widths"])
    assert steps[0] == ("ta", 0) and long.headers["x-matta-width"] == "ta"
    assert len(steps) >= 2 and steps[1][0] != "ta" and steps[1][1] > 0, steps  # narrowed mid-generation
    assert [first for _, first in steps] == sorted({first for _, first in steps})
    usage = long.json()["usage"]
    assert usage["widths"] == long.headers["x-matta-widths"]
    assert usage["width_tokens"] == tokens_by_width(steps, usage["completion_tokens"])
    # Exactly what the model computes with that width schedule on one cache.
    expected = greedy_with_schedule(model, prompt, steps, usage["completion_tokens"])
    assert long.json()["choices"][0]["text"] == tokenizer.decode([t for t in expected if t != tokenizer.eos_id])
    text = httpx.get(url + "/metrics").text
    assert metric(text, "matta_width_changes_total", **{"from": "ta", "to": steps[1][0]}) >= 1
    assert metric(text, "matta_generation_tokens_total", width=steps[1][0]) >= usage["width_tokens"][steps[1][0]]


def test_an_answer_that_opts_out_keeps_its_width_and_the_tight_request_is_refused(served):
    url, _, tokenizer = served
    body = {"model": "tiny", "prompt": tokenizer.encode("Friends, Romans, countrymen"), "max_tokens": 150,
            "temperature": 0, "width_changes": False}
    before = metric(httpx.get(url + "/metrics").text, "matta_width_changes_total")
    long, tight = asyncio.run(long_then_tight(url, body))
    assert long.status_code == 200 and long.headers["x-matta-widths"] == "ta@0"
    assert long.json()["usage"]["width_tokens"] == {"ta": long.json()["usage"]["completion_tokens"]}
    assert tight.status_code == 429 and tight.json()["error"]["code"] == "slo_unattainable"
    assert metric(httpx.get(url + "/metrics").text, "matta_width_changes_total") == before


def test_an_ab_arm_of_slo_with_width_changes_off_keeps_every_width(checkpoint_512, tmp_path):
    """`slo:width_changes=off` (what an A/B arm names) serves like a request that opted out."""
    _, path = checkpoint_512
    profile = LatencyModel({w: WidthCost(0.001, per_row, 0.0, 0.001, 0.0) for w, per_row in COSTS.items()})
    app = build_app(ServeSettings(checkpoint=path, max_batch=4, max_queue=16, device="cpu", engine="inproc",
                                  policy="slo:width_changes=off", shed=True,
                                  profile=profile.save(tmp_path / "profile.json"), width_changes="on"))
    with ServerThread(app) as server:
        body = {"model": "tiny", "prompt": [5, 9, 13, 2, 7], "max_tokens": 150, "temperature": 0}
        long, tight = asyncio.run(long_then_tight(server.url, body))
    assert long.status_code == 200 and long.headers["x-matta-widths"] == "ta@0"
    assert tight.status_code == 429
