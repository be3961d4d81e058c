"""The engine-core process: scheduler, model, KV cache, sampler and output processing, away from the HTTP side's GIL.

``python -m serving.engine.core_process --checkpoint DIR --input ADDR --output ADDR ...`` is started by
:class:`serving.engine.core_client.EngineCoreClient` (never by hand). It loads the checkpoint, measures
or loads the latency profile, loads the compiled steps already cached, calibrates the profile on
every batch-size bucket (:meth:`~serving.engine.core.EngineCore.calibrate`), answers
:class:`~serving.messages.Ready` (or ``Failed``), then runs :class:`serving.engine.core.EngineCore`'s
loop on its main thread: read whatever requests arrived, run one iteration, send one
:class:`~serving.messages.StepOutput` (every sequence's new text and the load view). One
thread: nothing to lock.

Signals: SIGTERM and SIGINT are ignored, because the API process drains first and then sends
:class:`~serving.messages.Stop`; a process-group signal must not cut the drain short. If
the API process dies, the core dies too, in any phase (:mod:`serving.lifecycle`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import torch
import zmq

from matta.checkpoint import load_checkpoint
from matta.config import DTYPE_CHOICES
from router.latency import LatencyModel
from serving import messages as msg
from serving.engine.core import EngineCore
from serving.lifecycle import die_with_parent, freeze_startup_heap
from serving.worker.compiled import COMPILE_MODES, DecodeSteps

log = logging.getLogger("matta.core")

POLL_MS = 200  # how long an idle core waits for a request before checking that its parent is still there


def serve_forever(core: EngineCore, push: zmq.Socket, pull: zmq.Socket) -> None:
    """Read -> schedule -> run -> update -> send, until told to stop or orphaned."""
    parent = os.getppid()
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    running = True
    with torch.inference_mode():
        while running:
            busy = core.has_work()
            if not poller.poll(0 if busy else POLL_MS) and not busy:
                if os.getppid() != parent:
                    log.error("the API process is gone; the engine core exits")
                    break
                continue
            outputs: list[msg.SequenceOutput] = []
            while running and pull.poll(0):
                message = msg.input_decoder.decode(pull.recv())
                if isinstance(message, msg.Stop):
                    running = False
                elif isinstance(message, msg.Cancel):
                    core.cancel(message.request_id)
                else:
                    outputs += core.add(message)
            if running and core.has_work():
                outputs += core.step()
            push.send(msg.encoder.encode(msg.StepOutput(outputs, core.load())))
        outputs = core.abort_all()
    core.steps.stop()
    push.send(msg.encoder.encode(msg.StepOutput(outputs, core.load())))


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # before anything long (loading, profiling, compiling): no phase may orphan the core
    p = argparse.ArgumentParser(prog="python -m serving.engine.core_process", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--input", required=True, help="ZMQ address the API process sends requests on")
    p.add_argument("--output", required=True, help="ZMQ address the core sends step outputs on")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="the weights' and KV cache's dtype")
    p.add_argument("--max-batch", type=int, required=True)
    p.add_argument("--max-queue", type=int, required=True)
    p.add_argument("--profile", type=Path, help="latency profile JSON to serve with")
    p.add_argument("--measure-profile", action="store_true", help="measure a latency profile at start-up")
    p.add_argument("--compile", choices=COMPILE_MODES, default="off", help="compiled decode steps (serving.worker.compiled)")
    p.add_argument("--compile-cache", type=Path, help="directory of compiled decode graphs")
    p.add_argument("--calibrate", choices=("on", "off"), default="on",
                   help="measure every batch-size bucket before the first request (EngineCore.calibrate)")
    p.add_argument("--width-changes", choices=("on", "off"), default="off",
                   help="running sequences may change width (serving.engine.width_changes)")
    p.add_argument("--max-num-batched-tokens", type=int, default=0,
                   help="chunked prefill's tokens per iteration; 0: unchunked (serving.engine.scheduler)")
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
        ckpt = load_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
        latency = None
        if args.profile is not None:
            latency = LatencyModel.load(args.profile)
            latency.check_widths(ckpt.config.served_widths, args.profile)  # before calibrate prices them
        elif args.measure_profile:
            from serving.worker.profile import profile_model

            latency = profile_model(ckpt.model)
        steps = DecodeSteps(ckpt.model, args.compile, max_batch=args.max_batch, cache_dir=args.compile_cache,
                            checkpoint=args.checkpoint)
        core = EngineCore(ckpt.model, ckpt.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                          latency=latency, steps=steps, width_changes=args.width_changes == "on",
                          max_num_batched_tokens=args.max_num_batched_tokens)
        steps.start()  # the cached compiled steps load before Ready: none is swapped in under load
        if args.calibrate == "on":
            with torch.inference_mode():
                core.calibrate()  # every batch bucket measured on the path it runs before the first request
    except Exception as exc:  # told to the API process, which refuses to start with this message
        push.send(msg.encoder.encode(msg.Failed(f"{type(exc).__name__}: {exc}")))
        push.close(linger=2000)
        context.term()
        return 1
    freeze_startup_heap()
    push.send(msg.encoder.encode(msg.Ready(latency.to_json() if latency is not None else None)))
    push.send(msg.encoder.encode(msg.StepOutput([], core.load())))  # the calibrated corrections, before any request
    serve_forever(core, push, pull)
    push.close(linger=2000)
    pull.close(linger=0)
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
