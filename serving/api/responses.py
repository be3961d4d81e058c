"""The front end's responses: a whole JSON body or server-sent events, with SLO accounting, metrics
and the A/B exposure of every request that ends, however it ends.

:class:`ResponseWriter` is the half of :class:`serving.api.frontend.Frontend` that runs once a
backend has accepted a request; it reads the front end's ``backend``, ``policy``, ``metrics``,
``settings``, ``quality``, ``ab_log``, ``_background`` and ``_render_pool``. Torch-free.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from router.ab_log import Exposure
from serving.api.backend import BackendError, CompletionStream, Delta, LogprobEntry
from serving.api.http import WIDTH_HEADER, APIError
from serving.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    error_body,
)
from serving.api.request_state import Choice, Route, ttft_tpot

DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; only ever seen in metrics

# A response that may hold more token entries than this is rendered to JSON on a worker thread, so
# the event loop (other requests, /health) keeps running: 200 echoed prompts with logprobs built a
# 27 MB body on the loop and stalled /health for 1.5 s.
INLINE_JSON_ENTRIES = 4096
LOOP_YIELD_ENTRIES = 64  # a delta with more logprob entries than this lets the loop run after it


class ResponseWriter:
    """Rendering, accounting and logging of accepted requests (see the module doc)."""

    async def _log_exposure(self, route: Route, status: int, elapsed: float, completion_tokens: int,
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

    async def _complete(self, body: CompletionRequest, stream: CompletionStream, events: AsyncIterator,
                        choices: list[Choice], route: Route, started: float, raw_request: Request,
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

    async def _consume(self, events: AsyncIterator, choices: list[Choice], width: str) -> None:
        async for index, delta in events:
            self._apply(choices[index], delta, width)
            if len(delta.logprobs) > LOOP_YIELD_ENTRIES:
                # Deltas already queued come without a pause: let other requests (and /health) run
                # between big ones (an echoed prompt's logprobs), not after all of them.
                await asyncio.sleep(0)

    async def _sse(self, body: CompletionRequest, stream: CompletionStream, events: AsyncIterator,
                   choices: list[Choice], route: Route, started: float) -> AsyncIterator[str]:
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

    def _apply(self, choice: Choice, delta: Delta, width: str) -> None:
        """Fold one delta into ``choice``; per-token metrics are observed here."""
        choice.text += delta.text
        if delta.tokens:
            if choice.first_token_at is None:
                choice.first_token_at = delta.time
            elif delta.tokens == 1:  # a plain answer's tokens after its first come as one delta: no gap to see
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
    def _usage(stream: CompletionStream, choices: list[Choice], route: Route) -> UsageInfo:
        if stream.usage is not None:
            prompt, completion = stream.usage
        else:
            prompt, completion = route.info.prompt_tokens, sum(c.completion_tokens for c in choices)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _finish_metrics(self, choices: list[Choice], route: Route, started: float, status: int,
                        usage: UsageInfo | None = None) -> None:
        m, width = self.metrics, route.width
        elapsed = time.monotonic() - started
        policy = route.policy or self.policy.name
        if status == 429 and route.targets.any:  # shed after its first tokens (a proxy's upstream, a prompt)
            m.shed.labels(policy).inc()
            m.observe_slo(policy, "shed")
        elif route.targets.any:
            good = status == 200 and route.targets.met(elapsed, *ttft_tpot(choices, started))
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

async def chain_first(first: tuple[int, Delta] | BaseException | None, rest: AsyncIterator) -> AsyncIterator:
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


def _late_shed_message(route: Route) -> str:
    return (f"waited for a batch slot until its latency targets ({route.targets.describe()}) could no longer be "
            f"met; retry later")


def _sse_error(message: str, type_: str, code: str) -> str:
    """A final SSE error event (the OpenAI error body) followed by ``[DONE]``."""
    return f"data: {json.dumps(error_body(message, type_, code=code))}\n\ndata: [DONE]\n\n"
