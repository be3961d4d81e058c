"""Latency-aware routing under a load ramp: `slo` against the static policies on one arrival trace.

Steps, all against real `matta serve` subprocesses on this machine:
  1. profile the checkpoint (`matta profile`), which the `slo` server loads;
  2. calibrate with `fixed:<TA>`: its saturated throughput (closed loop, max-batch clients) is the
     rate R the TA sustains, and the SLO is `--slo-factor` x its median latency at that load;
     the Student's saturated throughput, measured the same way, bounds what any width policy
     can serve: per 5 s of the trace, at most the Student's capacity (the `attainable` bound);
  3. draw one open-loop trace: Poisson arrivals whose rate ramps linearly from 0.5 R to 4 R over
     `--duration` seconds (fixed seed), the same prompts and `max_tokens` for every policy;
  4. replay the trace against `fixed:<TA>`, `fixed:<Student>`, `slo` and, as its ablation,
     `slo:utilization=0` (the same policy without its load ceiling); each a fresh server.

Per policy: SLO attainment (answers within the SLO / requests sent), p50/p99 latency, goodput,
shed requests, width mix over time, effective quality (mean quality of the served width over
answers within the SLO, 0 for late or refused ones; quality = the checkpoint's cloze accuracy),
and the router's prediction error (actual / predicted latency). JSON + PNG.

    python -m benchmarks.slo_router --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

from benchmarks.harness import Server, make_prompts, make_trace, open_loop, saturate
from matta.checkpoint import load_checkpoint
from router.quality import width_quality

RESULTS = Path(__file__).parent / "results"
NO_CEILING = "slo:utilization=0"  # the slo policy without its load ceiling: per-request choice only


def static_policies(policies: dict) -> list[str]:
    return [n for n in policies if n.startswith("fixed:")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server (the client needs a core)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of the ramp")
    p.add_argument("--ramp", type=float, nargs=2, default=(0.5, 4.0), metavar=("FROM", "TO"),
                   help="arrival rate at the start and end, in multiples of the TA's sustainable rate")
    p.add_argument("--slo-factor", type=float, default=2.0,
                   help="SLO = this x the TA's median latency at its sustainable rate")
    p.add_argument("--slo-ms", type=float, help="use this SLO instead of calibrating one")
    p.add_argument("--shed", action=argparse.BooleanOptionalAction, default=True,
                   help="the slo policy sheds what no width can serve in time (429) instead of serving it late")
    p.add_argument("--give-up", type=float, default=5.0, help="client timeout, in multiples of the SLO")
    p.add_argument("--ablate-ceiling", action=argparse.BooleanOptionalAction, default=True,
                   help="also replay `slo:utilization=0` (per-request choice without the load ceiling)")
    p.add_argument("--calibration-quantile", type=float, help="passed to the slo server (default: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "slo_router")
    return p.parse_args(argv)


async def replay(url: str, model: str, trace: list[tuple[float, list[int]]], max_tokens: int, slo_ms: float,
                 timeout_s: float) -> list[dict]:
    """Open loop: send each request of the trace at its arrival time whatever the server is doing."""
    bodies = [(t, {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                   "latency_slo_ms": slo_ms}) for t, prompt in trace]
    return await open_loop(url, bodies, timeout_s)


def attainable(arrivals: list[float], capacity_rps: float, duration: float, window_s: float = 5.0) -> float:
    """Upper bound on the share of a trace any width policy can serve: per ``window_s`` of it, at
    most what the cheapest width sustains saturated (requests beyond it must queue past the SLO
    or be refused). Generous: it ignores queueing within a window and the cost of refusing."""
    windows = np.histogram(arrivals, bins=max(1, round(duration / window_s)), range=(0, duration))[0]
    cap = capacity_rps * duration / len(windows)
    return float(np.minimum(windows, cap).sum() / max(1, len(arrivals)))


def summarise(records: list[dict], slo_s: float, quality: dict[str, float], duration: float, bins: int) -> dict:
    n = len(records)
    ok = [r for r in records if r["status"] == 200]
    met = [r for r in ok if r["latency_s"] <= slo_s]
    shed = [r for r in records if r["status"] == 429]
    lat = [r["latency_s"] for r in ok]
    ratios = [r["latency_s"] / r["predicted_s"] for r in ok if r.get("predicted_s")]
    edges = np.linspace(0, duration, bins + 1)
    timeline = []
    for lo, hi in itertools.pairwise(edges):
        window = [r for r in records if lo <= r["t"] < hi]
        served = [r for r in window if r["status"] == 200]
        timeline.append({
            "t_mid": float((lo + hi) / 2), "sent": len(window),
            "attainment": (sum(r["latency_s"] <= slo_s for r in served) / len(window)) if window else None,
            "p99_s": float(np.percentile([r["latency_s"] for r in served], 99)) if served else None,
            "width_mix": {w: sum(r["width"] == w for r in served) / len(served) for w in quality} if served else {},
        })
    return {
        "requests": n, "served": len(ok), "met": len(met), "shed": len(shed),
        "errors": n - len(ok) - len(shed),
        "slo_attainment": len(met) / n if n else None,
        "slo_attainment_of_served": len(met) / len(ok) if ok else None,
        "p50_s": statistics.median(lat) if lat else None,
        "p99_s": float(np.percentile(lat, 99)) if lat else None,
        "goodput_requests_per_s": len(met) / duration,
        "goodput_tokens_per_s": sum(r.get("tokens", 0) for r in met) / duration,
        "effective_quality": sum(quality[r["width"]] for r in met) / n if n else None,
        "width_mix": {w: sum(r["width"] == w for r in ok) / len(ok) for w in quality} if ok else {},
        "prediction_ratio_median": statistics.median(ratios) if ratios else None,
        "prediction_ratio_p10_p90": [float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90))]
        if ratios else None,
        "timeline": timeline,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(results["policies"])
    widths = results["widths"]
    slo = results["slo_ms"] / 1000
    fig, axes = plt.subplots(2, len(policies), figsize=(5 * len(policies), 7.5), sharex=True, squeeze=False)
    for j, name in enumerate(policies):
        records = results["policies"][name]["records"]
        ax = axes[0][j]
        for status, color, label in ((200, "tab:blue", "served"), (429, "tab:red", "shed (429)")):
            pts = [r for r in records if r["status"] == status]
            ax.scatter([r["t"] for r in pts], [r["latency_s"] for r in pts], s=4, color=color, alpha=0.5, label=label)
        ax.axhline(slo, color="black", linestyle="--", label=f"SLO {results['slo_ms']:.0f} ms")
        ax.set_yscale("log")
        s = results["policies"][name]["summary"]
        ax.set_title(f"{name}: {100 * s['slo_attainment']:.1f}% within SLO, EQ {s['effective_quality']:.4f}")
        ax.set_ylabel("latency (s)")
        ax.legend(loc="upper left", fontsize=8)
        timeline = s["timeline"]
        t = [b["t_mid"] for b in timeline]
        bottom = np.zeros(len(t))
        for w in widths:
            share = np.array([b["width_mix"].get(w, 0.0) for b in timeline])
            axes[1][j].bar(t, share, bottom=bottom, width=t[1] - t[0] if len(t) > 1 else 1, label=w)
            bottom += share
        axes[1][j].set(xlabel="time (s); offered load ramps " + "x -> ".join(f"{r:g}" for r in results["ramp"]) + "x",
                       ylabel="width mix of served requests", ylim=(0, 1))
        axes[1][j].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    widths = ckpt.config.width_names
    student, ta = widths[0], widths[-1]
    quality = width_quality(ckpt.training, widths)
    prompts, prompt_info = make_prompts(ckpt, [student, ta], args.prompt_tokens, args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="slo_router_"))
    profile_path = work / "profile.json"
    import subprocess

    subprocess.run([sys.executable, "-m", "cli", "profile", str(args.checkpoint), "--out", str(profile_path),
                    "--threads", str(args.threads)], check=True)
    profile = json.loads(profile_path.read_text())
    common = ("--max-queue", "100000", "--profile", str(profile_path))

    print("calibrating with fixed:" + ta, flush=True)
    server = Server(args.checkpoint, args.threads, args.max_batch, work / "calibrate.log",
                    extra_args=(*common, "--policy", f"fixed:{ta}"))
    url = server.start()
    try:
        asyncio.run(saturate(url, ckpt.name, prompts, args.max_tokens, args.max_batch, 3.0))  # warm-up
        capacity = asyncio.run(saturate(url, ckpt.name, prompts, args.max_tokens, args.max_batch, 15.0))
    finally:
        server.stop()
    print("calibrating with fixed:" + student, flush=True)
    server = Server(args.checkpoint, args.threads, args.max_batch, work / "calibrate_student.log",
                    extra_args=(*common, "--policy", f"fixed:{student}"))
    url = server.start()
    try:
        asyncio.run(saturate(url, ckpt.name, prompts, args.max_tokens, args.max_batch, 3.0))
        student_capacity = asyncio.run(saturate(url, ckpt.name, prompts, args.max_tokens, args.max_batch, 15.0))
    finally:
        server.stop()
    rate = capacity["requests_per_s"]
    slo_ms = args.slo_ms or 1000 * args.slo_factor * capacity["p50_s"]
    print(f"TA sustains {rate:.1f} req/s (p50 {1000 * capacity['p50_s']:.0f} ms), the Student "
          f"{student_capacity['requests_per_s']:.1f} req/s; SLO {slo_ms:.0f} ms", flush=True)
    trace = make_trace(prompts, args.ramp[0] * rate, args.ramp[1] * rate, args.duration, args.seed)
    bound = attainable([t for t, _ in trace], student_capacity["requests_per_s"], args.duration)
    policies = {f"fixed:{ta}": ("--policy", f"fixed:{ta}"), f"fixed:{student}": ("--policy", f"fixed:{student}"),
                "slo": ("--policy", "slo", "--slo-ms", f"{slo_ms:.1f}", *(("--shed",) if args.shed else ()),
                        *(("--calibration-quantile", str(args.calibration_quantile))
                          if args.calibration_quantile else ()))}
    if args.ablate_ceiling:  # the same policy choosing per request only, on the same trace
        policies[NO_CEILING] = ("--policy", NO_CEILING, *policies["slo"][2:])
    results = {"checkpoint": str(args.checkpoint), "widths": widths, "quality": quality, "threads": args.threads,
               "max_batch": args.max_batch, "max_tokens": args.max_tokens, "prompts": prompt_info,
               "duration_s": args.duration, "ramp": list(args.ramp), "ta_capacity": capacity,
               "student_capacity": student_capacity, "attainable_bound": bound, "slo_ms": slo_ms,
               "trace_requests": len(trace), "shed": args.shed,
               "profile_error": profile["meta"]["relative_error"], "policies": {}}
    for name, flags in policies.items():
        print(f"replaying {len(trace)} requests against {name}", flush=True)
        server = Server(args.checkpoint, args.threads, args.max_batch, work / f"{name.replace(':', '_')}.log",
                        extra_args=(*common, *flags))
        url = server.start()
        try:
            # A request still unanswered after --give-up x SLO counts as missed (status 0): a
            # collapsing policy's backlog would otherwise take minutes to drain.
            records = asyncio.run(replay(url, ckpt.name, trace, args.max_tokens, slo_ms,
                                         timeout_s=max(5.0, args.give_up * slo_ms / 1000)))
            metrics_text = httpx.get(url + "/metrics", timeout=30).text
        finally:
            server.stop()
        summary = summarise(records, slo_ms / 1000, quality, args.duration, bins=12)
        summary["server_metrics"] = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics_text.splitlines()
                                     if line.startswith(("matta_effective_quality", "matta_slo_attainment_ratio",
                                                         "matta_latency_correction_ratio"))}
        results["policies"][name] = {"summary": summary, "records": records}
        print(f"  {name}: {100 * summary['slo_attainment']:.1f}% within SLO, p99 {summary['p99_s']:.2f} s, "
              f"shed {summary['shed']}, effective quality {summary['effective_quality']:.4f}, "
              f"mix {summary['width_mix']}", flush=True)
    base = results["policies"]
    results["verdict"] = {
        "slo_attainment": {n: p["summary"]["slo_attainment"] for n, p in base.items()},
        "slo_keeps_99pct": base["slo"]["summary"]["slo_attainment"] >= 0.99,
        "attainable_bound": bound,
        "slo_share_of_bound": base["slo"]["summary"]["slo_attainment"] / bound,
        "slo_effective_quality_above_both_static": all(
            base["slo"]["summary"]["effective_quality"] > base[n]["summary"]["effective_quality"]
            for n in static_policies(base)),
        "effective_quality_ratio_vs": {n: base["slo"]["summary"]["effective_quality"]
                                       / max(1e-12, p["summary"]["effective_quality"])
                                       for n, p in base.items() if n in static_policies(base)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(results["verdict"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
