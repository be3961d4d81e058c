"""The server side of A/B guardrails: a periodic check that rolls back breaching arms, and the live analysis.

:func:`install_guardrail_monitor` is the whole hook. While the app runs, a task wakes every
second, and when the running experiment's guardrails are due (``guardrail_check_s``) it reads
this server's A/B log, evaluates them (:mod:`router.guardrails`, in a worker thread: reading the
log and the statistics must not stall requests), and when a treatment arm breaches one it
reloads the experiment with that arm's weight at 0 through :meth:`LiveExperiment.reload`, the
path ``POST /admin/experiment`` and SIGHUP take. Each rollback is logged with its reason and
counted in ``matta_ab_guardrail_breaches_total{experiment,arm,guardrail}``; every arm's weight
is the gauge ``matta_ab_arm_weight{experiment,arm}``.

Each server judges its own shard: with replicas, each rolls back on what it has seen, and the
first to breach reloads only itself (the others follow their own evidence, or an operator). A
check reads and evaluates the whole shard: 6.8 s for 200,000 exposures on the 2-core dev machine
(2.9 s reading, 3.9 s evaluating, in a worker thread that still competes for the GIL), so a
long-running experiment needs a ``guardrail_check_s`` well above that; reading only the rows new
since the last check would remove the cost and is not done yet.

Routes: ``GET /admin/experiment/guardrails`` (the latest checks and the rollbacks so far) and
``GET /admin/experiment/analysis?sequential=true`` (``matta ab analyze`` of this server's shard,
the live view; sequential is the right choice for a view that is looked at repeatedly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge

from router.ab_analysis import analyze, load_shards
from router.ab_log import ABLog
from router.experiment import LiveExperiment
from router.guardrails import GuardrailMonitor
from serving.api.ab_routes import check_bearer
from serving.api.http import APIError, error_responses
from serving.api.metrics import ServingMetrics

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the task looks whether a check is due; the config's guardrail_check_s paces the checks


def install_guardrail_monitor(app: FastAPI, live: LiveExperiment | None, ab_log: ABLog | None,
                              metrics: ServingMetrics, admin_key: str | None) -> None:
    """Run guardrail checks while ``app`` runs, export them as metrics, add the live-view routes."""
    if live is None or ab_log is None:
        return
    breaches = Counter("matta_ab_guardrail_breaches", "treatment arms rolled back (weight 0) by a guardrail",
                       ["experiment", "arm", "guardrail"], registry=metrics.registry)
    weight = Gauge("matta_ab_arm_weight", "the running experiment's weight of each arm (0: rolled back or off)",
                   ["experiment", "arm"], registry=metrics.registry)
    monitor = GuardrailMonitor()
    rollbacks: list[dict] = []

    def export_weights() -> None:
        for arm in live.config.arms:
            weight.labels(live.config.name, arm.name).set(arm.weight)

    async def step() -> None:
        config = live.config
        if not monitor.due(config):
            return
        rollback = await asyncio.to_thread(monitor.check, config, lambda: load_shards([ab_log.path]))
        if rollback is None:
            return
        if live.config is not config:  # reloaded meanwhile: judge the new config at the next check
            return
        live.reload(rollback.config)
        for b in rollback.breaches:
            log.warning("guardrail %s breached by arm %r of experiment %s, weight set to 0: %s",
                        b.guardrail, b.arm, config.name, b.reason)
            breaches.labels(config.name, b.arm, b.guardrail).inc()
            rollbacks.append({"time_unix": time.time(), "experiment": config.name, **asdict(b)})

    async def run() -> None:
        while True:
            try:
                await step()
            except Exception:  # a bad read (log being rotated, disk error) must not end the checks
                log.exception("guardrail check failed; retrying")
            export_weights()
            await asyncio.sleep(POLL_S)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            export_weights()
            task = asyncio.create_task(run())
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan

    @app.get("/admin/experiment/guardrails", responses=error_responses(403))
    async def guardrails(request: Request) -> JSONResponse:
        check_bearer(request, admin_key, "admin")
        return JSONResponse({"experiment": live.config.name, "guardrails": [g.label for g in live.config.guardrails],
                             "checks": [asdict(c) for c in monitor.last_checks], "rollbacks": rollbacks})

    @app.get("/admin/experiment/analysis", responses=error_responses(400, 403, 404))
    async def analysis(request: Request, sequential: bool = True,
                       alpha: float = Query(0.05, gt=0, lt=1, description="significance level")) -> JSONResponse:
        check_bearer(request, admin_key, "admin")
        try:
            result = await asyncio.to_thread(lambda: analyze(live.config, *load_shards([ab_log.path]), alpha=alpha,
                                                             sequential_test=sequential))
        except ValueError as exc:  # no exposure of the running experiment logged yet
            raise APIError(404, str(exc), code="no_exposures") from exc
        return JSONResponse(result)
