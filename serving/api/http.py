"""HTTP pieces shared by ``matta serve`` and the ``matta route`` proxy: error type, headers,
error handlers. Torch-free, so the router can use them without loading the engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api.metrics import ServingMetrics
from serving.api.protocol import CompletionResponse, ErrorResponse, error_body
from serving.settings import FrontendSettings

log = logging.getLogger(__name__)

WIDTH_HEADER = "x-matta-width"
SLO_HEADER = "x-matta-slo-ms"  # request header: latency target when the body gives none
TTFT_SLO_HEADER = "x-matta-ttft-slo-ms"  # request header: time-to-first-token target
TPOT_SLO_HEADER = "x-matta-tpot-slo-ms"  # request header: time-per-output-token target
PREDICTED_HEADER = "x-matta-predicted-ms"  # response header: the router's latency prediction
ARM_HEADER = "x-matta-arm"  # response header: the A/B arm that served the request
REQUEST_ID_HEADER = "x-request-id"  # response header: the id /v1/feedback refers to (also the body's id)


class APIError(Exception):
    """An error for the client: HTTP status plus the OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


_ERROR_MEANINGS = {
    400: "invalid request: the body's `error.param` names the field",
    401: "missing or wrong API key (only when the server has one)",
    403: "the admin API is disabled (no admin key configured)",
    404: "unknown model, width, request id, or no experiment running",
    408: "the request body did not arrive in time (--body-timeout)",
    413: "request body or prompt over the limit",
    431: "request headers over the limit (--max-header-bytes)",
    429: "queue full or no width can meet the latency SLO now: retry after `Retry-After` seconds",
    503: "at the concurrency cap, shutting down, or a backend unavailable: retry after `Retry-After` seconds",
    504: "the completion ran past the server's request deadline and was cancelled",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI ``responses`` entries for these error statuses, all with the OpenAI error body."""
    out = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": _ERROR_MEANINGS[status]}
        if status in (429, 503):
            out[status]["headers"] = _RETRY_AFTER
    return out


# `/v1/completions` answers JSON, or server-sent events with `"stream": true`.
COMPLETION_RESPONSES = {
    200: {"model": CompletionResponse, "description": "the completion (JSON), or with `stream` an SSE stream "
                                                       "of chunks ending in `data: [DONE]`",
          "content": {"text/event-stream": {"schema": {
              "type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"}}}}}},
    **error_responses(400, 404, 413, 429, 503, 504),
}


def document_api(app: FastAPI, model_ids: list[str] | None = None, widths: list[str] | None = None,
                 vocab_size: int | None = None, max_feedback_abs: float | None = None) -> None:
    """Make the OpenAPI schema say everything the server does, so generated clients and schema
    fuzzers (schemathesis, in the tests) can rely on it: the guard's 401 on every route but
    ``/health``, its 431 on every route, its 413 on every POST, and what this server serves: its
    model ids and widths (others get 404), the checkpoint's token-id bound, and the default range
    of feedback values (an experiment config may narrow it per metric)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        guard = error_responses(401, 408, 413, 431, 503)
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                if path not in OPEN_PATHS:
                    responses.setdefault("401", _openapi_error(guard[401]))
                responses.setdefault("431", _openapi_error(guard[431]))
                if path not in UNCOUNTED_PATHS:
                    responses.setdefault("503", _openapi_error(guard[503]))
                if method == "post":
                    responses.setdefault("408", _openapi_error(guard[408]))
                    responses.setdefault("413", _openapi_error(guard[413]))
                responses.pop("422", None)  # validation errors are 400 here (install_error_handlers)
        request = schema["components"]["schemas"]["CompletionRequest"]["properties"]
        if model_ids:
            request["model"]["enum"] = list(model_ids)
        if widths:
            request["width"]["enum"] = [*widths, None]
            # A model id that pins a width ('<name>:<width>') and a different `width` field: 400.
            pins = [m for m in model_ids or () if ":" in m]
            schema["components"]["schemas"]["CompletionRequest"]["allOf"] = [
                {"if": {"properties": {"model": {"const": m}}, "required": ["model"]},
                 "then": {"properties": {"width": {"enum": [m.rsplit(":", 1)[1], None]}}}} for m in pins]
        feedback = schema["components"]["schemas"].get("FeedbackRequest")
        if max_feedback_abs is not None and feedback is not None:
            feedback["properties"]["value"].update(minimum=-max_feedback_abs, maximum=max_feedback_abs)
        if vocab_size is not None:
            prompt = request["prompt"]
            for branch in prompt["anyOf"]:
                items = branch.get("items", {})
                items = items.get("items", items) if items.get("type") == "array" else items
                if items.get("type") == "integer":
                    items["maximum"] = vocab_size - 1
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _openapi_error(entry: dict) -> dict:
    out = {"description": entry["description"],
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    if "headers" in entry:
        out["headers"] = {name: dict(header) for name, header in entry["headers"].items()}
    return out


def slo_ms_from(body_value: float | None, request: Request, default: float | None,
                header_name: str = SLO_HEADER) -> float | None:
    """One of a request's latency targets: the body's field, else the header, else ``default``."""
    if body_value is not None:
        return body_value
    header = request.headers.get(header_name)
    if header is None:
        return default
    try:
        value = float(header)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise APIError(400, f"header {header_name} must be a positive number of milliseconds, got {header!r}",
                       param=header_name)
    return value


def install_error_handlers(app: FastAPI, metrics: ServingMetrics) -> None:
    """Every error leaves in the OpenAI shape; client mistakes are 4xx, never 422 or 500.

    Shared by ``matta serve`` and the ``matta route`` proxy, so both answer alike."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        where = ".".join(loc)
        param = loc[0] if loc else None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            param = None
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}"
        elif where:
            message = f"{where}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
        if request.url.path == "/v1/completions":
            metrics.requests.labels("none", "400").inc()
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette's Allow names only the first route on the path; list every method it has.
            headers["allow"] = ", ".join(allowed_methods(app, request.scope))
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "internal_server_error"), status_code=500)


def allowed_methods(app: FastAPI, scope) -> list[str]:
    """Every method some route serves at this request's path (for a 405's ``Allow``)."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": "GET"}) if hasattr(route, "matches") else (None, None)
        if match is not None and match.name != "NONE":
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


OPEN_PATHS = frozenset({"/health"})  # reachable without the API key (load balancers, probes)
UNCOUNTED_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapes pass even at the concurrency cap
ADMIN_PREFIX = "/admin/"  # routes behind the admin key, which passes the API-key check there too
# Headers that one check reads as a single value: sent twice, two checks could each read a different
# one (the API-key guard the first Authorization, the admin check the last), so a repeat is a 400.
SINGLE_VALUED_HEADERS = frozenset({"authorization", "content-length", "content-type", "host", "transfer-encoding",
                                   SLO_HEADER, TTFT_SLO_HEADER, TPOT_SLO_HEADER})


def is_admin_path(path: str) -> bool:
    return path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/")


def bearer_matches(request: Request, key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time (the key never reaches a log)."""
    return _bearer_matches(request.headers.get("authorization", ""), key)


def _bearer_matches(authorization: str, key: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class RequestGuard:
    """ASGI middleware: request-head limits, the optional API key, a concurrency cap, and limits on request bodies.

    A head whose headers total over ``max_header_bytes`` gets 431 (heads that never end are cut
    earlier, by :mod:`serving.api.connection`); a repeated single-valued header
    (:data:`SINGLE_VALUED_HEADERS`: ``Authorization``, ``Content-Length``...) gets 400, so every
    check reads the same value. With a key, every route but ``/health`` answers 401 (OpenAI error
    body) unless the request carries ``Authorization: Bearer <key>``, as vLLM's ``--api-key`` and
    the ``openai`` client do. Admin routes (``/admin/...``) take the admin key instead of the API
    key (one ``Authorization`` header can carry only one key; the admin key is the stronger), and
    their handlers check it. More than ``max_concurrency`` requests in the server at once get 503 +
    ``Retry-After`` (probes and scrapes, ``/health`` and ``/metrics``, are not counted or refused),
    which bounds the memory an overload can take. Bodies over ``max_bytes`` get 413: at once from
    Content-Length, or as soon as a chunked body outgrows the limit; a body not complete within
    ``body_timeout_s`` of the head gets 408, so a client that trickles its body cannot hold the
    connection. Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, which would hide client
    disconnects from the handlers (and so keep batch slots of clients that left).
    """

    def __init__(self, app, api_key: str | None, max_bytes: int, max_concurrency: int | None = None,
                 body_timeout_s: float | None = None, retry_after_s: int = 1, admin_key: str | None = None,
                 max_header_bytes: int | None = None) -> None:
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes
        self.max_concurrency, self.body_timeout_s, self.retry_after_s = max_concurrency, body_timeout_s, retry_after_s
        self.admin_key, self.max_header_bytes = admin_key, max_header_bytes
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = scope["headers"]
        if self.max_header_bytes is not None and sum(len(k) + len(v) + 4 for k, v in raw) > self.max_header_bytes:
            return await _send_error(send, 431, f"request headers over the limit of {self.max_header_bytes} bytes",
                                     "invalid_request_error", "headers_too_large", {"connection": "close"})
        headers: dict[str, str] = {}
        for k, v in raw:
            name = k.decode("latin-1").lower()
            if name in headers and name in SINGLE_VALUED_HEADERS:
                return await _send_error(send, 400, f"header {name!r} given more than once; send it once",
                                         "invalid_request_error", "duplicate_header", {"connection": "close"})
            headers[name] = v.decode("latin-1")
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope["path"], headers):
            return await _send_error(send, 401, "missing or wrong API key (Authorization: Bearer <key>)",
                                     "authentication_error", "invalid_api_key", {"www-authenticate": "Bearer"})
        counted = scope["path"] not in UNCOUNTED_PATHS
        if counted and self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            return await _send_error(send, 503, f"the server is at its limit of {self.max_concurrency} concurrent "
                                                "requests; retry later", "service_unavailable", "overloaded",
                                     {"retry-after": str(self.retry_after_s)})
        self.in_flight += counted
        try:
            await self._call_with_body(scope, receive, send, headers)
        finally:
            self.in_flight -= counted

    def _authorized(self, path: str, headers: dict[str, str]) -> bool:
        authorization = headers.get("authorization", "")
        if self.admin_key and is_admin_path(path):
            return _bearer_matches(authorization, self.admin_key)
        return _bearer_matches(authorization, self.api_key)

    async def _call_with_body(self, scope, receive, send, headers: dict[str, str]) -> None:
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_error(send, 400, "invalid Content-Length header", "invalid_request_error", None)
            if int(length) > self.max_bytes:
                return await _send_error(send, 413, f"request body over the limit of {self.max_bytes} bytes",
                                         "invalid_request_error", "body_too_large")
        # Read the whole body here, within the limits, then hand it to the app in one message.
        # Later receives go to the client's stream, so a disconnect is still seen by the handler.
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
        except TimeoutError:
            return await _send_error(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                     "invalid_request_error", "body_timeout", {"connection": "close"})
        if body is None:
            return  # the client left while sending
        if len(body) > self.max_bytes:
            return await _send_error(send, 413, f"request body over the limit of {self.max_bytes} bytes",
                                     "invalid_request_error", "body_too_large")
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay_receive, send)

    async def _read_body(self, receive) -> bytes | None:
        """The body, or what of it exceeds the limit (the caller answers 413); None if the client left."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes or not message.get("more_body", False):
                return b"".join(chunks)


async def _send_error(send, status: int, message: str, type_: str, code: str | None,
                      headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(message, type_, code=code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def install_request_guard(app: FastAPI, settings: FrontendSettings) -> None:
    """Put :class:`RequestGuard` in front of every route, with the limits ``settings`` give."""
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_bytes=settings.max_body_bytes,
                       max_concurrency=settings.max_concurrency, body_timeout_s=settings.body_timeout_s,
                       retry_after_s=settings.retry_after_s, admin_key=settings.admin_key,
                       max_header_bytes=settings.max_header_bytes)
