"""The API process's handle on the engine-core process (:mod:`serving.engine.core_process`).

:class:`EngineCoreClient` has the in-process engine's interface (``submit`` -> an async stream
of :class:`~serving.messages.SequenceOutput`, ``stats`` -> the core's
:class:`~serving.messages.Load`, ``start``/``stop``), so the engine backend serves through
it exactly as through :class:`serving.engine.inproc.Engine` (``--engine inproc``). It decides nothing:
the core's scheduler admits, refuses and chooses widths, and its load view is the only one.
It starts the core as a subprocess (``python -m serving.engine.core_process``: no multiprocessing, so nothing is
pickled on the way), talks to it over two ZMQ IPC sockets with msgspec MessagePack, and reads one
:class:`~serving.messages.StepOutput` per engine step on a reader thread that hands it to
the event loop.

Death of the core is detected (the reader sees the process exit): every request in flight ends
with finish reason "abort" (503 to its client), new requests get 503, and ``/health`` turns
unhealthy. Then, as ``on_core_death`` says, a new core is started with back-off (``/health``
503 until it is ready) or the server exits. The API process never loads the weights.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import zmq

from matta.config import ModelConfig
from router.latency import LatencyModel
from serving import messages as msg
from serving.engine.inproc import EngineStoppedError, RequestStream
from serving.lifecycle import spawn_options

log = logging.getLogger(__name__)

CORE_COMMAND = (sys.executable, "-m", "serving.engine.core_process")  # how the core is started (tests wrap it)
READY_TIMEOUT_S = 600.0  # loading a checkpoint and measuring a profile on a slow CPU
REQUIRE_COMPILE_TIMEOUT_S = 3600.0  # --compile require: every decode step compiled before Ready
STOP_TIMEOUT_S = 30.0
POLL_MS = 100
CORE_DEATH_POLICIES = ("restart", "exit")  # serving/settings.py: ServeSettings.on_core_death
RESTART_BACKOFF_S = 0.5  # before the first restart of a dead core; doubled for each failed attempt
RESTART_MAX_BACKOFF_S = 30.0
CORE_DIED_EXIT_CODE = 3  # `matta serve`'s exit status after on_core_death="exit"


class CoreDiedError(RuntimeError):
    """The engine-core process exited while the server was running."""


class EngineCoreClient:
    """Starts, feeds, reads and stops one engine-core process."""

    def __init__(self, checkpoint: Path, config: ModelConfig, *, max_batch: int, max_queue: int, device: str,
                 threads: int, dtype: str = "float32", profile: Path | None = None, measure_profile: bool = False,
                 compile: str = "off", compile_cache: Path | None = None, log_level: str = "warning",
                 on_core_death: str = "restart", width_changes: bool = False, max_num_batched_tokens: int = 0,
                 calibrate: bool = True) -> None:
        """``calibrate``: the core measures every batch-size bucket before its first request
        (:meth:`serving.engine.core.EngineCore.calibrate`). ``on_core_death``: what a core that dies
        while serving leads to (``ServeSettings.on_core_death``): ``"restart"`` a new core, with
        back-off, or ``"exit"`` of this process (SIGTERM to itself: the server drains what is left,
        and ``matta serve`` exits with :data:`CORE_DIED_EXIT_CODE`)."""
        if on_core_death not in CORE_DEATH_POLICIES:
            raise ValueError(f"on_core_death must be one of {CORE_DEATH_POLICIES}, got {on_core_death!r}")
        self.config, self.max_batch, self.max_queue = config, max_batch, max_queue
        self.on_core_death = on_core_death
        self._dir = tempfile.TemporaryDirectory(prefix="matta-core-")
        self._context = zmq.Context()
        cmd = [*CORE_COMMAND, "--checkpoint", str(checkpoint), "--device", device, "--threads", str(threads),
               "--dtype", dtype, "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--log-level", log_level]
        cmd += ["--compile", compile, "--width-changes", "on" if width_changes else "off",
                "--max-num-batched-tokens", str(max_num_batched_tokens), "--calibrate", "on" if calibrate else "off"]
        if compile_cache is not None:
            cmd += ["--compile-cache", str(compile_cache)]
        self._cmd, self._profile_args = cmd, []
        if profile is not None:
            self._profile_args = ["--profile", str(profile)]
        elif measure_profile:
            self._profile_args = ["--measure-profile"]
        self._ready_timeout_s = REQUIRE_COMPILE_TIMEOUT_S if compile == "require" else READY_TIMEOUT_S
        self._generation = 0
        self._spawn()
        try:
            profile = self._ready(self._ready_timeout_s)
        except ValueError:
            self._close()
            raise
        self.latency = LatencyModel.from_json(profile, "the engine core's profile") if profile is not None else None
        if measure_profile and self.latency is not None:
            # A restarted core serves with this profile rather than measuring one again (seconds).
            saved = Path(self._dir.name) / "profile.json"
            saved.write_text(json.dumps(self.latency.to_json()))
            self._profile_args = ["--profile", str(saved)]
        self._ids = itertools.count()
        self._streams: dict[int, tuple[RequestStream, int]] = {}  # request id -> (stream, sequences)
        self._load = msg.Load(max_batch=max_batch, max_queue=max_queue)
        self._stopping = False
        self._stopped = threading.Event()  # wakes a restart's back-off when the server stops
        self._dead = False
        self.restarts = 0  # cores started again after one died
        self.exiting = False  # a core died under on_core_death="exit": the server is on its way out
        self._old_input: zmq.Socket | None = None  # a dead core's input socket, until a new core is ready
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None

    def _spawn(self) -> None:
        """Start a core on fresh sockets: nothing a dead core left queued (requests, outputs) can
        reach or come from the next one."""
        self._generation += 1
        self._input = self._context.socket(zmq.PUSH)
        # Never block the event loop on a send: a PUSH socket whose core has died (and not yet been
        # noticed) blocks every send forever, and with it the loop that would notice. It raises
        # zmq.Again instead (the request gets a 503).
        self._input.setsockopt(zmq.SNDTIMEO, 0)
        self._output = self._context.socket(zmq.PULL)
        input_addr = f"ipc://{self._dir.name}/input-{self._generation}"
        output_addr = f"ipc://{self._dir.name}/output-{self._generation}"
        self._input.bind(input_addr)
        self._output.bind(output_addr)
        cmd = [*self._cmd, *self._profile_args, "--input", input_addr, "--output", output_addr]
        # It dies with this process, in every phase (serving/lifecycle.py). The parent-death signal
        # follows the spawning thread, and both spawners outlive the core: the thread that builds the
        # app (the server's main thread, Ray Serve's user-code loop) and, on a restart, the reader.
        self.process = subprocess.Popen(cmd, **spawn_options())

    def _ready(self, timeout_s: float) -> dict | None:
        """Wait for the core's Ready and return its latency profile, or raise ValueError with the
        core's own message (the caller cleans up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not getattr(self, "_stopping", False):
            if self._output.poll(POLL_MS):
                reply = msg.output_decoder.decode(self._output.recv())
                if isinstance(reply, msg.Failed):
                    raise ValueError(f"the engine core could not start: {reply.message}")
                if isinstance(reply, msg.Ready):
                    return reply.profile
            if self.process.poll() is not None:
                raise ValueError(f"the engine core exited with code {self.process.returncode} before it was ready")
        raise ValueError(f"the engine core was not ready within {timeout_s:g} s")

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start reading step outputs; call from the event loop that will consume them."""
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, name="matta-core-reader", daemon=True)
        self._reader.start()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Tell the core to stop (it aborts what is left), wait for it, and release everything."""
        self._stopping = True
        self._stopped.set()
        if self._reader is not None and self._dead:
            self._reader.join(5)  # a restart in progress gives up (its new core is killed below)
        if self.process.poll() is None:
            try:
                self._input.send(msg.encoder.encode(msg.Stop()))
            except zmq.Again:  # nobody reads it: the core is gone or stuck, and is killed below
                pass
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.error("the engine core did not stop within %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(5)
        self._close()

    def _close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._input.close(linger=0)
        self._output.close(linger=0)
        if getattr(self, "_old_input", None) is not None:  # (None, or unset when the first core failed)
            self._old_input.close(linger=0)
        self._context.term()
        self._dir.cleanup()

    @property
    def accepting(self) -> bool:
        return not self._stopping and not self._dead

    @property
    def alive(self) -> bool:
        return not self._dead

    @property
    def health_error(self) -> str | None:
        """Why ``/health`` fails (None: the core is serving)."""
        if not self._dead:
            return None
        if self.on_core_death == "restart" and not self._stopping:
            return f"the engine core process has died; restarting it ({self.restarts} restarts so far)"
        return "the engine core process has died; the server is exiting"

    # --- requests ----------------------------------------------------------------------------

    def submit(self, prompts: Sequence[Sequence[int]], widths: str | Sequence[str], params: msg.Sampling,
               slo: msg.Slo = msg.NO_SLO, arrival: float | None = None, stream: bool = True,
               width_changes: bool = True) -> RequestStream:
        """Send one request's prompts to the core; raises like :meth:`serving.engine.inproc.Engine.submit`."""
        widths = (widths,) if isinstance(widths, str) else tuple(widths)
        unknown = [w for w in widths if w not in self.config.served_widths]
        if not widths or unknown:
            raise ValueError(f"unknown width(s) {unknown or list(widths)!r}; known: {self.config.served_widths}")
        if self._dead:
            raise EngineStoppedError(self.health_error)
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        request_id = next(self._ids)
        events = RequestStream(len(prompts), lambda: self.cancel(request_id), lambda: self._finished(request_id))
        self._streams[request_id] = (events, len(prompts))
        add = msg.Add(request_id, [list(p) for p in prompts], widths, params, slo,
                      arrival if arrival is not None else time.monotonic(), stream, width_changes)
        try:
            self._input.send(msg.encoder.encode(add))
        except zmq.Again:  # the core died a moment ago (the reader has not seen it yet), or is swamped
            self._streams.pop(request_id, None)
            raise EngineStoppedError("the engine core is not taking requests (it may have died); retry") from None
        return events

    def cancel(self, request_id: int) -> None:
        """Free a request's slots in the core (idempotent; a finished request is already free)."""
        if self._streams.pop(request_id, None) is not None and not self._dead:
            try:
                self._input.send(msg.encoder.encode(msg.Cancel(request_id)))
            except zmq.Again:  # a core that reads nothing frees nothing either; its death aborts the rest
                pass

    def _finished(self, request_id: int) -> None:
        self._streams.pop(request_id, None)

    def stats(self) -> msg.Load:
        """The load view the core published after its last iteration (the only one there is), with
        the cores restarted so far."""
        return msgspec.structs.replace(self._load, core_restarts=self.restarts) if self.restarts else self._load

    # --- the reader thread -----------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            if self._output.poll(POLL_MS):
                try:
                    message = msg.output_decoder.decode(self._output.recv())
                except (zmq.ZMQError, ValueError) as exc:
                    log.error("unreadable message from the engine core: %s", exc)
                    continue
                if isinstance(message, msg.StepOutput):
                    self._call(self._apply, message)
                continue
            if self.process.poll() is not None:
                if self._stopping:
                    return
                log.error("the engine core exited with code %s; failing every request in flight (on_core_death=%s)",
                          self.process.returncode, self.on_core_death)
                self._call(self._died)
                if self.on_core_death == "exit":
                    self._call(self._exit)
                    return
                if not self._restart():
                    return

    def _restart(self) -> bool:
        """Start cores until one is ready, waiting RESTART_BACKOFF_S, doubling to RESTART_MAX_BACKOFF_S,
        before each (reader thread); False when the server stopped meanwhile. Until then every request
        gets 503 and ``/health`` says the core is restarting."""
        dead_input = self._old_input = self._input  # the event loop's: closed there once it has the new one
        for attempt in itertools.count():
            if self._stopped.wait(min(RESTART_MAX_BACKOFF_S, RESTART_BACKOFF_S * 2**attempt)):
                return False
            self._output.close(linger=0)
            if self._input is not dead_input:
                self._input.close(linger=0)  # a failed attempt's, never used
            self._spawn()
            try:
                self._ready(self._ready_timeout_s)
            except ValueError as exc:  # it could not start (its own message): try again, later
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait()
                log.error("restarting the engine core (attempt %d) failed: %s", attempt + 1, exc)
                continue
            if self._stopping:
                return False
            log.warning("the engine core was restarted (attempt %d)", attempt + 1)
            self._call(self._revived)
            return True
        return False

    def _revived(self) -> None:
        self._old_input.close(linger=0)
        self._old_input = None
        self.restarts += 1
        self._dead = False

    def _exit(self) -> None:
        """on_core_death="exit": the server stops as on SIGTERM (what is in flight has already failed)."""
        self.exiting = True
        log.critical("the engine core died; the server exits (on_core_death=exit)")
        os.kill(os.getpid(), signal.SIGTERM)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _apply(self, step: msg.StepOutput) -> None:
        self._load = step.load
        for out in step.outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                entry[0].queue.put_nowait((out.index, out))

    def _died(self) -> None:
        self._dead = True
        self._load = msg.Load(max_batch=self.max_batch, max_queue=self.max_queue)  # a new core starts empty
        for request_id, (stream, n) in list(self._streams.items()):
            for index in range(n):
                stream.queue.put_nowait((index, msg.SequenceOutput(request_id, index, [], "", time.monotonic(),
                                                                   finish_reason="abort")))
            self._streams.pop(request_id, None)
