"""HTTP pieces shared by ``matta serve`` and the ``matta route`` proxy: error type, headers,
error handlers. Torch-free, so the router can use them without loading the engine."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.metrics import ServingMetrics
from serving.protocol import error_body

log = logging.getLogger(__name__)

WIDTH_HEADER = "x-matta-width"
SLO_HEADER = "x-matta-slo-ms"  # request header: latency target when the body gives none
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



def slo_ms_from(body_value: float | None, request: Request, default: float | None) -> float | None:
    """A request's latency target: the body's ``latency_slo_ms``, else the header, else ``default``."""
    if body_value is not None:
        return body_value
    header = request.headers.get(SLO_HEADER)
    if header is None:
        return default
    try:
        value = float(header)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise APIError(400, f"header {SLO_HEADER} must be a positive number of milliseconds, got {header!r}",
                       param=SLO_HEADER)
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
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "internal_server_error"), status_code=500)
