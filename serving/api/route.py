"""``matta route CONFIG.yaml``: the one front end over OpenAI-compatible backends, one per width.

Backends are pinned ``matta serve`` instances or vLLM servers of exported widths. The proxy is
:func:`serving.api.frontend.build_frontend_app` with :class:`HttpBackend` plugged in, so it speaks
exactly what ``matta serve`` speaks (routes, headers, errors, metrics, A/B experiments, request
guard, deadlines, SIGTERM drain) and chooses widths with the same policies. It cannot see inside
a backend, so its cost model (:class:`router.cost.BackendCostModel`) learns each one's latency
from the answers it relays.

Every request goes upstream as a stream (``stream: true`` with usage), whatever the client
asked: the front end then answers JSON or SSE itself, can bound the whole request by its
deadline, cancels upstream when the client leaves, and turns an upstream that dies mid-answer
or sends something that is not a completion into a 502 (or a final SSE error event).

Config (YAML; every field of :class:`serving.settings.RouteSettings`)::

    model: matta-shakespeare          # the id clients ask for; '<model>:<width>' pins a width
    policy: slo                       # or fixed:<width>; same names as `matta serve --policy`
    slo_ms: 800                       # default latency target for requests that give none
    shed: false                       # slo policy: 429 instead of best effort
    checkpoint: checkpoints/default   # optional: per-width quality from its training.json, chat template
    chat_template: chatml             # optional: for /v1/chat/completions when the checkpoint has none
    quality: {s: 0.016, ta: 0.020}    # optional: explicit per-width quality (overrides checkpoint)
    max_model_len: 512                # optional: the backends' context, so predictions clamp max_tokens
    backends:                         # narrowest first
      - {width: s, url: "http://127.0.0.1:8001", model: "matta-shakespeare:s"}
      - {width: ta, url: "http://127.0.0.1:8002", model: "matta-shakespeare:ta"}
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from matta.configfile import read_yaml
from router.cost import BackendCostModel
from router.policy import LoadSnapshot
from router.quality import width_quality
from serving.api import server
from serving.api.backend import BackendError, Delta, LogprobEntry, PreparedPrompts
from serving.api.chat import install_chat_route
from serving.api.chat_template import checkpoint_chat_template, resolve_chat_template
from serving.api.frontend import build_frontend_app
from serving.api.http import APIError
from serving.api.protocol import CompletionRequest
from serving.messages import Slo
from serving.settings import BackendSpec, RouteSettings, settings_from

log = logging.getLogger(__name__)

MATTA_FIELDS = ("width", "latency_slo_ms", "ttft_slo_ms", "tpot_slo_ms")  # extensions a vLLM backend does not know
MAX_UPSTREAM_ERROR_CHARS = 1000  # an upstream error message is relayed up to this length


def load_route_settings(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RouteSettings:
    """The route config file, over ``MATTA_*`` variables, under ``overrides`` (CLI flags)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a route config is a mapping of settings, got {type(data).__name__}")
    return settings_from(RouteSettings, data, overrides or {}, source=str(path))


class HttpStream:
    """One request relayed from an upstream SSE stream, as :class:`~serving.api.backend.Delta` per chunk."""

    def __init__(self, backend: HttpBackend, width: str, upstream: httpx.Response, n_prompts: int) -> None:
        self.usage: tuple[int, int] | None = None
        self._backend, self._width, self._upstream, self._n = backend, width, upstream, n_prompts
        self._released = False

    def __aiter__(self) -> AsyncIterator[tuple[int, Delta]]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        where = f"backend for width {self._width!r}"
        open_choices, tokens = set(range(self._n)), [0] * self._n
        done = False
        try:
            async for line in self._upstream.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                for index, delta in self._parse(data, where):
                    if index not in open_choices:
                        raise BackendError(502, f"{where} sent a chunk for choice {index}, which is not open",
                                           "bad_upstream_response")
                    tokens[index] += delta.tokens
                    if delta.finish_reason is not None:
                        open_choices.discard(index)
                        delta.completion_tokens = tokens[index]
                    yield index, delta
        except httpx.HTTPError as exc:
            raise BackendError(502, f"{where} failed mid-answer: {type(exc).__name__}", "upstream_failed") from exc
        finally:
            self.cancel()
        if not done or open_choices:
            raise BackendError(502, f"{where} closed its stream before the answer was complete",
                               "upstream_failed")

    def _parse(self, data: str, where: str) -> list[tuple[int, Delta]]:
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            chunk = None
        if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
            error = chunk["error"]
            status = {"rate_limit_error": 429, "timeout_error": 504}.get(error.get("type"), 502)
            raise BackendError(status, f"{where}: {str(error.get('message'))[:MAX_UPSTREAM_ERROR_CHARS]}",
                               str(error.get("code") or "upstream_error"), str(error.get("type") or "upstream_error"))
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            raise BackendError(502, f"{where} sent a stream chunk that is not a completion", "bad_upstream_response")
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int) \
                and isinstance(usage.get("completion_tokens"), int):
            self.usage = (usage["prompt_tokens"], usage["completion_tokens"])
        now, out = time.monotonic(), []
        for choice in chunk["choices"]:
            if not isinstance(choice, dict) or not isinstance(choice.get("index"), int) \
                    or not isinstance(choice.get("text", ""), str):
                raise BackendError(502, f"{where} sent a choice that is not a completion", "bad_upstream_response")
            text = choice.get("text") or ""
            out.append((choice["index"], Delta(text, now, tokens=1 if text else 0,
                                               logprobs=_logprob_entries(choice.get("logprobs")),
                                               finish_reason=choice.get("finish_reason"))))
        return out

    def cancel(self) -> None:
        """Close the upstream response (the backend sees the client leave) and free the slot; idempotent."""
        if self._released:
            return
        self._released = True
        self._backend.release(self._width)
        try:
            asyncio.get_running_loop().create_task(self._upstream.aclose())
        except RuntimeError:  # no loop any more: the connection goes with the client
            pass


def _logprob_entries(logprobs: Any) -> list[LogprobEntry]:
    """A streamed chunk's OpenAI ``logprobs`` object as entries (offsets are the front end's business)."""
    if not isinstance(logprobs, dict):
        return []
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return [LogprobEntry(str(t), v, top) for t, v, top in zip(tokens, values, tops, strict=False)]


class HttpBackend:
    """One OpenAI-compatible server per width, reached over HTTP."""

    def __init__(self, settings: RouteSettings) -> None:
        self.settings = settings
        self.name = settings.model
        self.widths = settings.widths
        self.max_model_len = settings.max_model_len
        self.vocab_size = None
        self.cost = BackendCostModel(self.widths)
        self.dispatches_width = False  # a backend serves one width: the choice is made on arrival
        self.backends: dict[str, BackendSpec] = {b.width: b for b in settings.backends}
        self._in_flight = dict.fromkeys(self.widths, 0)
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None
        self._accepting = True

    @property
    def accepting(self) -> bool:
        return self._accepting

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        # No read timeout of its own: the front end bounds the whole request (request_timeout_s).
        timeout = httpx.Timeout(connect=10.0, read=self.settings.request_timeout_s, write=30.0, pool=None)
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits)
        log.info("routing %s over %s", self.name, {w: b.url for w, b in self.backends.items()})
        try:
            yield
        finally:
            self._accepting = False
            await self._client.aclose()

    def prepare(self, prompt) -> PreparedPrompts:
        """Without a tokenizer: exact counts for token ids, ~4 characters per token for text."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        sizes = [max(1, len(p) // 4) if isinstance(p, str) else len(p) for p in prompts]
        return PreparedPrompts(n_prompts=len(prompts), prompt_tokens=sum(sizes), longest_prompt=max(sizes),
                               payload=prompt)

    def load(self) -> LoadSnapshot:
        with self._lock:
            running = dict(self._in_flight)
        limit = self.settings.max_in_flight
        return LoadSnapshot(running=sum(running.values()), waiting=0, running_by_width=running,
                            waiting_by_width=dict.fromkeys(self.widths, 0), max_batch=limit, max_queue=limit)

    def engine_counters(self) -> None:
        return None  # the backends' engines report their own

    def release(self, width: str) -> None:
        with self._lock:
            self._in_flight[width] -= 1

    async def submit(self, prompts: PreparedPrompts, widths: tuple[str, ...], body: CompletionRequest,
                     slo: Slo) -> HttpStream:
        width = widths[0]  # a backend serves one width: the policy chose it on arrival
        limit = self.settings.max_in_flight
        retry = {"retry-after": str(self.settings.retry_after_s)}
        with self._lock:
            running = sum(self._in_flight.values())
            if running >= limit:
                raise APIError(429, f"{running} requests in flight (limit {limit}); retry later",
                               type_="rate_limit_error", code="queue_full", headers=retry)
            self._in_flight[width] += 1
        backend = self.backends[width]
        payload = body.model_dump(exclude_none=True, exclude=set(MATTA_FIELDS))
        payload.update(model=backend.model, stream=True, stream_options={"include_usage": True})
        try:
            upstream = await self._client.send(
                self._client.build_request("POST", f"{backend.url}/v1/completions", json=payload), stream=True)
        except httpx.HTTPError as exc:
            self.release(width)
            raise APIError(503, f"backend for width {width!r} ({backend.url}) failed: {type(exc).__name__}",
                           type_="service_unavailable", code="backend_unavailable", headers=retry) from exc
        except BaseException:
            self.release(width)
            raise
        if upstream.status_code != 200 or not upstream.headers.get("content-type", "").startswith("text/event-stream"):
            try:
                content = await upstream.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                self.release(width)
                await upstream.aclose()
            raise _upstream_refusal(width, upstream, content)
        return HttpStream(self, width, upstream, prompts.n_prompts)

    async def health(self) -> tuple[bool, dict]:
        status = {}
        for w, b in self.backends.items():
            try:
                r = await self._client.get(f"{b.url}/health", timeout=5)
                status[w] = "ok" if r.status_code == 200 else f"http {r.status_code}"
            except httpx.HTTPError as exc:
                status[w] = type(exc).__name__
        return any(v == "ok" for v in status.values()), {"backends": status}


def _upstream_refusal(width: str, upstream: httpx.Response, content: bytes) -> APIError:
    """An upstream's non-stream answer as the client's error: its own status and OpenAI error when it
    sent one (a backend's 429 stays a 429, with its Retry-After), else a 502 saying what came."""
    where = f"backend for width {width!r}"
    try:
        error = json.loads(content).get("error")
    except (ValueError, AttributeError):
        error = None
    headers = {k: v for k, v in upstream.headers.items() if k.lower() == "retry-after"}
    if upstream.status_code >= 400 and isinstance(error, dict) and isinstance(error.get("message"), str):
        return APIError(upstream.status_code, f"{where}: {error['message'][:MAX_UPSTREAM_ERROR_CHARS]}",
                        type_=str(error.get("type") or "upstream_error"), param=error.get("param"),
                        code=error.get("code"), headers=headers)
    kind = upstream.headers.get("content-type", "no content type")
    return APIError(502, f"{where} answered HTTP {upstream.status_code} ({kind[:100]}) instead of a completion "
                         "stream", type_="upstream_error", code="bad_upstream_response")


def build_route_app(settings: RouteSettings) -> FastAPI:
    """The proxy app: the one front end over :class:`HttpBackend`."""
    backend = HttpBackend(settings)
    app = build_frontend_app(backend, settings, title="matta route",
                             description="OpenAI-compatible width router over backends", quality=_quality(settings))
    app.state.predictor = backend.cost
    # Chat is rendered here and forwarded as a completion: the template is the checkpoint's or --chat-template.
    template = (checkpoint_chat_template(settings.checkpoint, settings.chat_template) if settings.checkpoint is not None
                else resolve_chat_template(settings.chat_template, None, {}))
    install_chat_route(app, template)
    return app


def _quality(settings: RouteSettings) -> dict[str, float]:
    if settings.quality is not None:
        missing = [w for w in settings.widths if w not in settings.quality]
        if missing:
            raise ValueError(f"quality: no value for width(s) {missing}")
        return dict(settings.quality)
    training = {}
    if settings.checkpoint is not None:
        path = Path(settings.checkpoint) / "training.json"
        if not path.is_file():
            raise ValueError(f"checkpoint {settings.checkpoint}: no training.json to take per-width quality from")
        training = json.loads(path.read_text())
    return width_quality(training, settings.widths, settings.quality_metric)


def serve_route(settings: RouteSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Run ``matta route`` until SIGTERM/SIGINT, then drain, exactly as ``matta serve`` does."""
    return server.run(build_route_app(settings), "matta route", host, port, log_level)
