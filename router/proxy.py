"""``matta route CONFIG.yaml``: the same routing in front of OpenAI-compatible backends, one per width.

Backends are pinned ``matta serve`` instances or vLLM servers of exported widths. The proxy
speaks the same API as ``matta serve`` (``/v1/completions`` with streaming, ``/v1/models``,
``/health``, ``/metrics``, ``x-matta-width`` / ``x-matta-predicted-ms`` headers, the same error
bodies and ``matta_`` metrics) and chooses widths with the same policies (:mod:`router.policy`,
:mod:`router.slo`). It cannot see inside a backend, so :class:`BackendPredictor` learns each
one's latency online from the answers it relays: seconds per generated token as a function of
the requests in flight on that backend, plus a per-request overhead.

Config (YAML)::

    model: matta-shakespeare          # the id clients ask for; '<model>:<width>' pins a width
    policy: slo                       # or fixed:<width>; same names as `matta serve --policy`
    slo_ms: 800                       # default latency target for requests that give none
    min_width: null                   # quality floor of the slo policy
    shed: false                       # slo policy: 429 instead of best effort
    checkpoint: checkpoints/default   # optional: per-width quality from its training.json
    quality: {s: 0.016, ta: 0.020}    # optional: explicit per-width quality (overrides checkpoint)
    backends:                         # narrowest first
      - {width: s, url: "http://127.0.0.1:8001", model: "matta-shakespeare:s"}
      - {width: ta, url: "http://127.0.0.1:8002", model: "matta-shakespeare:ta"}
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from matta.configfile import read_yaml, validate
from router.policy import LoadSnapshot, PolicyContext, RequestInfo, WidthPolicy, decide_width, make_policy
from router.quality import width_quality
from serving.http import (
    COMPLETION_RESPONSES,
    PREDICTED_HEADER,
    WIDTH_HEADER,
    APIError,
    document_api,
    install_error_handlers,
    install_request_guard,
    slo_ms_from,
)
from serving.metrics import ServingMetrics
from serving.protocol import CompletionRequest, ModelCard, ModelList

log = logging.getLogger(__name__)

MATTA_FIELDS = ("width", "latency_slo_ms")  # extensions a vLLM backend does not know


class BackendSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: str = Field(min_length=1)
    url: str = Field(description="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8001")
    model: str = Field(description="the model id to send to this backend")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"backend url must start with http:// or https://, got {url!r}")
        return url.rstrip("/")


class RouteConfig(BaseModel):
    """A `matta route` config; errors name the field."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    policy: str | None = None
    slo_ms: float | None = Field(None, gt=0)
    min_width: str | None = None
    shed: bool = False
    checkpoint: Path | None = None
    quality: dict[str, float] | None = None
    quality_metric: str = "cloze_acc"
    timeout_s: float = Field(300.0, gt=0, description="per backend request")
    max_in_flight: int = Field(1024, gt=0, description="requests in flight through the proxy before 429")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger request bodies get 413")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body taking longer after its head gets 408")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection whose request head takes longer is closed")
    backends: list[BackendSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _widths(self) -> RouteConfig:
        widths = [b.width for b in self.backends]
        if len(set(widths)) != len(widths):
            raise ValueError(f"backends: each width once, got {widths}")
        if self.min_width is not None and self.min_width not in widths:
            raise ValueError(f"min_width {self.min_width!r} is not a backend width {widths}")
        return self

    @property
    def widths(self) -> list[str]:
        return [b.width for b in self.backends]


def load_route_config(path: str | Path) -> RouteConfig:
    return validate(RouteConfig, read_yaml(path), str(path))


# --- latency learned from the answers ------------------------------------------------------------


def _bucket(in_flight: int) -> int:
    """Concurrency buckets 1, 2, 4, 8, ... (log2), so a few observations cover a wide range."""
    return 1 << max(0, math.ceil(math.log2(max(1, in_flight))))


class BackendPredictor:
    """Online latency model of each backend: latency = overhead + max_tokens * seconds_per_token(in flight).

    ``seconds_per_token`` is an EWMA per concurrency bucket; an empty bucket borrows the nearest
    observed one, scaled linearly with concurrency beyond it (a batching server slows down less
    than linearly, so this errs on the safe side). Thread-safe.
    """

    def __init__(self, widths: list[str], alpha: float = 0.2, prior_s_per_token: float = 0.0) -> None:
        self.alpha = alpha
        self._lock = threading.Lock()
        self._per_token: dict[str, dict[int, float]] = {w: {} for w in widths}
        self._overhead: dict[str, float] = dict.fromkeys(widths, 0.0)
        self.prior = prior_s_per_token

    # Without new answers a bucket's estimate relaxes towards the fastest seen, with this time
    # constant: otherwise a width judged slow in a burst would never be chosen, so never measured
    # again, and calm traffic would stay on the narrow backend for good.
    forget_s = 2.0

    def observe(self, width: str, in_flight: int, tokens: int, seconds: float) -> None:
        """One relayed answer: ``tokens`` generated in ``seconds`` with ``in_flight`` requests on the backend."""
        if tokens <= 0 or seconds <= 0:
            with self._lock:
                old = self._overhead[width]
                self._overhead[width] = seconds if old == 0 else (1 - self.alpha) * old + self.alpha * seconds
            return
        with self._lock:
            table = self._per_token[width]
            b = _bucket(in_flight)
            value = seconds / tokens
            if b in table:
                ewma, best, _ = table[b]
                table[b] = ((1 - self.alpha) * ewma + self.alpha * value, min(best, value), time.monotonic())
            else:
                table[b] = (value, value, time.monotonic())

    def seconds_per_token(self, width: str, in_flight: int) -> float:
        with self._lock:
            table = dict(self._per_token[width])
        if not table:
            return self.prior
        now = time.monotonic()
        estimates = {k: best + (ewma - best) * math.exp(-(now - at) / self.forget_s)
                     for k, (ewma, best, at) in table.items()}
        b = _bucket(in_flight)
        if b in estimates:
            return estimates[b]
        nearest = min(estimates, key=lambda k: abs(math.log2(k) - math.log2(b)))
        return estimates[nearest] * max(1.0, b / nearest)

    def predict_s(self, width: str, request: RequestInfo, load: LoadSnapshot) -> float:
        in_flight = load.running_by_width.get(width, 0) + 1
        return self._overhead[width] + max(1, request.max_tokens) * self.seconds_per_token(width, in_flight)

    def snapshot(self) -> dict:
        with self._lock:
            return {w: {str(k): v for k, v in t.items()} for w, t in self._per_token.items()}


# --- the app --------------------------------------------------------------------------------------


def build_route_app(config: RouteConfig) -> FastAPI:
    """The proxy app: same routes, headers, errors and metrics as ``matta serve``."""
    widths = config.widths
    backends = {b.width: b for b in config.backends}
    predictor = BackendPredictor(widths)
    policy: WidthPolicy = make_policy(config.policy, widths, PolicyContext(
        predictor=predictor, default_slo_ms=config.slo_ms, min_width=config.min_width, shed=config.shed))
    quality = _quality(config)
    in_flight = dict.fromkeys(widths, 0)
    lock = threading.Lock()

    def stats() -> LoadSnapshot:
        with lock:
            running = dict(in_flight)
        return LoadSnapshot(running=sum(running.values()), waiting=0, running_by_width=running,
                            waiting_by_width=dict.fromkeys(widths, 0), max_batch=config.max_in_flight,
                            max_queue=config.max_in_flight)

    metrics = ServingMetrics(stats)
    client_holder: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        client_holder["client"] = httpx.AsyncClient(timeout=config.timeout_s, limits=limits)
        log.info("routing %s over %s with policy %s", config.model, {w: b.url for w, b in backends.items()},
                 policy.name)
        yield
        await client_holder["client"].aclose()

    app = FastAPI(title="matta route", description="OpenAI-compatible width router over backends",
                  lifespan=lifespan)
    app.state.predictor = predictor
    app.state.metrics = metrics
    install_error_handlers(app, metrics)
    # The API key comes from the environment only ($MATTA_API_KEY): keys do not belong in config files.
    install_request_guard(app, os.environ.get("MATTA_API_KEY"), config.max_body_bytes,
                          body_timeout_s=config.body_timeout_s)
    document_api(app, [config.model, *(f"{config.model}:{w}" for w in widths)], widths)

    def pinned_width(body: CompletionRequest) -> str | None:
        name, sep, model_width = body.model.partition(":")
        if name != config.model:
            raise APIError(404, f"the model {body.model!r} does not exist; available: {config.model!r} or "
                                f"'{config.model}:<width>' with width in {widths}", param="model",
                           code="model_not_found")
        for value, param in ((model_width if sep else None, "model"), (body.width, "width")):
            if value is not None and value not in backends:
                raise APIError(404, f"unknown width {value!r}; known: {widths}", param=param, code="width_not_found")
        if sep and body.width is not None and body.width != model_width:
            raise APIError(400, f"model pins width {model_width!r} but width is {body.width!r}", param="width")
        return model_width if sep else body.width


    def finish(width: str, started: float, status: int, tokens: int, prompt_tokens: int, slo: float | None,
               predicted: float | None, load_at_send: int) -> None:
        elapsed = time.monotonic() - started
        with lock:
            in_flight[width] -= 1
        metrics.requests.labels(width, str(status)).inc()
        metrics.generation_tokens.labels(width).inc(tokens)
        metrics.prompt_tokens.labels(width).inc(prompt_tokens)
        if slo is not None:
            outcome = "failed" if status != 200 else ("met" if elapsed <= slo / 1000 else "missed")
            metrics.observe_slo(policy.name, outcome, quality.get(width, 0.0))
        if status == 200:
            metrics.e2e_latency.labels(width).observe(elapsed)
            predictor.observe(width, load_at_send, tokens, elapsed)
            if predicted:
                metrics.prediction_ratio.labels(policy.name, width).observe(elapsed / predicted)
                metrics.prediction_error.labels(policy.name, width).observe(abs(elapsed - predicted))

    @app.post("/v1/completions", responses=COMPLETION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        started = time.monotonic()
        width = None
        try:
            pinned = pinned_width(body)
            slo = slo_ms_from(body.latency_slo_ms, request, config.slo_ms)
            info = RequestInfo(pinned_width=pinned, latency_slo_ms=slo, max_tokens=body.max_tokens,
                               prompt_tokens=_prompt_tokens(body.prompt), user=body.user,
                               n_prompts=len(body.prompt) if isinstance(body.prompt, list)
                               and body.prompt and not isinstance(body.prompt[0], int) else 1)
            load = LoadSnapshot(running=sum(in_flight.values()), running_by_width=dict(in_flight),
                                max_batch=config.max_in_flight, max_queue=config.max_in_flight)
            decision = decide_width(policy, info, load, started)
            width = decision.width
            metrics.decisions.labels(policy.name, width, decision.reason).inc()
            if decision.shed:
                metrics.shed.labels(policy.name).inc()
                metrics.observe_slo(policy.name, "shed")
                raise APIError(429, f"no width can meet the latency SLO of {slo:g} ms now (predicted "
                                    f"{1000 * (decision.predicted_s or 0):.0f} ms at width {width!r}); retry later",
                               type_="rate_limit_error", code="slo_unattainable", headers={"retry-after": "1"})
            if load.running >= config.max_in_flight:
                raise APIError(429, f"{load.running} requests in flight (limit {config.max_in_flight}); retry later",
                               type_="rate_limit_error", code="queue_full", headers={"retry-after": "1"})
        except APIError as exc:
            if width is not None:
                exc.headers[WIDTH_HEADER] = width
            metrics.requests.labels(width or "none", str(exc.status)).inc()
            raise
        backend = backends[width]
        payload = body.model_dump(exclude_none=True, exclude=set(MATTA_FIELDS))
        payload["model"] = backend.model
        headers = {WIDTH_HEADER: width}
        if decision.predicted_s is not None:
            headers[PREDICTED_HEADER] = f"{1000 * decision.predicted_s:.1f}"
        with lock:
            in_flight[width] += 1
            load_at_send = in_flight[width]
        client = client_holder["client"]
        prompt_tokens = info.prompt_tokens
        url = f"{backend.url}/v1/completions"
        if body.stream:
            return await _relay_stream(client, url, payload, headers, width, started, slo, decision.predicted_s,
                                       load_at_send, prompt_tokens, finish)
        try:
            upstream = await client.post(url, json=payload)
        except httpx.HTTPError as exc:
            finish(width, started, 503, 0, 0, slo, None, load_at_send)
            raise APIError(503, f"backend for width {width!r} ({backend.url}) failed: {type(exc).__name__}",
                           type_="service_unavailable", code="backend_unavailable",
                           headers={"retry-after": "1", WIDTH_HEADER: width}) from exc
        tokens = 0
        if upstream.status_code == 200:
            usage = (upstream.json() or {}).get("usage") or {}
            tokens, prompt_tokens = usage.get("completion_tokens", 0), usage.get("prompt_tokens", prompt_tokens)
        finish(width, started, upstream.status_code, tokens, prompt_tokens, slo, decision.predicted_s, load_at_send)
        passthrough = {k: v for k, v in upstream.headers.items() if k.lower() == "retry-after"}
        return Response(upstream.content, status_code=upstream.status_code,
                        media_type=upstream.headers.get("content-type", "application/json"),
                        headers={**passthrough, **headers})

    @app.get("/v1/models")
    async def models() -> ModelList:
        cards = [ModelCard(id=config.model, root=config.model)]
        cards += [ModelCard(id=f"{config.model}:{w}", root=config.model, parent=config.model, width=w) for w in widths]
        return ModelList(data=cards)

    @app.get("/health")
    async def health() -> JSONResponse:
        client = client_holder["client"]
        status = {}
        for w, b in backends.items():
            try:
                r = await client.get(f"{b.url}/health", timeout=5)
                status[w] = "ok" if r.status_code == 200 else f"http {r.status_code}"
            except httpx.HTTPError as exc:
                status[w] = type(exc).__name__
        ok = any(v == "ok" for v in status.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": config.model, "backends": status},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _relay_stream(client: httpx.AsyncClient, url: str, payload: dict, headers: dict, width: str,
                        started: float, slo: float | None, predicted: float | None, load_at_send: int,
                        prompt_tokens: int, finish) -> Response:
    """Open the upstream stream first, so an upstream error keeps its status; then relay its bytes."""
    request = client.build_request("POST", url, json=payload)
    try:
        upstream = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        finish(width, started, 503, 0, 0, slo, None, load_at_send)
        raise APIError(503, f"backend for width {width!r} failed: {type(exc).__name__}", type_="service_unavailable",
                       code="backend_unavailable", headers={"retry-after": "1"}) from exc
    if upstream.status_code != 200:
        content = await upstream.aread()
        await upstream.aclose()
        finish(width, started, upstream.status_code, 0, prompt_tokens, slo, None, load_at_send)
        return Response(content, status_code=upstream.status_code, headers=headers,
                        media_type=upstream.headers.get("content-type", "application/json"))

    async def relay() -> AsyncIterator[bytes]:
        status, tokens = 499, 0  # client gone unless the stream completes
        try:
            async for line in upstream.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    tokens += _chunk_tokens(line[6:])
                yield (line + "\n").encode()
            status = 200
        finally:
            await upstream.aclose()
            finish(width, started, status, tokens, prompt_tokens, slo, predicted, load_at_send)

    return StreamingResponse(relay(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


def _chunk_tokens(data: str) -> int:
    """Generated tokens a streamed chunk carries (one per chunk with text, as matta and vLLM stream)."""
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        return 0
    return sum(1 for c in chunk.get("choices") or [] if c.get("text"))


def _prompt_tokens(prompt) -> int:
    """Prompt size without a tokenizer: exact for token ids, ~4 characters per token for text."""
    if isinstance(prompt, str):
        return max(1, len(prompt) // 4)
    if prompt and isinstance(prompt[0], int):
        return len(prompt)
    return sum(_prompt_tokens(p) for p in prompt)


def _quality(config: RouteConfig) -> dict[str, float]:
    if config.quality is not None:
        missing = [w for w in config.widths if w not in config.quality]
        if missing:
            raise ValueError(f"quality: no value for width(s) {missing}")
        return dict(config.quality)
    training = {}
    if config.checkpoint is not None:
        path = Path(config.checkpoint) / "training.json"
        if not path.is_file():
            raise ValueError(f"checkpoint {config.checkpoint}: no training.json to take per-width quality from")
        training = json.loads(path.read_text())
    return width_quality(training, config.widths, config.quality_metric)


def serve_route(config: RouteConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Run the proxy until SIGTERM/SIGINT; prints the bound address like ``matta serve``."""
    import socket
    import sys

    import uvicorn

    from serving.connection import head_deadline_protocol

    app = build_route_app(config)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    print(f"matta route: listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                           http=head_deadline_protocol(config.header_timeout_s)))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("matta route: stopped", file=sys.stderr, flush=True)
    return 0
