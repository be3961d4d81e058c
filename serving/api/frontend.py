"""The one OpenAI-compatible front end, for ``matta serve`` (engine backend) and ``matta route`` (HTTP backends).

:func:`build_frontend_app` wires a :class:`~serving.api.backend.Backend` behind the same surface:
``/v1/completions`` (JSON or SSE), ``/v1/models`` with pinned ids, ``/v1/feedback`` and
``/admin/experiment`` (A/B), ``/health``, ``/metrics``; the request guard (API key, body limit
and deadline, concurrency cap), the OpenAI error bodies, the width policy and A/B arms, SLO
accounting and metrics, request deadlines and client disconnects. :class:`Frontend` holds the
request logic, kept free of FastAPI routing as vLLM's ``serving_completion.py`` is: it returns a
response or raises :class:`~serving.api.http.APIError`, which the app turns into the error body; its
responses are written by :class:`serving.api.responses.ResponseWriter`. Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask

from router.ab_log import ABLog, default_shard_path
from router.experiment import LiveExperiment, load_experiment
from router.policies import make_policy
from router.policy import PolicyContext, RequestInfo, WidthPolicy, decide_width
from serving.api.ab_guardrails import install_guardrail_monitor
from serving.api.ab_routes import describe, install_experiment_routes
from serving.api.backend import Backend, BackendError, CompletionStream, Delta
from serving.api.connection import RECEIVED_AT
from serving.api.http import (
    ARM_HEADER,
    COMPLETION_RESPONSES,
    PREDICTED_HEADER,
    REQUEST_ID_HEADER,
    TPOT_SLO_HEADER,
    TTFT_SLO_HEADER,
    WIDTH_HEADER,
    APIError,
    document_api,
    install_error_handlers,
    install_request_guard,
    slo_ms_from,
)
from serving.api.metrics import ServingMetrics
from serving.api.protocol import (
    CompletionRequest,
    ModelCard,
    ModelList,
    completion_id,
)
from serving.api.request_state import Choice, Route, SloTargets
from serving.api.responses import ResponseWriter, chain_first
from serving.messages import REFUSALS, Slo
from serving.settings import FrontendSettings

log = logging.getLogger(__name__)


class Frontend(ResponseWriter):
    """``/v1/completions`` and ``/v1/models`` over one :class:`~serving.api.backend.Backend`."""

    def __init__(self, backend: Backend, policy: WidthPolicy, metrics: ServingMetrics, settings: FrontendSettings,
                 quality: dict[str, float] | None = None, experiment: LiveExperiment | None = None,
                 ab_log: ABLog | None = None) -> None:
        self.backend = backend
        self.policy = policy
        self.metrics = metrics
        self.settings = settings
        self.quality = quality or {}
        self.experiment = experiment
        self.ab_log = ab_log
        self._background: set[asyncio.Future] = set()
        # One thread: big bodies are rendered one at a time, in one malloc arena.
        self._render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="matta-json")

    @property
    def model_name(self) -> str:
        return self.backend.name

    def models(self) -> ModelList:
        """The routed model id plus one pinned id ``<name>:<width>`` per width."""
        name, n_ctx = self.model_name, self.backend.max_model_len
        cards = [ModelCard(id=name, root=name, max_model_len=n_ctx)]
        cards += [ModelCard(id=f"{name}:{w}", root=name, parent=name, max_model_len=n_ctx, width=w)
                  for w in self.backend.widths]
        return ModelList(data=cards)

    # --- request handling ----------------------------------------------------------------------

    async def create_completion(self, body: CompletionRequest, raw_request: Request) -> Response:
        """Serve one completion request (streaming or not); raises :class:`APIError` for the client's errors."""
        # Targets count from when the request's bytes were read, not from when this handler got the
        # event loop (under a burst of 48, the last handler started ~60 ms after its request arrived).
        started = min(time.monotonic(), getattr(raw_request.state, RECEIVED_AT, None) or float("inf"))
        request_id = completion_id()
        width, route, stream = None, None, None
        try:
            pinned = self._pinned_width(body)
            targets = self._targets(body, raw_request)
            prompts = self.backend.prepare(body.prompt)
            entries = self._response_entries(body, prompts)
            if not body.stream and entries > self.settings.max_response_entries:
                raise APIError(400, f"this request could produce a response of {entries} token entries ({prompts.n_prompts} "
                                    f"prompts x (echoed prompt + max_tokens) x (2 + logprobs)), over this server's "
                                    f"limit of {self.settings.max_response_entries} (--max-response-entries); ask for "
                                    "fewer prompts, tokens or logprobs, or stream it", param="max_tokens",
                               code="response_too_large")
            info = RequestInfo(pinned_width=pinned, latency_slo_ms=targets.e2e_ms,
                               max_tokens=self._generable_tokens(body.max_tokens, prompts.longest_prompt),
                               prompt_tokens=prompts.prompt_tokens, user=body.user, n_prompts=prompts.n_prompts)
            load = self.backend.load()
            policy, ab = self.policy, {}
            if pinned is None and self.experiment is not None:
                # Pinned requests stay outside experiments: the client chose the width, no arm did.
                unit = self._unit(body, raw_request)
                assigned = self.experiment.assign(unit)
                if assigned is not None:
                    arm, policy, assignment, exp = assigned
                    ab = {"arm": arm, "experiment": exp.name, "unit": unit, "assignment": assignment}
            decision = decide_width(policy, info, load, started)
            width = decision.width
            predicted = decision.predicted_s if decision.predicted_s is None or math.isfinite(decision.predicted_s) \
                else None
            route = Route(width, decision.reason, targets, predicted, info, load, policy=policy.name,
                           request_id=request_id, **ab)
            if decision.shed:
                self.metrics.shed.labels(policy.name).inc()
                self.metrics.observe_slo(policy.name, "shed")
                wait = self._retry_after((decision.predicted_s or 0) - route.slo_s)
                shown = "an unbounded time" if predicted is None else f"{1000 * predicted:.0f} ms"
                raise APIError(429, f"no width can meet the latency SLO of {targets.e2e_ms:g} ms now (predicted {shown} "
                                    f"at width {width!r}); retry later", type_="rate_limit_error",
                               code="slo_unattainable", headers={"retry-after": str(wait)})
            # Pinned requests are the client's choice, served whatever their SLO; otherwise a shedding
            # policy asks the scheduler to refuse what it cannot serve in time rather than serve it late.
            shed = pinned is None and getattr(policy, "shed", False) and targets.any
            widths = decision.candidates or (width,)
            stream = await self._submit(prompts, widths, body, targets.slo(started, shed), started)
            events = aiter(stream)
            if self.backend.dispatches_width:
                # The backend chooses the width (or refuses) when the request gets its batch slot: wait
                # for its first delta (or the end of the request's deadline) so the response head can
                # name it, or the refusal can be a plain 429.
                first = await self._first_delta(events, started)
                if isinstance(first, tuple):
                    delta = first[1]
                    if delta.finish_reason in REFUSALS and not delta.tokens:
                        stream.cancel()
                        route = replace(route, width=widths[0])  # refused even at its narrowest width
                        raise self._refusal(route, delta.finish_reason)
                    if delta.width is not None:
                        route = replace(route, width=delta.width, predicted_s=delta.predicted_s)
                events = chain_first(first, events)
        except APIError as exc:
            exc.headers[REQUEST_ID_HEADER] = request_id
            width = route.width if route is not None else width
            if width is not None:
                exc.headers[WIDTH_HEADER] = width
            self.metrics.requests.labels(width or "none", str(exc.status)).inc()
            if route is not None and route.arm is not None:
                exc.headers[ARM_HEADER] = route.arm
                await self._log_exposure(route, exc.status, time.monotonic() - started, 0)
            raise
        self.metrics.decisions.labels(policy.name, route.width, route.reason).inc()
        choices = [Choice() for _ in range(prompts.n_prompts)]
        width = route.width
        headers = {WIDTH_HEADER: width, REQUEST_ID_HEADER: request_id}
        if route.arm is not None:
            headers[ARM_HEADER] = route.arm
        if route.predicted_s is not None:
            headers[PREDICTED_HEADER] = f"{1000 * route.predicted_s:.1f}"
        if body.stream:
            # The background cancel also covers a client gone before the first chunk, when the
            # generator never started and its ``finally`` cannot run.
            return StreamingResponse(self._sse(body, stream, events, choices, route, started),
                                     media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"},
                                     background=BackgroundTask(stream.cancel))
        return await self._complete(body, stream, events, choices, route, started, raw_request, headers, entries)

    def _targets(self, body: CompletionRequest, raw_request: Request) -> SloTargets:
        """The request's latency targets: body fields, else headers, else the server's defaults."""
        s = self.settings
        return SloTargets(slo_ms_from(body.latency_slo_ms, raw_request, s.slo_ms),
                          slo_ms_from(body.ttft_slo_ms, raw_request, s.ttft_slo_ms, TTFT_SLO_HEADER),
                          slo_ms_from(body.tpot_slo_ms, raw_request, s.tpot_slo_ms, TPOT_SLO_HEADER))

    def _refusal(self, route: Route, reason: str) -> APIError:
        """The 429 of a request the backend refused before its first token."""
        retry = {"retry-after": str(self.settings.retry_after_s)}
        if reason == "queue_full":
            return APIError(429, "the queue is full; retry later", type_="rate_limit_error", code="queue_full",
                            headers=retry)
        self.metrics.shed.labels(route.policy).inc()
        self.metrics.observe_slo(route.policy, "shed")
        return APIError(429, f"the scheduler predicts that no allowed width can meet this request's latency "
                             f"targets ({route.targets.describe()}) now; retry later", type_="rate_limit_error",
                        code="slo_unattainable", headers=retry)

    async def _first_delta(self, events: AsyncIterator, started: float) -> tuple[int, Delta] | BaseException | None:
        """The first delta, or what ended the request before one came (None: the deadline passed)."""
        timeout_s = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(anext(events), None if not timeout_s else
                                          max(0.0, started + timeout_s - time.monotonic()))
        except TimeoutError:
            return None
        except (StopAsyncIteration, BackendError) as exc:
            return exc

    async def _submit(self, prompts, widths: tuple[str, ...], body: CompletionRequest, slo: Slo,
                      started: float) -> CompletionStream:
        """``backend.submit`` within the request's deadline (a proxy waits there for its upstream's head)."""
        timeout_s = self.settings.request_timeout_s
        if timeout_s is None:
            return await self.backend.submit(prompts, widths, body, slo)
        try:
            # asyncio.timeout, not wait_for: no task of its own, so an engine's submit still runs
            # before the next request's policy decision reads the load.
            async with asyncio.timeout(max(0.0, started + timeout_s - time.monotonic())):
                return await self.backend.submit(prompts, widths, body, slo)
        except TimeoutError:
            raise APIError(504, f"the backend did not start answering within this server's deadline of "
                                f"{timeout_s:g} s", type_="timeout_error", code="deadline_exceeded") from None

    def _response_entries(self, body: CompletionRequest, prompts) -> int:
        """An upper bound on the token entries of the response: tokens (echoed prompts and generated),
        each with its logprob and ``logprobs`` alternatives when asked."""
        tokens = (prompts.prompt_tokens if body.echo else 0) + prompts.n_prompts * body.max_tokens
        n_ctx = self.backend.max_model_len
        if n_ctx is not None:
            tokens = min(tokens, prompts.n_prompts * n_ctx)
        return tokens * (2 + body.logprobs) if body.logprobs is not None else tokens

    def _generable_tokens(self, max_tokens: int, longest_prompt: int) -> int:
        """``max_tokens`` as far as the context window lets it go: what predictions should price."""
        n_ctx = self.backend.max_model_len
        return max_tokens if n_ctx is None else max(0, min(max_tokens, n_ctx - longest_prompt))

    def _retry_after(self, seconds: float) -> int:
        """Whole seconds for ``Retry-After``: at least the default, at most the configured cap."""
        s = self.settings
        wait = math.ceil(seconds) if math.isfinite(seconds) else s.max_retry_after_s
        return int(min(s.max_retry_after_s, max(s.retry_after_s, wait)))

    def _unit(self, body: CompletionRequest, raw_request: Request) -> str | None:
        """The experiment unit id: the ``user`` field or the configured header."""
        source = self.experiment.config.unit
        if source == "user":
            return body.user or None
        name = source.removeprefix("header:")
        values = raw_request.headers.getlist(name)
        if len(values) > 1:  # which one is the unit? (the guard refuses repeats of the headers it knows)
            raise APIError(400, f"header {name!r} (the experiment's unit) given more than once; send it once",
                           param=name, code="duplicate_header")
        return values[0] if values and values[0] else None

    def _pinned_width(self, body: CompletionRequest) -> str | None:
        name, widths = self.model_name, self.backend.widths
        model_name, sep, model_width = body.model.partition(":")
        if model_name != name:
            raise APIError(404, f"the model {body.model!r} does not exist; available: {name!r} or "
                                f"'{name}:<width>' with width in {widths}", param="model", code="model_not_found")
        if sep and model_width not in widths:
            raise APIError(404, f"unknown width {model_width!r} in model {body.model!r}; known: {widths}",
                           param="model", code="width_not_found")
        if body.width is not None and body.width not in widths:
            raise APIError(404, f"unknown width {body.width!r}; known: {widths}", param="width",
                           code="width_not_found")
        if sep and body.width is not None and body.width != model_width:
            raise APIError(400, f"model pins width {model_width!r} but width is {body.width!r}", param="width")
        return model_width if sep else body.width

# --- the app -------------------------------------------------------------------------------------


def needs_cost_model(settings: FrontendSettings) -> bool:
    """Whether the server's policy, or any arm of its experiment, needs a latency predictor."""
    from router.policies import needs_predictor

    specs = [settings.policy]
    if settings.experiment is not None:
        specs += [arm.policy.spec() for arm in load_experiment(settings.experiment).arms]
    return any(needs_predictor(spec) for spec in specs)


def build_frontend_app(backend: Backend, settings: FrontendSettings, *, title: str, description: str,
                       quality: dict[str, float] | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``backend``: every route, guard, policy, experiment and metric."""
    widths = backend.widths
    context = PolicyContext(predictor=backend.cost, default_slo_ms=settings.slo_ms, min_width=settings.min_width,
                            shed=settings.shed, dispatch=backend.dispatches_width)
    policy = make_policy(settings.policy, widths, context)
    corrections = backend.cost.corrections if backend.cost is not None else (
        lambda: getattr(backend.engine_counters(), "corrections", {}))
    metrics = ServingMetrics(backend.load, corrections=corrections,
                             engine_counters=backend.engine_counters)
    live, ab_log = None, None
    if settings.experiment is not None:
        live = LiveExperiment(load_experiment(settings.experiment), widths, context, source=settings.experiment)
        ab_log = ABLog(settings.ab_db or default_shard_path(live.config.name))
        log.info("experiment %s, log %s", describe(live), ab_log.path)
    frontend = Frontend(backend, policy, metrics, settings, quality=quality, experiment=live, ab_log=ab_log)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Iterator[None]:
        async with backend.lifespan():
            log.info("%s: serving %s (widths %s, policy %s)", title, backend.name, widths, policy.name)
            yield
        if ab_log is not None:
            ab_log.close()
        frontend._render_pool.shutdown(wait=False)

    app = FastAPI(title=title, description=description, lifespan=lifespan)
    app.state.settings = settings
    app.state.backend = backend
    app.state.metrics = metrics
    app.state.frontend = frontend
    app.state.experiment = live
    app.state.ab_log = ab_log
    install_error_handlers(app, metrics)
    install_request_guard(app, settings)
    install_experiment_routes(app, live, ab_log, metrics, settings)
    install_guardrail_monitor(app, live, ab_log, metrics, settings.admin_key)
    document_api(app, [card.id for card in frontend.models().data], widths, backend.vocab_size,
                 settings.max_feedback_abs)

    @app.post("/v1/completions", responses=COMPLETION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await frontend.create_completion(body, request)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return frontend.models()

    @app.get("/health", responses={503: {"description": "shutting down, the engine is gone, or no backend can serve"}})
    async def health() -> JSONResponse:
        ok, details = await backend.health()
        if ok and not backend.accepting:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": backend.name, **details},
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
