"""A/B routes of ``matta serve --experiment``: outcomes (``/v1/feedback``) and hot reload (``/admin/experiment``).

Reload paths: ``POST /admin/experiment`` with the new config (YAML or JSON) in the body and
``Authorization: Bearer <admin key>``, or SIGHUP, which re-reads the experiment file. Either way
the new config is validated completely first; an invalid one is refused (400, or a logged error
for SIGHUP) and the running experiment stays in force.
"""

from __future__ import annotations

import logging
import time

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from matta.configfile import ConfigTooLargeError, load_yaml, shorten
from router.ab_log import ABLog, Outcome
from router.experiment import LiveExperiment, parse_experiment
from serving.api.http import APIError, bearer_matches, error_responses
from serving.api.metrics import ServingMetrics
from serving.api.protocol import FeedbackRequest
from serving.settings import FrontendSettings

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 64 * 1024
# The reload body: an experiment config file's contents, JSON or YAML (docs: router/experiment.py).
# It is read with a bounded yaml.safe_load (depth and expanded size: matta.configfile.load_yaml) and
# validated on load, with the field named in a 400, because its rules (arms' policies valid for
# this checkpoint's widths, unique names) go beyond a schema.
EXPERIMENT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "description": "an experiment config"}},
    "application/yaml": {"schema": {"type": "string", "description": "an experiment config file"}}}}}


def check_bearer(request: Request, key: str | None, what: str) -> None:
    """401 unless ``Authorization: Bearer <key>`` matches (constant-time); 403 when no key is configured."""
    if key is None:
        raise APIError(403, f"the {what} API is disabled: start the server with --admin-key (or MATTA_ADMIN_KEY)",
                       type_="permission_error", code="admin_disabled")
    if not bearer_matches(request, key):
        raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)", type_="authentication_error",
                       code="invalid_api_key", headers={"www-authenticate": "Bearer"})


def describe(live: LiveExperiment) -> dict:
    cfg = live.config
    return {"experiment": cfg.name, "salt": cfg.salt, "unit": cfg.unit, "traffic": cfg.traffic,
            "arms": [{"name": a.name, "weight": a.weight, "policy": a.policy.spec()} for a in cfg.arms]}


def check_feedback_value(live: LiveExperiment, body: FeedbackRequest, max_abs: float) -> None:
    """400 unless the value is within its metric's range in the experiment config, or else within
    +-``max_abs``: one client's 1.7e308 must not turn every mean it enters into ``inf``."""
    declared = live.config.metrics.get(body.metric)
    low, high = (-max_abs, max_abs) if declared is None else (declared.min, declared.max)
    if (low is not None and body.value < low) or (high is not None and body.value > high):
        where = "its range in the experiment config" if declared is not None else "this server's --max-feedback-abs"
        raise APIError(400, f"value {body.value!r} of metric {body.metric!r} is outside [{low}, {high}] ({where})",
                       param="value", code="value_out_of_range")


def install_experiment_routes(app: FastAPI, live: LiveExperiment | None, ab_log: ABLog | None,
                              metrics: ServingMetrics, settings: FrontendSettings) -> None:
    admin_key = settings.admin_key

    @app.post("/v1/feedback", responses=error_responses(400, 404))
    async def feedback(body: FeedbackRequest) -> JSONResponse:
        if live is None or ab_log is None:
            raise APIError(404, "no experiment is running on this server (start it with --experiment)",
                           code="no_experiment")
        check_feedback_value(live, body, settings.max_feedback_abs)
        if body.request_id is not None and not ab_log.known_request(body.request_id):
            raise APIError(404, f"unknown request_id {body.request_id!r}: no exposure with that id in this "
                                "server's log", param="request_id", code="unknown_request")
        experiment = live.config.name
        await ab_log.write(Outcome(experiment, body.request_id, body.unit, body.metric, body.value, time.time()))
        metrics.ab_outcomes.labels(experiment, body.metric).inc()
        return JSONResponse({"status": "recorded", "experiment": experiment})

    @app.get("/admin/experiment", responses=error_responses(403, 404))
    async def current(request: Request) -> JSONResponse:
        check_bearer(request, admin_key, "admin")
        if live is None:
            raise APIError(404, "no experiment is running on this server", code="no_experiment")
        return JSONResponse(describe(live))

    @app.post("/admin/experiment", responses=error_responses(400, 403, 404), openapi_extra=EXPERIMENT_BODY)
    async def reload(request: Request) -> JSONResponse:
        check_bearer(request, admin_key, "admin")
        if live is None:
            raise APIError(404, "no experiment is running on this server (start it with --experiment)",
                           code="no_experiment")
        raw = await request.body()
        if len(raw) > MAX_CONFIG_BYTES:
            raise APIError(413, f"experiment config over {MAX_CONFIG_BYTES} bytes")
        try:
            data = load_yaml(raw.decode("utf-8"), settings.max_config_depth, settings.max_config_nodes)
            live.reload(parse_experiment(data, "new experiment config"))
        except (UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
            reason = shorten(str(exc), 500)
            log.warning("experiment reload refused: %s", reason)
            code = "config_too_large" if isinstance(exc, ConfigTooLargeError) else "invalid_experiment"
            raise APIError(400, f"experiment config refused, the running one stays in force: {reason}",
                           code=code) from exc
        log.info("experiment reloaded: %s", describe(live))
        return JSONResponse(describe(live))
