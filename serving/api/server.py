"""Running a front-end app (``matta serve`` or ``matta route``) on a socket: one way to start, reload and drain.

:func:`run` binds (``port=0`` picks a free port, printed before anything is served), runs
uvicorn with the request-head deadline and size bound (:mod:`serving.api.connection`) until SIGTERM/SIGINT, then
drains: it stops accepting, lets in-flight requests finish within the settings'
``shutdown_timeout_s``, stops the backend, and returns 0. SIGHUP re-reads the A/B experiment file.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

import uvicorn
from fastapi import FastAPI

from serving.api.ab_routes import describe
from serving.api.connection import head_deadline_protocol
from serving.lifecycle import freeze_startup_heap
from serving.settings import FrontendSettings

log = logging.getLogger(__name__)


def uvicorn_config(app: FastAPI, **overrides) -> uvicorn.Config:
    """uvicorn's settings for a front-end app: graceful shutdown, and the request-head deadline and
    size bound from the app's :class:`~serving.settings.FrontendSettings`."""
    settings: FrontendSettings = app.state.settings
    options = dict(lifespan="on", timeout_graceful_shutdown=settings.shutdown_timeout_s,
                   http=head_deadline_protocol(settings.header_timeout_s, settings.max_header_bytes))
    return uvicorn.Config(app, **{**options, **overrides})


def reload_experiment(app: FastAPI) -> None:
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


def run(app: FastAPI, name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Serve ``app`` until SIGTERM/SIGINT, then drain; ``name`` ("matta serve") prefixes what it prints."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening now lets early clients queue in the backlog until uvicorn accepts them.
    sock.listen(2048)
    print(f"{name}: listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn_config(app, log_level=log_level))
    freeze_startup_heap()  # the app (and an in-process engine's weights) is built: serving starts
    # uvicorn re-raises the signal it caught once it has shut down; with this handler in place
    # that re-raise is a no-op, so a drained server exits 0 instead of dying by SIGTERM.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    previous_hup = signal.signal(signal.SIGHUP, lambda signum, frame: reload_experiment(app))
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hup)
        sock.close()
    print(f"{name}: stopped", file=sys.stderr, flush=True)
    return 0
