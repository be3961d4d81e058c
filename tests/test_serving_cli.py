"""``matta serve`` as a user runs it: a subprocess on port 0, drained by SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from benchmarks.harness import Server
from cli.main import build_parser
from matta.checkpoint import save_checkpoint
from matta.model import NestedGPT
from serving.api.route import load_route_settings
from serving.settings import RouteSettings, ServeSettings, flag_values, settings_from
from tests.helpers import REPO, tiny_config


@pytest.fixture
def long_context_checkpoint(tmp_path, tokenizer):
    torch.manual_seed(0)
    # A long context, so one generation reliably outlasts the start of the shutdown.
    model = NestedGPT(tiny_config(n_ctx=1024, d_model=128, n_layer=4)).eval()
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer, {"recipe": "t"})


def test_serve_is_a_subcommand_with_the_documented_defaults():
    args = build_parser().parse_args(["serve"])
    settings = settings_from(ServeSettings, flag_values(args, ServeSettings), environ={})
    assert (str(settings.checkpoint), args.host, args.port, settings.policy) == ("checkpoints/default", "127.0.0.1",
                                                                                 8000, None)


def test_every_setting_comes_from_one_model_through_flags_environment_and_files(tmp_path):
    """Flags are generated from the settings model, MATTA_* variables fill what no flag gives, a
    flag beats the variable, and a bad value from any source names the field."""
    args = build_parser().parse_args(["serve", "ckpt", "--max-batch", "8", "--shed", "--request-timeout", "0"])
    env = {"MATTA_MAX_BATCH": "4", "MATTA_SLO_MS": "750", "MATTA_API_KEY": "k"}
    settings = settings_from(ServeSettings, flag_values(args, ServeSettings), environ=env)
    assert (str(settings.checkpoint), settings.max_batch, settings.slo_ms, settings.shed) == ("ckpt", 8, 750.0, True)
    assert settings.api_key == "k" and settings.request_timeout_s is None  # 0 disables
    for flag in ("--threads", "--slo-ms", "--min-width", "--profile", "--experiment", "--header-timeout"):
        assert flag in build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    with pytest.raises(ValueError, match="max_batch"):
        settings_from(ServeSettings, {}, environ={"MATTA_MAX_BATCH": "lots"})
    route = tmp_path / "route.yaml"
    route.write_text("model: m\nslo_ms: 900\nbackends: [{width: s, url: 'http://127.0.0.1:1', model: 'm:s'}]\n")
    args = build_parser().parse_args(["route", str(route), "--slo-ms", "500", "--shed"])
    settings = load_route_settings(route, flag_values(args, RouteSettings))
    assert (settings.slo_ms, settings.shed, settings.widths) == (500.0, True, ["s"])
    with pytest.raises(ValueError, match="header_timeout_s"):
        settings_from(RouteSettings, {"model": "m", "backends": [{"width": "s", "url": "http://a", "model": "x"}],
                                      "header_timeout_s": -1})


def test_sigterm_finishes_in_flight_requests_then_exits_0(long_context_checkpoint):
    assert_drains_on_sigterm(["serve", str(long_context_checkpoint), "--policy", "fixed:s"])


@pytest.mark.slow
def test_the_route_proxy_drains_on_sigterm_like_serve(long_context_checkpoint, tmp_path):
    """`matta route` runs through the same server code as `matta serve`: SIGTERM closes the
    listening socket, lets the in-flight stream finish, then exits 0."""
    backend = Server(long_context_checkpoint, threads=1, max_batch=4, log_path=tmp_path / "backend.log",
                     extra_args=("--policy", "fixed:s"))
    try:
        url = backend.start()
        config = tmp_path / "route.yaml"
        config.write_text(f"model: tiny\nbackends: [{{width: s, url: '{url}', model: 'tiny:s'}}]\n")
        assert_drains_on_sigterm(["route", str(config)], name="matta route")
    finally:
        backend.stop()


def assert_drains_on_sigterm(command: list[str], name: str = "matta serve") -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *command, "--port", "0", "--shutdown-timeout", "20", "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"{name}: listening on http://127.0.0.1:" in line, (
            line, proc.stderr.read() if proc.poll() is not None else "")
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
        children = _children(proc.pid)  # the engine-core process, for `matta serve`
        assert children or name != "matta serve", "matta serve runs its engine core in a child process"
        proc.send_signal(signal.SIGTERM)
        refused_at = _wait_refused(url)  # the listening socket closes first: no new connections
        reader.join(60)
        assert chunks[-1].get("done"), "the in-flight stream was cut off"
        assert chunks[-1]["at"] > refused_at, "the stream ended before the shutdown began; nothing was drained"
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0, proc.stderr.read()
        assert f"{name}: stopped" in proc.stderr.read()
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "a child outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_bad_checkpoint_with_exit_1(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli", "serve", str(tmp_path / "missing"), "--port", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "not a checkpoint directory" in result.stderr


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


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
