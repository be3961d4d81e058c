"""The engine-core process: scheduler, model, KV cache and sampler, away from the HTTP side's GIL.

``python -m serving.core --checkpoint DIR --input ADDR --output ADDR ...`` is started by
:class:`serving.core_client.EngineCoreClient` (never by hand). It loads the checkpoint, measures
or loads the latency profile, answers :class:`~serving.core_protocol.Ready` (or ``Failed``), then
runs the engine's scheduler loop on its own thread while the main thread receives requests.
After every scheduler iteration it sends one :class:`~serving.core_protocol.StepOutput`: every
sequence's new tokens plus the load snapshot (and the latency model's corrections) that the
API process's policy reads.

Signals: SIGTERM and SIGINT are ignored, because the API process drains first and then sends
:class:`~serving.core_protocol.Stop`; a process-group signal must not cut the drain short. If
the API process dies, the core dies too, in any phase (:mod:`serving.lifecycle`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch
import zmq

from matta.checkpoint import load_checkpoint
from router.cost import EngineCostModel
from router.latency import LatencyModel
from serving import core_protocol as msg
from serving.compiled import COMPILE_MODES, DecodeSteps
from serving.engine import Engine, SamplingParams, SequenceEvent, TokenLogprob
from serving.lifecycle import die_with_parent

log = logging.getLogger("matta.core")

POLL_MS = 200  # how often the core checks that its parent is still there when no request arrives


def _logprobs(entries: list[TokenLogprob] | None) -> list[msg.Logprob] | None:
    if entries is None:
        return None
    return [(e.token_id, e.logprob, [tuple(t) for t in e.top]) for e in entries]


class EngineCore:
    """The engine plus its two sockets; ``serve_forever`` returns when told to stop or orphaned."""

    def __init__(self, engine: Engine, latency: LatencyModel | None, push: zmq.Socket, pull: zmq.Socket) -> None:
        self.engine, self.latency, self.push, self.pull = engine, latency, push, pull
        self._outbox: list[msg.SequenceOutput] = []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # a ZMQ socket is used by one thread at a time
        self._requests: dict[int, list] = {}
        engine.on_step = self.flush

    def _emitter(self, request_id: int):
        def emitter(index: int):
            def emit(event: SequenceEvent) -> None:
                out = msg.SequenceOutput(request_id, index, event.token_ids, event.text, event.time,
                                         _logprobs(event.logprobs), _logprobs(event.prompt_logprobs),
                                         event.finish_reason, event.prompt_tokens, event.completion_tokens,
                                         event.queue_s, event.width)
                with self._lock:
                    self._outbox.append(out)
            return emit
        return emitter

    def flush(self) -> None:
        """One message: every event since the last flush and the load now (scheduler thread)."""
        with self._lock:
            outputs, self._outbox = self._outbox, []
        s = self.engine.stats()
        load = msg.Load(s.running, s.waiting, s.running_by_width, s.waiting_by_width, s.max_batch, s.max_queue,
                        s.steps, s.finished, s.cancelled, dict(s.groups), list(s.remaining_tokens),
                        s.recent_iteration_s, self.latency.corrections() if self.latency is not None else {},
                        s.compiled_steps, s.eager_steps, s.compile_ready, s.compile_signatures, dict(s.busy_s),
                        dict(s.compile_faults))
        with self._send_lock:
            self.push.send(msg.encoder.encode(msg.StepOutput(outputs, load)))
        for out in outputs:
            if out.finish_reason is not None:
                seqs = self._requests.get(out.request_id)
                if seqs is not None and all(seq.finished for seq in seqs):
                    self._requests.pop(out.request_id, None)

    def handle(self, message: msg.CoreInput) -> bool:
        """Apply one input; False when it says stop."""
        if isinstance(message, msg.Stop):
            return False
        if isinstance(message, msg.Cancel):
            seqs = self._requests.pop(message.request_id, None)
            if seqs:
                self.engine.cancel(seqs)
                if not self.engine.stats().running:
                    self.flush()  # an idle engine runs no step that would report the freed queue slots
            return True
        p = message.sampling
        params = SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                                stop=tuple(p.stop), logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs,
                                deadline=p.deadline, widths=tuple(p.widths), slo_deadline=p.slo_deadline)
        try:
            self._requests[message.request_id] = self.engine.add(message.prompts, message.width, params,
                                                                 self._emitter(message.request_id))
        except Exception as exc:  # the client checked the request; anything left ends it, not the core
            log.warning("request %d refused: %s", message.request_id, exc)
            emit = self._emitter(message.request_id)
            for index in range(len(message.prompts)):
                emit(index)(SequenceEvent([], "", 0.0, finish_reason="abort"))
            self.flush()
        return True

    def serve_forever(self) -> None:
        parent = os.getppid()
        self.engine.start()
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        while True:
            if not poller.poll(POLL_MS):
                if os.getppid() != parent:
                    log.error("the API process is gone; the engine core exits")
                    break
                continue
            if not self.handle(msg.input_decoder.decode(self.pull.recv())):
                break
        self.engine.stop()
        self.flush()  # the aborts of whatever was left


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # before anything long (loading, profiling, compiling): no phase may orphan the core
    p = argparse.ArgumentParser(prog="python -m serving.core", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--input", required=True, help="ZMQ address the API process sends requests on")
    p.add_argument("--output", required=True, help="ZMQ address the core sends step outputs on")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, required=True)
    p.add_argument("--max-queue", type=int, required=True)
    p.add_argument("--profile", type=Path, help="latency profile JSON to serve with")
    p.add_argument("--measure-profile", action="store_true", help="measure a latency profile at start-up")
    p.add_argument("--per-width-forward", action="store_true", help="one forward per width group (the old step)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="off", help="compiled decode steps (serving.compiled)")
    p.add_argument("--compile-cache", type=Path, help="directory of compiled decode graphs")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    context = zmq.Context()
    push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    push.connect(args.output)
    pull.connect(args.input)
    try:
        ckpt = load_checkpoint(args.checkpoint, device=args.device)
        latency = None
        if args.profile is not None:
            latency = LatencyModel.load(args.profile)
        elif args.measure_profile:
            from serving.profile import profile_model

            latency = profile_model(ckpt.model)
        steps = DecodeSteps(ckpt.model, args.compile, max_batch=args.max_batch, cache_dir=args.compile_cache,
                            checkpoint=args.checkpoint)
        engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                        cost=EngineCostModel(latency) if latency is not None else None,
                        mixed=not args.per_width_forward, steps=steps)
    except Exception as exc:  # told to the API process, which refuses to start with this message
        push.send(msg.encoder.encode(msg.Failed(f"{type(exc).__name__}: {exc}")))
        push.close(linger=2000)
        context.term()
        return 1
    core = EngineCore(engine, latency, push, pull)
    push.send(msg.encoder.encode(msg.Ready(latency.to_json() if latency is not None else None)))
    core.serve_forever()
    push.close(linger=2000)
    pull.close(linger=0)
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
