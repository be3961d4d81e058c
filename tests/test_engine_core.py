"""The engine core in its own process: the same answers as the in-process engine, no pickle on the
wire or in the core, and a core that dies fails its requests and the health check instead of hanging,
then is restarted (``--on-core-death restart``; ``exit``: tests/test_lifecycle.py)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import httpx
import pytest

import serving.engine.core_client
from benchmarks.harness import ServerThread
from serving.app import build_app
from serving.settings import ServeSettings
from tests.helpers import REPO

PROMPTS = ["To be, or not to be", "Now is the winter of our discontent", [5, 6, 7, 8]]

# The core under a guard: any unpickling in it fails (as tests/test_no_pickle.py does in-process).
GUARDED_CORE = """
import pickle, sys, torch
def refuse(*args, **kwargs):
    raise AssertionError("the engine core tried to unpickle")
pickle.load = pickle.loads = torch.load = refuse
from serving.engine.core_process import main
sys.exit(main())
"""


def answers(url: str) -> list[dict]:
    out = []
    for width in ("s", "m", "ta"):
        for prompt in PROMPTS:
            body = {"model": f"tiny:{width}", "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 2,
                    "echo": True}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            out.append({"text": choice["text"], "finish": choice["finish_reason"], "usage": r.json()["usage"],
                        "tokens": choice["logprobs"]["tokens"],
                        "logprobs": [round(v, 4) if v is not None else None
                                     for v in choice["logprobs"]["token_logprobs"]]})
    sampled = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": ["Friends", "Romans"],
                                                          "max_tokens": 8, "temperature": 0.8, "seed": 7}, timeout=60)
    out.append([c["text"] for c in sampled.json()["choices"]])
    return out


@pytest.mark.slow
def test_the_core_process_answers_exactly_as_the_in_process_engine(checkpoint_512, monkeypatch):
    _, path = checkpoint_512
    monkeypatch.setattr(serving.engine.core_client, "CORE_COMMAND", (sys.executable, "-c", GUARDED_CORE))
    results = {}
    for engine in ("inproc", "process"):
        app = build_app(ServeSettings(checkpoint=path, device="cpu", engine=engine, max_batch=8))
        with ServerThread(app) as server:
            results[engine] = answers(server.url)
            if engine == "process":
                assert app.state.checkpoint.model is None  # the API process holds no weights
    assert results["process"] == results["inproc"]


@pytest.mark.slow
def test_a_core_that_dies_fails_its_requests_and_health_then_is_restarted(checkpoint_512):
    _, path = checkpoint_512
    app = build_app(ServeSettings(checkpoint=path, device="cpu", max_batch=4))
    client = app.state.engine
    with ServerThread(app) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        results = {}

        def long_request(name, stream):
            body = {"model": "tiny", "prompt": "To be", "max_tokens": 400, "temperature": 0, "stream": stream}
            if stream:
                with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
                    results[name] = [line for line in r.iter_lines() if line]
            else:
                results[name] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)

        threads = [threading.Thread(target=long_request, args=(n, n == "stream")) for n in ("json", "stream")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while client.stats().running < 2:
            assert time.monotonic() < deadline, client.stats()
            time.sleep(0.01)
        os.kill(client.process.pid, signal.SIGKILL)
        # Sent before the reader notices the death: a blocking send to the dead core's socket froze the
        # event loop (every request and /health after it hung; found by benchmarks/soak.py).
        early = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                           timeout=10)
        assert early.status_code == 503, early.text
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a request hung after the core died"
        assert results["json"].status_code == 503 and results["json"].json()["error"]["code"] == "aborted"
        assert results["stream"][-1] == "data: [DONE]"
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and "died" in health.json()["error"]
        after = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert after.status_code == 503 and after.headers["retry-after"]

        # on_core_death=restart (the default): a new core, with back-off; /health 503 until it is
        # ready, every request meanwhile a quick 503, and nothing served by a core that is not ready.
        dead_pid = client.process.pid
        deadline = time.monotonic() + 60
        refused = 0
        while True:
            assert time.monotonic() < deadline, "the core was not restarted within 60 s"
            health = httpx.get(f"{server.url}/health", timeout=5)
            if health.status_code == 200:
                break
            assert health.status_code == 503 and "restarting" in health.json()["error"], health.text
            r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                           timeout=5)
            if r.status_code == 200 and client.restarts == 1:
                break  # the new core became ready between the two calls
            assert r.status_code == 503 and r.headers["retry-after"] and "restarting" in r.json()["error"]["message"]
            refused += 1
            time.sleep(0.1)
        assert refused > 0 and client.restarts == 1 and client.process.pid != dead_pid
        served = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "To be", "max_tokens": 5,
                                                                  "temperature": 0}, timeout=30)
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 5, served.text
        assert "matta_engine_core_restarts_total 1.0" in httpx.get(f"{server.url}/metrics").text


def test_what_the_core_cannot_start_with_is_refused_with_its_own_message(tmp_path, checkpoint_dir):
    (checkpoint_dir / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="sha256 mismatch"):  # checked before any process starts
        build_app(ServeSettings(checkpoint=checkpoint_dir, device="cpu"))
    profile = tmp_path / "profile.json"
    profile.write_text("{not json")
    with pytest.raises(ValueError, match="the engine core could not start: .*invalid JSON"):
        build_app(ServeSettings(checkpoint=REPO / "checkpoints/default", device="cpu", profile=profile))
