"""No child outlives ``matta serve``: the engine core and the background compile worker die within
5 s of a SIGKILL of the API process, in every phase (start-up, loading, compiling, serving, draining).

Before serving/lifecycle.py the core checked for its parent only in its serve loop: killed while
the core was starting (importing, loading the checkpoint, measuring the profile, compiling with
``--compile require``), ``matta serve`` left it running with another parent."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.harness import descendants
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # a real `matta serve` per phase: ~5-10 s each

GONE_WITHIN_S = 5.0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Serve:
    """``matta serve --port 0`` as a subprocess whose children the test can see and kill."""

    def __init__(self, checkpoint: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", str(checkpoint), "--port", "0",
                                      "--threads", "1", "--max-batch", "4", "--log-level", "warning", *args],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = ""
        self.children: set[int] = set()

    def child(self, module: str) -> int | None:
        """The pid of the descendant running ``python -m <module>``, once there is one (remembered)."""
        for pid in descendants(self.proc.pid):
            if f"-m {module} " in _cmdline(pid):
                self.children.add(pid)
                return pid
        return None

    def listening(self, timeout_s: float = 120.0) -> str:
        line = _wait_for(lambda: self.proc.stdout.readline(), timeout_s, "the listening line")
        assert "listening on " in line, line
        self.url = line.split("listening on ", 1)[1].strip()
        _wait_for(lambda: self._healthy(), timeout_s, "a healthy server")
        return self.url

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def kill_and_check_children_die(self) -> float:
        """SIGKILL the API process; every child seen must be gone within GONE_WITHIN_S. Returns how long it took."""
        assert self.children, "no child was seen"
        self.children |= set(descendants(self.proc.pid))
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        started = time.monotonic()
        try:
            _wait_for(lambda: not any(_alive(pid) for pid in self.children), GONE_WITHIN_S,
                      f"children {[(p, _cmdline(p)) for p in self.children if _alive(p)]} to die with the API process")
        finally:
            for pid in self.children:  # whatever outlived it (a failing run) is ours to end
                if _alive(pid) and "serving." in _cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
        return time.monotonic() - started


@pytest.fixture(scope="module")
def checkpoint(checkpoint_512):
    return checkpoint_512[1]


@pytest.fixture
def spawn():
    """``Serve(...)`` for a test; whatever it started is killed at the end, even when the test failed early."""
    started: list[Serve] = []

    def make(*args) -> Serve:
        started.append(Serve(*args))
        return started[-1]

    yield make
    for serve in started:
        for pid in {serve.proc.pid, *serve.children, *descendants(serve.proc.pid)}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        serve.proc.wait()


def test_a_core_still_importing_dies_with_the_api_process(checkpoint, spawn):
    serve = spawn(checkpoint, "--compile", "off")
    _wait_for(lambda: serve.child("serving.engine.core_process"), 60, "the core process")
    serve.kill_and_check_children_die()


def test_a_core_loading_and_profiling_dies_with_the_api_process(checkpoint, spawn):
    # --policy slo: the core measures a latency profile after loading, seconds before it is Ready.
    serve = spawn(checkpoint, "--compile", "off", "--policy", "slo")
    core = _wait_for(lambda: serve.child("serving.engine.core_process"), 60, "the core process")
    _wait_for(lambda: "libtorch" in Path(f"/proc/{core}/maps").read_text(), 60, "the core to import torch")
    time.sleep(1.0)  # loading the checkpoint, then measuring the profile
    assert serve.proc.poll() is None and not select.select([serve.proc.stdout], [], [], 0)[0]  # nothing listens yet
    serve.kill_and_check_children_die()


def test_a_core_compiling_at_start_up_dies_with_the_api_process(checkpoint, tmp_path, spawn):
    # The reported case: --compile require with a cold cache compiles for minutes before Ready.
    serve = spawn(checkpoint, "--compile", "require", "--compile-cache", str(tmp_path))
    _wait_for(lambda: serve.child("serving.engine.core_process"), 60, "the core process")
    _wait_for(lambda: list(tmp_path.glob("torch-*/*/inductor")) or list(tmp_path.glob("torch-*/*")), 120,
              "the compile to start")
    time.sleep(1.0)  # well inside the first signature's compile (tens of seconds)
    serve.kill_and_check_children_die()


def test_a_serving_core_and_its_compile_worker_die_with_the_api_process(checkpoint, tmp_path, spawn):
    serve = spawn(checkpoint, "--compile", "background", "--compile-cache", str(tmp_path))
    url = serve.listening()
    _wait_for(lambda: serve.child("serving.engine.core_process"), 10, "the core process")
    _wait_for(lambda: serve.child("serving.worker.compile_worker"), 60, "the background compile worker")
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 400, "stream": True}
    threading.Thread(target=lambda: _drain_stream(url, body), daemon=True).start()
    time.sleep(0.5)
    serve.kill_and_check_children_die()


def test_a_draining_core_dies_with_the_api_process(checkpoint, spawn):
    serve = spawn(checkpoint, "--compile", "off")
    url = serve.listening()
    core = _wait_for(lambda: serve.child("serving.engine.core_process"), 10, "the core process")
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 500, "stream": True, "temperature": 0}
    # 16 streams of 500 tokens through 4 slots: four rounds of ~0.5 s each, so the drain outlasts the
    # check below (4 streams alone ended 0.05 s after SIGTERM, and the core with them).
    streams = [threading.Thread(target=lambda: _drain_stream(url, body), daemon=True) for _ in range(16)]
    for stream in streams:
        stream.start()
    time.sleep(0.5)
    serve.proc.send_signal(signal.SIGTERM)  # drains the streams in flight; the core keeps running meanwhile
    time.sleep(0.3)
    open_streams = sum(stream.is_alive() for stream in streams)
    assert open_streams, "every stream ended before the check: nothing was draining"
    assert serve.proc.poll() is None and _alive(core), f"{open_streams} streams still open"  # still draining
    serve.kill_and_check_children_die()


def _drain_stream(url: str, body: dict) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                pass
    except httpx.HTTPError:
        pass  # the server was killed under it


def test_with_on_core_death_exit_a_dead_core_fails_what_is_in_flight_and_the_server_exits_3(checkpoint, spawn):
    serve = spawn(checkpoint, "--compile", "off", "--on-core-death", "exit")
    url = serve.listening()
    core = _wait_for(lambda: serve.child("serving.engine.core_process"), 10, "the core process")
    answers = {}

    def request() -> None:
        body = {"model": "tiny", "prompt": "To be", "max_tokens": 500, "temperature": 0}
        answers["r"] = httpx.post(f"{url}/v1/completions", json=body, timeout=30)

    thread = threading.Thread(target=request)
    thread.start()
    _wait_for(lambda: httpx.get(f"{url}/health", timeout=5).json().get("running"), 20, "the request to run")
    os.kill(core, signal.SIGKILL)
    killed = time.monotonic()
    assert serve.proc.wait(15) == 3  # CORE_DIED_EXIT_CODE: a supervisor sees a failure, not a clean stop
    assert time.monotonic() - killed < 10
    thread.join(10)
    assert answers["r"].status_code == 503 and answers["r"].json()["error"]["code"] == "aborted", answers["r"].text
