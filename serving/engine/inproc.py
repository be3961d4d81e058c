"""The engine in the server's own process (``--engine inproc``, tests): :class:`EngineCore`'s loop on a
thread, handing each request's outputs to an asyncio :class:`RequestStream`.

The engine-core process (:mod:`serving.engine.core_process`) runs the same loop between reads of its
socket; :class:`serving.engine.core_client.EngineCoreClient` gives the API process the same streams
and errors from it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from matta.model import NestedGPT
from matta.tokenizer import Tokenizer
from router.latency import LatencyModel
from serving import messages as msg
from serving.engine.core import EngineCore
from serving.engine.scheduler import DEFAULT_MARGIN
from serving.worker.compiled import DecodeSteps


class EngineStoppedError(RuntimeError):
    """The engine is stopping or stopped and takes no new requests."""


class RequestStream:
    """Outputs of one request's sequences for an asyncio consumer: ``async for index, output in stream``.

    Iteration ends after every sequence's final output. :meth:`cancel` (idempotent) frees the
    request's sequences in the engine at its next iteration boundary.
    """

    def __init__(self, sequences: int, cancel: Callable[[], None], on_done: Callable[[], None] | None = None) -> None:
        self.queue: asyncio.Queue[tuple[int, msg.SequenceOutput]] = asyncio.Queue()
        self._open = sequences
        self._cancel, self._on_done = cancel, on_done

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, msg.SequenceOutput]:
        if self._open == 0:
            raise StopAsyncIteration
        index, out = await self.queue.get()
        if out.finish_reason is not None:
            self._open -= 1
            if self._open == 0 and self._on_done is not None:
                self._on_done()
        return index, out

    @property
    def done(self) -> bool:
        return self._open == 0

    def cancel(self) -> None:
        self._cancel()


class Engine:
    """The engine in the server's own process: :class:`EngineCore`'s loop on one thread."""

    def __init__(self, model: NestedGPT, tokenizer: Tokenizer, *, max_batch: int = 32, max_queue: int = 256,
                 latency: LatencyModel | None = None, steps: DecodeSteps | None = None,
                 margin: float = DEFAULT_MARGIN, width_changes: bool = False, max_num_batched_tokens: int = 0,
                 calibrate: bool = True) -> None:
        """``calibrate``: measure every batch-size bucket before the first request (:meth:`EngineCore.calibrate`)."""
        self.calibrate = calibrate
        self.core = EngineCore(model, tokenizer, max_batch=max_batch, max_queue=max_queue, latency=latency,
                               steps=steps, margin=margin, width_changes=width_changes,
                               max_num_batched_tokens=max_num_batched_tokens)
        self.config, self.tokenizer, self.latency, self.steps = model.config, tokenizer, latency, self.core.steps
        self.max_batch, self.max_queue = max_batch, max_queue
        self._cond = threading.Condition()
        self._inbox: deque[msg.CoreInput] = deque()
        self._streams: dict[int, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._ids = itertools.count()
        self._load = self.core.load()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps.on_report = self._wake

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load the compiled steps already cached, then start the loop's thread (idempotent)."""
        if self._thread is None:
            self.steps.start()
            self._thread = threading.Thread(target=self._run, name="matta-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking requests, abort what is left, and join the loop's thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.steps.stop()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def accepting(self) -> bool:
        return not self._stopping

    # --- requests ----------------------------------------------------------------------------

    def submit(self, prompts: Sequence[Sequence[int]], widths: str | Sequence[str], params: msg.Sampling,
               slo: msg.Slo = msg.NO_SLO, arrival: float | None = None, stream: bool = True,
               width_changes: bool = True) -> RequestStream:
        """Queue one sequence per prompt (all or none) at one of ``widths`` (narrowest first; a
        string pins it); call from the asyncio loop that consumes the stream. ValueError for input
        the model cannot take, :class:`EngineStoppedError` when stopping; a full queue or a shed
        request ends its stream with that finish reason. ``width_changes``: the scheduler may
        change its width while it runs."""
        widths = (widths,) if isinstance(widths, str) else tuple(widths)
        self.core.validate(prompts, widths)
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        request_id = next(self._ids)
        events = RequestStream(len(prompts), lambda: self._send(msg.Cancel(request_id)),
                               lambda: self._streams.pop(request_id, None))
        self._streams[request_id] = (events, asyncio.get_running_loop())
        self._send(msg.Add(request_id, [list(p) for p in prompts], widths, params, slo,
                           arrival if arrival is not None else time.monotonic(), stream, width_changes))
        return events

    def _send(self, message: msg.CoreInput) -> None:
        with self._cond:
            self._inbox.append(message)
            self._cond.notify_all()

    def stats(self) -> msg.Load:
        """The load view the loop published after its last iteration."""
        return self._load

    # --- the loop's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        core = self.core
        with torch.inference_mode():
            if self.calibrate:
                core.calibrate()  # before the first request (which waits in the inbox meanwhile)
            while True:
                with self._cond:
                    while not self._stopping and not self._inbox and not core.has_work():
                        self._cond.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, deque()
                outputs = []
                for message in inbox:
                    if isinstance(message, msg.Add):
                        outputs += core.add(message)
                    elif isinstance(message, msg.Cancel):
                        core.cancel(message.request_id)
                if core.has_work():
                    outputs += core.step()
                self._load = core.load()
                self._deliver(outputs)
        outputs = core.abort_all()
        for message in self._inbox:  # requests that never reached the core
            if isinstance(message, msg.Add):
                outputs += [msg.SequenceOutput(message.request_id, i, [], "", time.monotonic(), finish_reason="abort")
                            for i in range(len(message.prompts))]
        self._load = core.load()
        self._deliver(outputs)

    def _deliver(self, outputs: list[msg.SequenceOutput]) -> None:
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is None:
                continue
            stream, loop = entry
            try:
                loop.call_soon_threadsafe(stream.queue.put_nowait, (out.index, out))
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                self._streams.pop(out.request_id, None)
