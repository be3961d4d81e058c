"""``matta serve`` as a user runs it: a subprocess on port 0, drained by SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from matta.checkpoint import save_checkpoint
from matta.cli import build_parser
from matta.model import NestedGPT
from tests.conftest import REPO, tiny_config


@pytest.fixture
def long_context_checkpoint(tmp_path, tokenizer):
    torch.manual_seed(0)
    # A long context, so one generation reliably outlasts the start of the shutdown.
    model = NestedGPT(tiny_config(n_ctx=1024, d_model=128, n_layer=4)).eval()
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer, {"recipe": "t"})


def test_serve_is_a_subcommand_with_the_documented_defaults():
    args = build_parser().parse_args(["serve"])
    assert (str(args.checkpoint), args.host, args.port, args.policy) == ("checkpoints/default", "127.0.0.1", 8000, None)


def test_sigterm_finishes_in_flight_requests_then_exits_0(long_context_checkpoint):
    proc = subprocess.Popen(
        [sys.executable, "-m", "matta.cli", "serve", str(long_context_checkpoint), "--port", "0",
         "--policy", "fixed:s", "--shutdown-timeout", "20", "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split()[-1]
        _wait_healthy(url)

        chunks: list[dict] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 1000, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                for text in response.iter_lines():
                    if text.startswith("data: ") and text != "data: [DONE]":
                        chunks.append(json.loads(text.removeprefix("data: ")))
                        first_chunk.set()
                    elif text == "data: [DONE]":
                        chunks.append({"done": True, "at": time.monotonic()})

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(20)
        proc.send_signal(signal.SIGTERM)
        refused_at = _wait_refused(url)  # the listening socket closes first: no new connections
        reader.join(60)
        assert chunks[-1].get("done"), "the in-flight stream was cut off"
        assert chunks[-1]["at"] > refused_at, "the stream ended before the shutdown began; nothing was drained"
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_bad_checkpoint_with_exit_1(tmp_path):
    result = subprocess.run([sys.executable, "-m", "matta.cli", "serve", str(tmp_path / "missing"), "--port", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "not a checkpoint directory" in result.stderr


def _wait_refused(url: str) -> float:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.TransportError:
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"{url} still accepts connections after SIGTERM")


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} never became healthy")
