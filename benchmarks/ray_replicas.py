"""Requests/s and p99 of the Ray Serve app with 1 and with 2 replicas, same locust load, same run.

    python -m benchmarks.ray_replicas --users 16 --time 40

Local Ray (num_cpus=2, no dashboard); each replica has 1 torch thread and loads the shipped
checkpoint; locust (PinnedUser: every width in turn, 32 tokens) runs on the same machine.
Writes benchmarks/results/ray_replicas.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.harness import free_port, load_test, save_png

RESULTS = Path(__file__).parent / "results"


def run(replicas: int, args: argparse.Namespace, out: Path) -> dict:
    import ray
    from ray import serve

    from deploy.ray.app import build

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"checkpoint": str(args.checkpoint.resolve()), "threads": 1, "num_replicas": replicas}),
                  name="matta", route_prefix="/")
        time.sleep(2)
        env = {**os.environ, "MATTA_CHECKPOINT": str(args.checkpoint), "MATTA_MAX_TOKENS": str(args.max_tokens)}
        report = load_test(f"http://127.0.0.1:{port}", args.users, args.users, args.time, ["PinnedUser"], out, env)
    finally:
        serve.shutdown()
        ray.shutdown()
    completions = [e for name, e in report["endpoints"].items() if "/v1/completions" in name]
    total = report["endpoints"]["Aggregated"]
    return {"replicas": replicas, "requests_per_s": total["requests_per_s"], "p50_ms": total["median_ms"],
            "p99_ms": total["p99_ms"], "failures": total["failures"], "requests": total["requests"],
            "endpoints": len(completions)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--time", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS / "ray_replicas")
    args = p.parse_args(argv)
    rows = [run(n, args, args.out.with_name(f"{args.out.name}_{n}")) for n in (1, 2)]
    result = {"settings": vars(args) | {"checkpoint": str(args.checkpoint), "out": str(args.out)}, "runs": rows,
              "rps_ratio_2_over_1": rows[1]["requests_per_s"] / rows[0]["requests_per_s"],
              "p99_ratio_2_over_1": rows[1]["p99_ms"] / rows[0]["p99_ms"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    labels = [f"{r['replicas']} replica{'s' if r['replicas'] > 1 else ''}" for r in rows]
    axes[0].bar(labels, [r["requests_per_s"] for r in rows])
    axes[0].set(title="requests/s", ylabel="req/s")
    axes[1].bar(labels, [r["p99_ms"] for r in rows], color="tab:orange")
    axes[1].set(title="p99 latency", ylabel="ms")
    fig.suptitle(f"Ray Serve, {args.users} locust users, 2 CPUs")
    fig.tight_layout()
    save_png(fig, args.out.with_suffix(".png"))
    for r in rows:
        print(f"{r['replicas']} replica(s): {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"{r['failures']} failures")
    print(f"2/1 replicas: requests/s x{result['rps_ratio_2_over_1']:.2f}, p99 x{result['p99_ratio_2_over_1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
