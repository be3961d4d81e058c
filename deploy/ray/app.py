"""matta on Ray Serve: each replica loads the checkpoint once and serves every width with the same
engine, router, A/B layer and HTTP API as ``matta serve`` (``serving.app.build_app``).

    serve run deploy/ray/serve_config.yaml            # or: serve deploy deploy/ray/serve_config.yaml
    serve run deploy.ray.app:build checkpoint=checkpoints/default policy=slo slo_ms=800

The application's arguments are ``matta serve``'s settings (:class:`serving.settings.ServeSettings`,
the same names as its flags' fields: ``slo_ms``, ``threads``, ``max_batch``...), validated by that
model, so a YAML or command-line string is coerced and checked exactly as ``matta serve`` checks
it; plus ``ab_dir`` (where each replica writes its A/B shard), ``num_replicas`` or ``autoscaling``.

Ray Serve routes each HTTP request to a replica (power of two choices on ongoing requests),
caps a replica at ``max_ongoing_requests`` (excess requests queue in the Ray proxy, and beyond
``max_queued_requests`` are refused with 503), and autoscales on ongoing requests. Inside a
replica the matta engine still batches continuously and its own queue answers 429 when full.
``/metrics`` through the Ray proxy shows the replica that served that scrape; scrape replicas
directly, or Ray's own metrics endpoint, for a cluster view. A replica whose engine core died fails
Ray's health check (``check_health``) until its core is restarted; Ray replaces it if that takes
longer than its health checks allow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve

from serving.settings import ServeSettings, settings_from

REPO = Path(__file__).resolve().parents[2]
REPLICA_HEADER = "x-matta-replica"  # which replica answered (Ray's replica id)
REPLICA_THREADS = 1  # a replica's torch threads unless told: Ray gives it one CPU (ray_actor_options)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class MattaDeployment:
    """One replica: the FastAPI app of ``matta serve``, built after the replica starts."""

    def __init__(self, ab_dir: str = "runs/ab", **settings: Any) -> None:
        settings.setdefault("threads", REPLICA_THREADS)
        settings.setdefault("device", "cpu")
        # Replicas may start in another working directory: relative paths are the repo's.
        for key in ("checkpoint", "experiment", "profile", "ab_db"):
            if settings.get(key) is not None and not Path(settings[key]).is_absolute():
                settings[key] = REPO / settings[key]
        self.settings = settings_from(ServeSettings, settings, source="Ray Serve app arguments")
        self.ab_dir = Path(ab_dir) if Path(ab_dir).is_absolute() else REPO / ab_dir

    def __serve_build_asgi_app__(self):
        import torch

        from router.ab_log import default_shard_path
        from router.experiment import load_experiment
        from serving.app import build_app

        torch.set_num_threads(self.settings.threads)
        settings = self.settings
        if settings.experiment is not None and settings.ab_db is None:
            # One A/B shard per replica (its pid is in the name); `matta ab analyze` merges them.
            name = load_experiment(settings.experiment).name
            settings = settings.model_copy(update={"ab_db": default_shard_path(name, self.ab_dir)})
        app = build_app(settings)
        self.engine = app.state.engine
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app

    def check_health(self) -> None:
        """Ray Serve's health check (every ``health_check_period_s``): fails while the replica's engine
        core is dead (restarting, or the replica on its way out), so Ray takes the replica out of
        rotation and replaces it unless its core is back first."""
        error = getattr(getattr(self, "engine", None), "health_error", None)
        if error is not None:
            raise RuntimeError(error)


def build(args: dict) -> serve.Application:
    """Application builder for ``serve run`` / ``serve deploy``: ``args`` are ServeSettings fields and
    ``ab_dir``, plus ``num_replicas`` (an int) or ``autoscaling`` (a Ray autoscaling_config dict), and
    Ray's ``health_check_period_s`` / ``health_check_timeout_s`` (seconds; see ``check_health``).
    Invalid settings fail here, before any replica starts, with the field named."""
    args = dict(args)
    options = {}
    if "num_replicas" in args:
        options["num_replicas"] = int(args.pop("num_replicas"))
    if "autoscaling" in args:
        options["autoscaling_config"] = args.pop("autoscaling")
    for key in ("health_check_period_s", "health_check_timeout_s"):
        if key in args:
            options[key] = float(args.pop(key))
    settings = {k: v for k, v in args.items() if k != "ab_dir"}
    settings_from(ServeSettings, {"threads": REPLICA_THREADS, **settings}, source="Ray Serve app arguments")
    deployment = MattaDeployment.options(**options) if options else MattaDeployment
    return deployment.bind(**args)
