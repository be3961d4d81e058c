"""matta on Ray Serve: each replica loads the checkpoint once and serves every width with the same
engine, router, A/B layer and HTTP API as ``matta serve`` (``serving.app.build_app``).

    serve run deploy/ray/serve_config.yaml            # or: serve deploy deploy/ray/serve_config.yaml
    serve run deploy.ray.app:build checkpoint=checkpoints/default policy=slo slo_ms=800

Ray Serve routes each HTTP request to a replica (power of two choices on ongoing requests),
caps a replica at ``max_ongoing_requests`` (excess requests queue in the Ray proxy, and beyond
``max_queued_requests`` are refused with 503), and autoscales on ongoing requests. Inside a
replica the matta engine still batches continuously and its own queue answers 429 when full.
``/metrics`` through the Ray proxy shows the replica that served that scrape; scrape replicas
directly, or Ray's own metrics endpoint, for a cluster view.
"""

from __future__ import annotations

from pathlib import Path

from ray import serve

REPO = Path(__file__).resolve().parents[2]
REPLICA_HEADER = "x-matta-replica"  # which replica answered (Ray's replica id)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class MattaDeployment:
    """One replica: the FastAPI app of ``matta serve``, built after the replica starts."""

    def __init__(self, checkpoint: str = "checkpoints/default", policy: str | None = None,
                 slo_ms: float | None = None, min_width: str | None = None, shed: bool = False,
                 max_batch: int = 32, max_queue: int = 256, threads: int = 1, experiment: str | None = None,
                 ab_dir: str = "runs/ab", profile: str | None = None) -> None:
        from serving.app import ServerSettings

        def resolve(path: str | None) -> Path | None:
            # Replicas may start in another working directory: relative paths are the repo's.
            return None if path is None else (Path(path) if Path(path).is_absolute() else REPO / path)

        self.threads = threads
        self.settings = ServerSettings(
            checkpoint=resolve(checkpoint), policy=policy, default_slo_ms=slo_ms, min_width=min_width, shed=shed,
            max_batch=max_batch, max_queue=max_queue, torch_threads=threads, experiment=resolve(experiment),
            profile=resolve(profile), device="cpu")
        self.ab_dir = resolve(ab_dir)

    def __serve_build_asgi_app__(self):
        import torch

        from router.ab_log import default_shard_path
        from router.experiment import load_experiment
        from serving.app import build_app

        torch.set_num_threads(self.threads)
        if self.settings.experiment is not None:
            # One A/B shard per replica (its pid is in the name); `matta ab analyze` merges them.
            name = load_experiment(self.settings.experiment).name
            self.settings.ab_db = default_shard_path(name, self.ab_dir)
        app = build_app(self.settings)
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app


def build(args: dict) -> serve.Application:
    """Application builder for ``serve run`` / ``serve deploy``: ``args`` are MattaDeployment's arguments,
    plus ``num_replicas`` (an int) or ``autoscaling`` (a Ray autoscaling_config dict)."""
    args = dict(args)
    options = {}
    if "num_replicas" in args:
        options["num_replicas"] = int(args.pop("num_replicas"))
    if "autoscaling" in args:
        options["autoscaling_config"] = args.pop("autoscaling")
    for key in ("slo_ms",):
        if key in args and args[key] is not None:
            args[key] = float(args[key])
    for key in ("max_batch", "max_queue", "threads"):
        if key in args:
            args[key] = int(args[key])
    if "shed" in args and isinstance(args["shed"], str):
        args["shed"] = args["shed"].lower() in ("1", "true", "yes")
    deployment = MattaDeployment.options(**options) if options else MattaDeployment
    return deployment.bind(**args)
