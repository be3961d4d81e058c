"""The one OpenAI-compatible front end, for ``matta serve`` (engine backend) and ``matta route`` (HTTP backends).

:func:`build_frontend_app` wires a :class:`~serving.backend.Backend` behind the same surface:
``/v1/completions`` (JSON or SSE), ``/v1/models`` with pinned ids, ``/v1/feedback`` and
``/admin/experiment`` (A/B), ``/health``, ``/metrics``; the request guard (API key, body limit
and deadline, concurrency cap), the OpenAI error bodies, the width policy and A/B arms, SLO
accounting and metrics, request deadlines and client disconnects. :class:`Frontend` holds the
request logic, kept free of FastAPI routing as vLLM's ``serving_completion.py`` is: it returns a
response or raises :class:`~serving.http.APIError`, which the app turns into the error body.
Torch-free.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask

from router.ab_log import ABLog, Exposure, default_shard_path
from router.experiment import LiveExperiment, load_experiment
from router.policies import make_policy
from router.policy import LoadSnapshot, PolicyContext, RequestInfo, WidthPolicy, decide_width
from serving.ab_guardrails import install_guardrail_monitor
from serving.ab_routes import describe, install_experiment_routes
from serving.backend import Backend, BackendError, CompletionStream, Delta, LogprobEntry
from serving.connection import RECEIVED_AT
from serving.core_protocol import REFUSALS, Slo
from serving.http import (
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
from serving.metrics import ServingMetrics
from serving.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
    completion_id,
    error_body,
)
from serving.settings import FrontendSettings

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; only ever seen in metrics

# A response that may hold more token entries than this is rendered to JSON on a worker thread, so
# the event loop (other requests, /health) keeps running: 200 echoed prompts with logprobs built a
# 27 MB body on the loop and stalled /health for 1.5 s.
INLINE_JSON_ENTRIES = 4096
LOOP_YIELD_ENTRIES = 64  # a delta with more logprob entries than this lets the loop run after it


@dataclass(frozen=True)
class SloTargets:
    """A request's latency targets in ms (None: not set): end to end, first token, per output token."""

    e2e_ms: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def any(self) -> bool:
        return self.e2e_ms is not None or self.ttft_ms is not None or self.tpot_ms is not None

    def slo(self, arrival: float, shed: bool) -> Slo:
        """The targets as the scheduler takes them: instants on the monotonic clock."""
        return Slo(e2e_deadline=None if self.e2e_ms is None else arrival + self.e2e_ms / 1000,
                   ttft_deadline=None if self.ttft_ms is None else arrival + self.ttft_ms / 1000,
                   tpot_s=None if self.tpot_ms is None else self.tpot_ms / 1000, shed=shed)

    def met(self, e2e_s: float, ttft_s: float | None, tpot_s: float | None) -> bool:
        """Good only if every target set is met (vLLM's and DistServe's goodput)."""
        return ((self.e2e_ms is None or e2e_s <= self.e2e_ms / 1000)
                and (self.ttft_ms is None or (ttft_s is not None and ttft_s <= self.ttft_ms / 1000))
                and (self.tpot_ms is None or tpot_s is None or tpot_s <= self.tpot_ms / 1000))

    def describe(self) -> str:
        parts = [f"{name} {value:g} ms" for name, value in
                 (("end to end", self.e2e_ms), ("first token", self.ttft_ms), ("per token", self.tpot_ms))
                 if value is not None]
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class _Route:
    """How a request was routed, for the SLO metrics, the cost model and the A/B log when it ends."""

    width: str
    reason: str
    targets: SloTargets
    predicted_s: float | None
    info: RequestInfo
    load: LoadSnapshot
    policy: str = ""  # name of the policy that chose (the server's, or the A/B arm's)
    request_id: str = ""
    arm: str | None = None  # A/B arm, when the request is in an experiment
    experiment: str | None = None
    unit: str | None = None
    assignment: str | None = None

    @property
    def slo_s(self) -> float | None:
        return None if self.targets.e2e_ms is None else self.targets.e2e_ms / 1000


@dataclass
class _Choice:
    """What one prompt of a request has produced so far, plus its timings for the metrics."""

    text: str = ""
    tokens: int = 0
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    text_offset: int = 0  # characters already streamed (logprobs text_offset when streaming)


class Frontend:
    """``/v1/completions`` and ``/v1/models`` over one :class:`~serving.backend.Backend`."""

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
            route = _Route(width, decision.reason, targets, predicted, info, load, policy=policy.name,
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
                events = _chain(first, events)
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
        choices = [_Choice() for _ in range(prompts.n_prompts)]
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

    def _refusal(self, route: _Route, reason: str) -> APIError:
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

    async def _log_exposure(self, route: _Route, status: int, elapsed: float, completion_tokens: int,
                            wait: bool = True) -> None:
        """Record an A/B exposure; with ``wait`` (the default) return only once it is durable."""
        if route.arm is None or self.ab_log is None:
            return
        self.metrics.ab_exposures.labels(route.experiment, route.arm, route.width, str(status)).inc()
        row = Exposure(route.request_id, route.experiment, route.unit, route.assignment, route.arm, route.policy,
                       route.width, status, elapsed, route.info.prompt_tokens, completion_tokens, time.time())
        if wait:
            await self.ab_log.write(row)
        else:
            task = asyncio.ensure_future(self.ab_log.write(row))
            self._background.add(task)  # held until done, or the loop could drop it half-written
            task.add_done_callback(self._background.discard)

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

    # --- responses -------------------------------------------------------------------------------

    async def _complete(self, body: CompletionRequest, stream: CompletionStream, events: AsyncIterator,
                        choices: list[_Choice], route: _Route, started: float, raw_request: Request,
                        headers: dict[str, str], entries: int) -> Response:
        """Collect a whole response, cancelling generation if the client goes away or the deadline passes."""
        width = route.width
        consume = asyncio.ensure_future(self._consume(events, choices, width))
        timeout_s = self.settings.request_timeout_s
        deadline = started + timeout_s if timeout_s else float("inf")
        try:
            while not consume.done():
                await asyncio.wait({consume}, timeout=DISCONNECT_POLL_S)
                if not consume.done() and time.monotonic() > deadline:
                    self._finish_metrics(choices, route, started, 504)
                    await self._log_exposure(route, 504, time.monotonic() - started, 0)
                    raise APIError(504, f"the completion ran past this server's deadline of {timeout_s:g} s "
                                        "and was cancelled; ask for fewer max_tokens", type_="timeout_error",
                                   code="deadline_exceeded", headers={WIDTH_HEADER: width})
                if not consume.done() and await raw_request.is_disconnected():
                    self._finish_metrics(choices, route, started, CLIENT_CLOSED)
                    await self._log_exposure(route, CLIENT_CLOSED, time.monotonic() - started, 0, wait=False)
                    return Response(status_code=CLIENT_CLOSED)
            consume.result()
        except BackendError as exc:
            self._finish_metrics(choices, route, started, exc.status)
            await self._log_exposure(route, exc.status, time.monotonic() - started, 0)
            raise APIError(exc.status, exc.message, exc.type, code=exc.code,
                           headers={"retry-after": str(self.settings.retry_after_s), WIDTH_HEADER: width}) from exc
        finally:
            consume.cancel()
            stream.cancel()
        if any(c.finish_reason == "shed" for c in choices):
            self._finish_metrics(choices, route, started, 429)
            await self._log_exposure(route, 429, time.monotonic() - started, 0)
            raise APIError(429, _late_shed_message(route), type_="rate_limit_error", code="slo_unattainable",
                           headers={"retry-after": str(self.settings.retry_after_s), WIDTH_HEADER: width})
        usage = self._usage(stream, choices, route)
        if any(c.finish_reason == "abort" for c in choices):
            self._finish_metrics(choices, route, started, 503)
            await self._log_exposure(route, 503, time.monotonic() - started, usage.completion_tokens)
            raise APIError(503, "the engine aborted this completion (shutting down, or an engine error); retry",
                           "service_unavailable", code="aborted",
                           headers={"retry-after": str(self.settings.retry_after_s), WIDTH_HEADER: width})

        def render() -> bytes:
            return CompletionResponse(
                id=route.request_id,
                model=body.model,
                choices=[CompletionChoice(index=i, text=c.text, logprobs=self._logprobs(body, c.logprobs, 0),
                                          finish_reason=c.finish_reason)
                         for i, c in enumerate(choices)],
                usage=usage,
            ).model_dump_json().encode()

        if entries > INLINE_JSON_ENTRIES:
            content = await asyncio.get_running_loop().run_in_executor(self._render_pool, render)
        else:
            content = render()
        self._finish_metrics(choices, route, started, 200, usage)
        # The exposure is durable before the client can see the answer (see router/ab_log.py).
        await self._log_exposure(route, 200, time.monotonic() - started, usage.completion_tokens)
        return Response(content, media_type="application/json", headers=headers)

    async def _consume(self, events: AsyncIterator, choices: list[_Choice], width: str) -> None:
        async for index, delta in events:
            self._apply(choices[index], delta, width)
            if len(delta.logprobs) > LOOP_YIELD_ENTRIES:
                # Deltas already queued come without a pause: let other requests (and /health) run
                # between big ones (an echoed prompt's logprobs), not after all of them.
                await asyncio.sleep(0)

    async def _sse(self, body: CompletionRequest, stream: CompletionStream, events: AsyncIterator,
                   choices: list[_Choice], route: _Route, started: float) -> AsyncIterator[str]:
        """Server-sent events: one chunk per step with new text, then usage (if asked) and ``[DONE]``.

        Whatever ends the stream early (the deadline, a shed, a failed backend) ends it with an
        error event and ``[DONE]``, so a client always sees why."""
        width = route.width
        request_id, created = route.request_id, int(time.time())
        status = CLIENT_CLOSED
        logged = False
        timeout_s = self.settings.request_timeout_s
        deadline = started + timeout_s if timeout_s else None
        try:
            while True:
                try:
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    index, delta = await asyncio.wait_for(anext(events), remaining)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    status = 504
                    yield _sse_error(f"the completion ran past this server's deadline of {timeout_s:g} s and was "
                                     "cancelled", "timeout_error", "deadline_exceeded")
                    return
                except BackendError as exc:
                    status = exc.status
                    yield _sse_error(exc.message, exc.type, exc.code)
                    return
                choice = choices[index]
                if delta.finish_reason == "shed":
                    self._apply(choice, delta, width)
                    status = 429
                    yield _sse_error(_late_shed_message(route), "rate_limit_error", "slo_unattainable")
                    return
                self._apply(choice, delta, width)
                logprobs = self._logprobs(body, delta.logprobs, choice.text_offset)
                choice.text_offset += len(delta.text)
                if not delta.text and not delta.finish_reason and not (logprobs and logprobs.tokens):
                    continue
                chunk = CompletionResponse(
                    id=request_id, created=created, model=body.model,
                    choices=[CompletionChoice(index=index, text=delta.text, logprobs=logprobs,
                                              finish_reason=delta.finish_reason)],
                )
                yield f"data: {chunk.model_dump_json()}\n\n"
            usage = self._usage(stream, choices, route)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield "data: " + json.dumps({"id": request_id, "object": "text_completion", "created": created,
                                             "model": body.model, "choices": [], "usage": usage.model_dump()}) + "\n\n"
            status = 503 if any(c.finish_reason == "abort" for c in choices) else 200
            self._finish_metrics(choices, route, started, status, usage)
            await self._log_exposure(route, status, time.monotonic() - started, usage.completion_tokens)
            logged = True
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel()  # a no-op when everything finished; frees the slots when the client left
            if not logged:  # ended early: record it, without waiting on the disk
                self._finish_metrics(choices, route, started, status)
                await self._log_exposure(route, status, time.monotonic() - started, 0, wait=False)

    def _apply(self, choice: _Choice, delta: Delta, width: str) -> None:
        """Fold one delta into ``choice``; per-token metrics are observed here."""
        choice.text += delta.text
        if delta.tokens:
            if choice.first_token_at is None:
                choice.first_token_at = delta.time
            else:
                self.metrics.inter_token_latency.labels(width).observe(delta.time - choice.last_token_at)
            choice.last_token_at = delta.time
            choice.tokens += delta.tokens
        choice.logprobs += delta.logprobs
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.completion_tokens = delta.completion_tokens or choice.tokens
            if delta.queue_s is not None:
                self.metrics.queue_time.labels(width).observe(delta.queue_s)

    @staticmethod
    def _logprobs(body: CompletionRequest, entries: list[LogprobEntry], offset: int) -> CompletionLogprobs | None:
        """The OpenAI ``logprobs`` object for ``entries``, the first at character ``offset`` of the text."""
        if body.logprobs is None:
            return None
        out = CompletionLogprobs()
        for entry in entries:
            out.tokens.append(entry.token)
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append(entry.top)
            out.text_offset.append(offset)
            offset += len(entry.token)
        return out

    @staticmethod
    def _usage(stream: CompletionStream, choices: list[_Choice], route: _Route) -> UsageInfo:
        if stream.usage is not None:
            prompt, completion = stream.usage
        else:
            prompt, completion = route.info.prompt_tokens, sum(c.completion_tokens for c in choices)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _finish_metrics(self, choices: list[_Choice], route: _Route, started: float, status: int,
                        usage: UsageInfo | None = None) -> None:
        m, width = self.metrics, route.width
        elapsed = time.monotonic() - started
        policy = route.policy or self.policy.name
        if status == 429 and route.targets.any:  # shed after its first tokens (a proxy's upstream, a prompt)
            m.shed.labels(policy).inc()
            m.observe_slo(policy, "shed")
        elif route.targets.any:
            good = status == 200 and route.targets.met(elapsed, *_ttft_tpot(choices, started))
            outcome = "failed" if status != 200 else ("met" if good else "missed")
            m.observe_slo(policy, outcome, self.quality.get(width, 0.0))
        generated = usage.completion_tokens if usage is not None else sum(c.tokens for c in choices)
        if status == 200:
            cost = self.backend.cost
            if cost is not None:
                cost.observe_request(width, route.info, route.load, elapsed, route.predicted_s, generated)
            if route.predicted_s:
                m.prediction_ratio.labels(policy, width).observe(elapsed / route.predicted_s)
                m.prediction_error.labels(policy, width).observe(abs(elapsed - route.predicted_s))
        m.requests.labels(width, str(status)).inc()
        m.prompt_tokens.labels(width).inc(usage.prompt_tokens if usage is not None else route.info.prompt_tokens)
        m.generation_tokens.labels(width).inc(generated)
        for c in choices:
            if c.first_token_at is not None:
                m.time_to_first_token.labels(width).observe(c.first_token_at - started)
        if status == 200:
            m.e2e_latency.labels(width).observe(elapsed)


def _ttft_tpot(choices: list[_Choice], started: float) -> tuple[float | None, float | None]:
    """The request's time to first token and time per output token (vLLM's definitions, the worst
    prompt's): TPOT = (last token - first token) / (tokens - 1)."""
    firsts = [c.first_token_at for c in choices if c.first_token_at is not None]
    ttft = max(firsts) - started if len(firsts) == len(choices) and firsts else None
    tpots = [(c.last_token_at - c.first_token_at) / (c.tokens - 1) for c in choices
             if c.first_token_at is not None and c.tokens > 1]
    return ttft, max(tpots) if tpots else None


async def _chain(first: tuple[int, Delta] | BaseException | None, rest: AsyncIterator) -> AsyncIterator:
    """The request's deltas again, ``first`` (already read) before the rest: what ended the request
    early is raised where it would have been (None, the deadline: waiting on an idle stream)."""
    if isinstance(first, StopAsyncIteration):
        return
    if isinstance(first, BaseException):
        raise first
    if first is None:
        await asyncio.Event().wait()  # the deadline already passed: the caller's timeout fires
    yield first
    async for item in rest:
        yield item


def _late_shed_message(route: _Route) -> str:
    return (f"waited for a batch slot until its latency targets ({route.targets.describe()}) could no longer be "
            f"met; retry later")


def _sse_error(message: str, type_: str, code: str) -> str:
    """A final SSE error event (the OpenAI error body) followed by ``[DONE]``."""
    return f"data: {json.dumps(error_body(message, type_, code=code))}\n\ndata: [DONE]\n\n"


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
