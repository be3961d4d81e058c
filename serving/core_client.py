"""The API process's handle on the engine-core process (:mod:`serving.core`).

:class:`EngineCoreClient` has the in-process engine's interface (``submit`` -> an async stream
of :class:`~serving.core_protocol.SequenceOutput`, ``stats`` -> the core's
:class:`~serving.core_protocol.Load`, ``start``/``stop``), so the engine backend serves through
it exactly as through :class:`serving.engine.Engine` (``--engine inproc``). It decides nothing:
the core's scheduler admits, refuses and chooses widths, and its load view is the only one.
It starts the core as a subprocess (``python -m serving.core``: no multiprocessing, so nothing is
pickled on the way), talks to it over two ZMQ IPC sockets with msgspec MessagePack, and reads one
:class:`~serving.core_protocol.StepOutput` per engine step on a reader thread that hands it to
the event loop.

Death of the core is detected (the reader sees the process exit): every request in flight ends
with finish reason "abort" (503 to its client), new requests get 503, and ``/health`` turns
unhealthy. The API process never loads the weights.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import zmq

from matta.config import ModelConfig
from router.latency import LatencyModel
from serving import core_protocol as msg
from serving.engine import EngineStoppedError, RequestStream

log = logging.getLogger(__name__)

CORE_COMMAND = (sys.executable, "-m", "serving.core")  # how the core is started (tests wrap it)
READY_TIMEOUT_S = 600.0  # loading a checkpoint and measuring a profile on a slow CPU
REQUIRE_COMPILE_TIMEOUT_S = 3600.0  # --compile require: every decode step compiled before Ready
STOP_TIMEOUT_S = 30.0
POLL_MS = 100


class CoreDiedError(RuntimeError):
    """The engine-core process exited while the server was running."""


class EngineCoreClient:
    """Starts, feeds, reads and stops one engine-core process."""

    def __init__(self, checkpoint: Path, config: ModelConfig, *, max_batch: int, max_queue: int, device: str,
                 threads: int, profile: Path | None = None, measure_profile: bool = False,
                 compile: str = "off", compile_cache: Path | None = None, log_level: str = "warning") -> None:
        self.config, self.max_batch, self.max_queue = config, max_batch, max_queue
        self._dir = tempfile.TemporaryDirectory(prefix="matta-core-")
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._output = self._context.socket(zmq.PULL)
        input_addr, output_addr = f"ipc://{self._dir.name}/input", f"ipc://{self._dir.name}/output"
        self._input.bind(input_addr)
        self._output.bind(output_addr)
        cmd = [*CORE_COMMAND, "--checkpoint", str(checkpoint), "--input", input_addr,
               "--output", output_addr, "--device", device, "--threads", str(threads), "--max-batch", str(max_batch),
               "--max-queue", str(max_queue), "--log-level", log_level]
        cmd += ["--compile", compile]
        if compile_cache is not None:
            cmd += ["--compile-cache", str(compile_cache)]
        if profile is not None:
            cmd += ["--profile", str(profile)]
        elif measure_profile:
            cmd.append("--measure-profile")
        self.process = subprocess.Popen(cmd)
        self.latency: LatencyModel | None = None
        self._ready(REQUIRE_COMPILE_TIMEOUT_S if compile == "require" else READY_TIMEOUT_S)
        self._ids = itertools.count()
        self._streams: dict[int, tuple[RequestStream, int]] = {}  # request id -> (stream, sequences)
        self._load = msg.Load(max_batch=max_batch, max_queue=max_queue)
        self._stopping = False
        self._dead = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None

    def _ready(self, timeout_s: float) -> None:
        """Wait for the core's Ready (its latency profile), or fail with the core's own message."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._output.poll(POLL_MS):
                reply = msg.output_decoder.decode(self._output.recv())
                if isinstance(reply, msg.Failed):
                    self._close()
                    raise ValueError(f"the engine core could not start: {reply.message}")
                if isinstance(reply, msg.Ready):
                    if reply.profile is not None:
                        self.latency = LatencyModel.from_json(reply.profile, "the engine core's profile")
                    return
            if self.process.poll() is not None:
                self._close()
                raise ValueError(f"the engine core exited with code {self.process.returncode} before it was ready")
        self._close()
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
        if self.process.poll() is None:
            self._input.send(msg.encoder.encode(msg.Stop()))
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
        self._context.term()
        self._dir.cleanup()

    @property
    def accepting(self) -> bool:
        return not self._stopping and not self._dead

    @property
    def alive(self) -> bool:
        return not self._dead

    # --- requests ----------------------------------------------------------------------------

    def submit(self, prompts: Sequence[Sequence[int]], widths: str | Sequence[str], params: msg.Sampling,
               slo: msg.Slo = msg.NO_SLO, arrival: float | None = None) -> RequestStream:
        """Send one request's prompts to the core; raises like :meth:`serving.engine.Engine.submit`."""
        widths = (widths,) if isinstance(widths, str) else tuple(widths)
        unknown = [w for w in widths if w not in self.config.served_widths]
        if not widths or unknown:
            raise ValueError(f"unknown width(s) {unknown or list(widths)!r}; known: {self.config.served_widths}")
        if self._dead:
            raise EngineStoppedError("the engine core has died; the server cannot serve")
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        request_id = next(self._ids)
        stream = RequestStream(len(prompts), lambda: self.cancel(request_id), lambda: self._finished(request_id))
        self._streams[request_id] = (stream, len(prompts))
        self._input.send(msg.encoder.encode(msg.Add(request_id, [list(p) for p in prompts], widths, params, slo,
                                                    arrival if arrival is not None else time.monotonic())))
        return stream

    def cancel(self, request_id: int) -> None:
        """Free a request's slots in the core (idempotent; a finished request is already free)."""
        if self._streams.pop(request_id, None) is not None and not self._dead:
            self._input.send(msg.encoder.encode(msg.Cancel(request_id)))

    def _finished(self, request_id: int) -> None:
        self._streams.pop(request_id, None)

    def stats(self) -> msg.Load:
        """The load view the core published after its last iteration (the only one there is)."""
        return self._load

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
                if not self._stopping:
                    log.error("the engine core exited with code %s; failing every request in flight",
                              self.process.returncode)
                    self._call(self._died)
                return

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
        for request_id, (stream, n) in list(self._streams.items()):
            for index in range(n):
                stream.queue.put_nowait((index, msg.SequenceOutput(request_id, index, [], "", time.monotonic(),
                                                                   finish_reason="abort")))
            self._streams.pop(request_id, None)
