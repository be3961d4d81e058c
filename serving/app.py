"""The HTTP app: ``build_app(settings)`` wires checkpoint, engine, policy, metrics and thin routes.

Run it with :func:`serve` (what ``matta serve`` calls) or any ASGI server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from matta.checkpoint import load_checkpoint
from router.ab_log import ABLog, default_shard_path
from router.experiment import LiveExperiment, load_experiment
from router.latency import LatencyModel, RequestCalibration
from router.policy import PolicyContext, make_policy
from router.quality import width_quality
from router.slo import EnginePredictor
from serving.ab_routes import describe, install_experiment_routes
from serving.connection import head_deadline_protocol
from serving.engine import Engine
from serving.http import COMPLETION_RESPONSES, document_api, install_error_handlers, install_request_guard
from serving.metrics import ServingMetrics
from serving.protocol import CompletionRequest, ModelList
from serving.serving import CompletionService

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """Everything a server needs; tests build their own, ``matta serve`` fills it from flags."""

    checkpoint: Path
    policy: str | None = None  # "kind:arg", e.g. "fixed:s"; None serves the full width
    max_batch: int = 32
    max_queue: int = 256
    device: str | None = None  # None: CUDA when present, else CPU
    retry_after_s: int = 1
    shutdown_timeout_s: float = 30.0
    torch_threads: int | None = None  # CPU intra-op threads; fewer than cores helps on a shared machine
    default_slo_ms: float | None = None  # latency target of requests that give none (slo policy)
    min_width: str | None = None  # quality floor of the slo policy
    shed: bool = False  # slo policy: refuse (429) what no width can serve in time, instead of best effort
    profile: Path | None = None  # latency profile from `matta profile`; None: measure one at start-up when needed
    quality_metric: str = "cloze_acc"  # per-width quality for effective-quality metrics (training.json eval)
    # Request-level calibration of the slo predictor (router.latency.RequestCalibration): off by
    # default, because in benchmarks/slo_router.py it did worse (89% vs 96% of served requests in SLO).
    calibration_quantile: float | None = None
    experiment: Path | None = None  # A/B experiment config (router/experiment.py)
    ab_db: Path | None = None  # its SQLite log; None: runs/ab/<experiment>.<host>.<pid>.sqlite
    admin_key: str | None = None  # Bearer key of /admin/*; None: admin API disabled
    api_key: str | None = None  # Bearer key for every route but /health; None: open (or $MATTA_API_KEY)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    request_timeout_s: float | None = 300.0  # a completion running longer is cancelled (504)
    max_concurrency: int | None = 1024  # more requests in the server at once get 503 (bounds memory)
    header_timeout_s: float = 10.0  # a request head taking longer (idle or slowloris connection): 408, closed
    body_timeout_s: float = 30.0  # a request body taking longer after its head: 408


def build_app(settings: ServerSettings) -> FastAPI:
    """Load the checkpoint once and build the app; the engine thread runs while the app's lifespan does."""
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(settings.checkpoint, device=device)
    widths = ckpt.config.served_widths  # Mix'n'Match profiles are operating points too
    latency = load_or_measure_profile(settings, ckpt.model)
    calibration = (RequestCalibration(settings.calibration_quantile)
                   if latency is not None and settings.calibration_quantile is not None else None)
    context = PolicyContext(predictor=EnginePredictor(latency, calibration) if latency else None,
                            default_slo_ms=settings.default_slo_ms, min_width=settings.min_width, shed=settings.shed)
    policy = make_policy(settings.policy, widths, context)
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=settings.max_batch, max_queue=settings.max_queue,
                    latency=latency)
    def corrections() -> dict[str, float]:
        out = latency.corrections()
        if calibration is not None:
            out.update({"request:calm": calibration.factor(False), "request:queued": calibration.factor(True)})
        return out

    metrics = ServingMetrics(engine.stats, corrections=corrections if latency else None)
    live, ab_log = None, None
    if settings.experiment is not None:
        live = LiveExperiment(load_experiment(settings.experiment), widths, context, source=settings.experiment)
        ab_log = ABLog(settings.ab_db or default_shard_path(live.config.name))
        log.info("experiment %s, log %s", describe(live), ab_log.path)
    service = CompletionService(engine, ckpt.tokenizer, policy, metrics, retry_after_s=settings.retry_after_s,
                                calibration=calibration, experiment=live, ab_log=ab_log,
                                request_timeout_s=settings.request_timeout_s,
                                default_slo_ms=settings.default_slo_ms,
                                quality=width_quality(ckpt.training, widths, settings.quality_metric))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        log.info("serving %s (widths %s, policy %s) on %s", ckpt.name, widths, policy.name, device)
        yield
        engine.stop()
        if ab_log is not None:
            ab_log.close()

    app = FastAPI(title="matta", description="OpenAI-compatible completions at every nested width",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.checkpoint = ckpt
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.service = service
    app.state.experiment = live
    app.state.ab_log = ab_log
    install_error_handlers(app, metrics)
    install_request_guard(app, settings.api_key or os.environ.get("MATTA_API_KEY"), settings.max_body_bytes,
                          settings.max_concurrency, settings.body_timeout_s, settings.retry_after_s)
    install_experiment_routes(app, live, ab_log, metrics, settings.admin_key or os.environ.get("MATTA_ADMIN_KEY"))

    document_api(app, [card.id for card in service.models().data], widths, ckpt.config.vocab_size)

    @app.post("/v1/completions", responses=COMPLETION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await service.create_completion(body, request)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return service.models()

    @app.get("/health", responses={503: {"description": "shutting down"}})
    async def health() -> JSONResponse:
        if not engine.accepting:
            return JSONResponse({"status": "stopping"}, status_code=503)
        stats = engine.stats()
        return JSONResponse({"status": "ok", "model": ckpt.name, "running": stats.running, "waiting": stats.waiting})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def uvicorn_config(app: FastAPI, **overrides) -> uvicorn.Config:
    """uvicorn's settings for a matta app: graceful shutdown, and the request-head deadline
    (serving/connection.py) from the app's :class:`ServerSettings`."""
    settings: ServerSettings = app.state.settings
    options = dict(lifespan="on", timeout_graceful_shutdown=settings.shutdown_timeout_s,
                   http=head_deadline_protocol(settings.header_timeout_s))
    return uvicorn.Config(app, **{**options, **overrides})


def load_or_measure_profile(settings: ServerSettings, model) -> LatencyModel | None:
    """The latency model for this server: the given profile, or one measured now when the policy
    needs predictions (a few seconds on CPU), or None."""
    widths = model.config.served_widths
    if settings.profile is not None:
        latency = LatencyModel.load(settings.profile)
        missing = [w for w in widths if w not in latency.costs]
        if missing:
            raise ValueError(f"{settings.profile}: the profile has no costs for width(s) {missing} of this checkpoint")
        return latency
    if settings.policy is None or not settings.policy.startswith("slo"):
        return None
    from serving.profile import profile_model

    log.info("no latency profile given (--profile); measuring one now")
    latency = profile_model(model)
    errors = latency.meta["relative_error"]
    log.info("latency profile: median fit error %s", {w: f"{e['fit_median']:.1%}" for w, e in errors.items()})
    return latency


def _reload_experiment(app: FastAPI) -> None:
    """SIGHUP: re-read the experiment file; a bad file is logged and the running experiment stays."""
    live = app.state.experiment
    if live is None:
        log.warning("SIGHUP: no experiment to reload")
        return
    try:
        live.reload_from_source()
    except ValueError as exc:
        log.error("SIGHUP: experiment reload refused, the running one stays in force: %s", exc)
        return
    log.info("SIGHUP: experiment reloaded: %s", describe(live))


def default_torch_threads() -> int:
    """Intra-op threads for serving on CPU: every core but one, which the HTTP event loop needs."""
    return max(1, (os.cpu_count() or 1) - 1)


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Run the server until SIGTERM/SIGINT, then drain: stop accepting, finish in-flight requests
    within ``settings.shutdown_timeout_s``, stop the engine, return 0.

    The bound address is printed on stdout (``port=0`` picks a free port) before requests are served.
    """
    # Process-wide, hence here and not in build_app. OpenMP threads that spin on cores another
    # process is using can make each small decode step ~100x slower; by default one core is left
    # to the HTTP event loop (measured on 2 cores: 16-client throughput 3519 vs 2412 tok/s for
    # width s with 1 vs 2 torch threads, benchmarks/serving_throughput.py).
    torch.set_num_threads(settings.torch_threads or default_torch_threads())
    app = build_app(settings)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening now lets early clients queue in the backlog until uvicorn accepts them.
    sock.listen(2048)
    bound_port = sock.getsockname()[1]
    print(f"matta serve: listening on http://{host}:{bound_port}", flush=True)
    server = uvicorn.Server(uvicorn_config(app, log_level=log_level))
    # uvicorn re-raises the signal it caught once it has shut down; with this handler in place
    # that re-raise is a no-op, so a drained server exits 0 instead of dying by SIGTERM.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    previous_hup = signal.signal(signal.SIGHUP, lambda signum, frame: _reload_experiment(app))
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hup)
        sock.close()
    print("matta serve: stopped", file=sys.stderr, flush=True)
    return 0
