"""``matta serve``: the checkpoint's engine behind the one OpenAI front end.

``build_app(settings)`` loads the checkpoint once, builds the engine (its scheduler and latency
model) and plugs it into :func:`serving.api.frontend.build_frontend_app`; :func:`serve` runs it (what ``matta serve``
calls). Any ASGI server can run the app too (Ray Serve does, in ``deploy/ray``).
"""

from __future__ import annotations

import logging
import os

import torch
from fastapi import FastAPI

from matta.checkpoint import load_checkpoint
from router.latency import LatencyModel
from router.quality import width_quality
from serving.api import server
from serving.api.chat import install_chat_route
from serving.api.chat_template import resolve_chat_template
from serving.api.engine_backend import EngineBackend
from serving.api.frontend import build_frontend_app, needs_cost_model
from serving.engine.core_client import CORE_DIED_EXIT_CODE, EngineCoreClient
from serving.engine.inproc import Engine
from serving.settings import ServeSettings
from serving.worker.compiled import DecodeSteps

log = logging.getLogger(__name__)


def build_app(settings: ServeSettings) -> FastAPI:
    """Build the app over the checkpoint's engine: in its own process (``engine="process"``, the
    default: this process reads only the config and tokenizer) or on a thread of this one
    (``"inproc"``, which loads the weights here). The engine runs while the app's lifespan does."""
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if settings.engine == "process":
        ckpt = load_checkpoint(settings.checkpoint, weights=False)
        engine = EngineCoreClient(settings.checkpoint, ckpt.config, max_batch=settings.max_batch,
                                  max_queue=settings.max_queue, device=device,
                                  threads=settings.threads or default_torch_threads(), dtype=settings.dtype,
                                  profile=settings.profile,
                                  measure_profile=needs_cost_model(settings),
                                  compile=settings.compile, compile_cache=settings.compile_cache,
                                  on_core_death=settings.on_core_death,
                                  width_changes=settings.width_changes == "on",
                                  calibrate=settings.calibrate == "on",
                                  max_num_batched_tokens=settings.max_num_batched_tokens)
        if engine.latency is not None:
            engine.latency.check_widths(ckpt.config.served_widths, settings.profile)
    else:
        ckpt = load_checkpoint(settings.checkpoint, device=device, dtype=settings.dtype)
        latency = load_or_measure_profile(settings, ckpt.model)
        steps = DecodeSteps(ckpt.model, settings.compile, max_batch=settings.max_batch,
                            cache_dir=settings.compile_cache, checkpoint=settings.checkpoint)
        engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=settings.max_batch, max_queue=settings.max_queue,
                        latency=latency, steps=steps, width_changes=settings.width_changes == "on",
                        max_num_batched_tokens=settings.max_num_batched_tokens, calibrate=settings.calibrate == "on")
    backend = EngineBackend(engine, ckpt.tokenizer, retry_after_s=settings.retry_after_s)
    app = build_frontend_app(backend, settings, title="matta",
                             description="OpenAI-compatible completions at every nested width",
                             quality=width_quality(ckpt.training, ckpt.config.served_widths, settings.quality_metric))
    install_chat_route(app, server_chat_template(ckpt, settings))
    app.state.checkpoint = ckpt
    app.state.engine = engine
    return app


def server_chat_template(ckpt, settings: ServeSettings):
    """The chat template of ``/v1/chat/completions``: ``--chat-template``, else the checkpoint's, else None."""
    tokenizer, config = ckpt.tokenizer, ckpt.config
    bos = config.eos_token_id if config.bos_token_id is None else config.bos_token_id
    specials = {"bos_token": tokenizer.backend.id_to_token(bos), "eos_token": tokenizer.eos_token}
    return resolve_chat_template(settings.chat_template, ckpt.chat_template, specials, str(ckpt.path))


def load_or_measure_profile(settings: ServeSettings, model) -> LatencyModel | None:
    """The latency model for this server: the given profile, or one measured now when the policy
    or an experiment arm needs predictions (a few seconds on CPU), or None."""
    widths = model.config.served_widths  # Mix'n'Match profiles are operating points too
    if settings.profile is not None:
        latency = LatencyModel.load(settings.profile)
        latency.check_widths(widths, settings.profile)
        return latency
    if not needs_cost_model(settings):
        return None
    from serving.worker.profile import profile_model

    log.info("no latency profile given (--profile); measuring one now")
    latency = profile_model(model)
    errors = latency.meta["relative_error"]
    log.info("latency profile: median fit error %s", {w: f"{e['fit_median']:.1%}" for w, e in errors.items()})
    return latency


def default_torch_threads() -> int:
    """Intra-op threads for serving on CPU: every core but one, which the HTTP event loop needs."""
    return max(1, (os.cpu_count() or 1) - 1)


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Run ``matta serve`` until SIGTERM/SIGINT, then drain (see :func:`serving.api.server.run`)."""
    # Process-wide, hence here and not in build_app (the engine-core process sets its own). OpenMP
    # threads that spin on cores another process is using can make each small decode step ~100x
    # slower; by default one core is left to the HTTP event loop (measured on 2 cores: 16-client
    # throughput 3519 vs 2412 tok/s for width s with 1 vs 2 torch threads,
    # benchmarks/serving_throughput.py).
    if settings.engine == "inproc":
        torch.set_num_threads(settings.threads or default_torch_threads())
    app = build_app(settings)
    code = server.run(app, "matta serve", host, port, log_level)
    # A core that died under --on-core-death exit stopped the server: say so to its supervisor.
    return CORE_DIED_EXIT_CODE if getattr(app.state.engine, "exiting", False) else code
