"""Latency-aware routing under load: `slo` against the static policies, old and new engine, one run.

Steps, all against real `matta serve` subprocesses on this machine:
  1. profile the checkpoint (`matta profile`), which the `slo` servers load;
  2. calibrate each engine (``--engines``, flags in ``benchmarks.harness.ENGINES``): the saturated
     throughput (closed loop, max-batch clients) of `fixed:<TA>` and of `fixed:<Student>`. The first
     engine's TA rate R sets the traces and the SLO (`--slo-factor` x its median latency there); the
     Student's rate is what the server can serve at most, and (the best engine's) bounds what any
     policy can serve: per 5 s of a trace, at most that many (the `attainable` bound);
  3. draw the scenarios' open-loop arrivals (:mod:`benchmarks.client`; fixed seed, the same prompts
     and `max_tokens` everywhere):
     - ramp: Poisson arrivals whose rate ramps linearly from 0.5 R to 4 R over `--duration` s;
     - bursty: gamma inter-arrivals of burstiness 0.25 (vLLM's meaning: CV^2 = 4), mean 1.2 R (within
       the Student's capacity on average);
     - overload: Poisson at 10 R for `--overload-seconds` (only `slo --shed`: what it admits in time);
  4. replay each trace against `fixed:<TA>`, `fixed:<Student>` and `slo` (optionally its ablation
     `slo:utilization=0`), each a fresh server, for every engine.

Per engine, scenario and policy: SLO attainment (answers within the SLO / requests sent), p50/p99
latency of the served, goodput, shed requests, width mix over time, effective quality (mean quality
of the served width over answers within the SLO, 0 for late or refused ones; quality = the
checkpoint's cloze accuracy), the mean quality of the answers within the SLO, and the router's
prediction error (actual / predicted latency). The client shares the machine's cores with the
server. Summary JSON + PNG under ``benchmarks/results/``; per-request rows under ``runs/bench/slo_router/``.

    python -m benchmarks.slo_router --engines process,inproc --max-tokens 64 --prompt-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.client import (
    RUNS,
    Request,
    RequestOutput,
    arrivals,
    ramp_arrivals,
    requests_at,
    run_closed_loop,
    run_open_loop,
    summarize,
    write_rows,
)
from benchmarks.harness import ENGINES, Server, make_prompts, save_png
from matta.checkpoint import load_checkpoint
from router.quality import answer_quality, parse_width_steps, width_quality

RESULTS = Path(__file__).parent / "results"
NO_CEILING = "slo:utilization=0"  # the slo policy without its load ceiling: per-request choice only


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
    p.add_argument("--rate", type=float, help="use this R (req/s) for the traces instead of the first engine's TA "
                                              "rate (to replay an earlier run's traces)")
    p.add_argument("--shed", action=argparse.BooleanOptionalAction, default=True,
                   help="the slo policy sheds what no width can serve in time (429) instead of serving it late")
    p.add_argument("--give-up", type=float, default=5.0, help="client timeout, in multiples of the SLO")
    p.add_argument("--engines", default="process", help=f"comma-separated, from {sorted(ENGINES)}; the first one's TA "
                                                  "rate sets the traces and the SLO")
    p.add_argument("--scenarios", default="ramp,bursty,overload", help="comma-separated, from ramp, bursty, overload")
    p.add_argument("--burstiness", type=float, default=0.25,
                   help="the bursty trace's gamma shape (vLLM's burstiness: squared CV of the gaps = 1 / this)")
    p.add_argument("--bursty-rate", type=float, default=1.2, help="the bursty trace's mean rate, x the TA's")
    p.add_argument("--overload", type=float, default=10.0, help="the overload trace's rate, x the TA's")
    p.add_argument("--overload-seconds", type=float, default=20.0)
    p.add_argument("--ablate-ceiling", action=argparse.BooleanOptionalAction, default=False,
                   help="also replay `slo:utilization=0` (per-request choice without the load ceiling)")
    p.add_argument("--compile", default="background", choices=("off", "background", "require"),
                   help="the servers' --compile (default: the server's own default)")
    p.add_argument("--compile-cache", type=Path, help="the servers' --compile-cache (default: theirs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "slo_router")
    return p.parse_args(argv)


def replay(url: str, model: str, trace: list[Request], slo_ms: float, timeout_s: float) -> list[RequestOutput]:
    """Open loop: send each request of the trace at its arrival time whatever the server is doing,
    each with the end-to-end latency target ``slo_ms``."""
    requests = [Request(r.prompt, r.max_tokens, r.arrival_s, model, {"latency_slo_ms": slo_ms}) for r in trace]
    return asyncio.run(run_open_loop(url, requests, timeout_s, stream=False))[0]


def attainable(arrivals: list[float], capacity_rps: float, duration: float, window_s: float = 5.0) -> float:
    """Upper bound on the share of a trace any width policy can serve: per ``window_s`` of it, at
    most what the cheapest width sustains saturated (requests beyond it must queue past the SLO
    or be refused). Generous: it ignores queueing within a window and the cost of refusing."""
    windows = np.histogram(arrivals, bins=max(1, round(duration / window_s)), range=(0, duration))[0]
    cap = capacity_rps * duration / len(windows)
    return float(np.minimum(windows, cap).sum() / max(1, len(arrivals)))


def record_quality(record: RequestOutput, quality: dict[str, float]) -> float:
    """An answer's quality: its width's, or, when its width changed mid-generation (``x-matta-widths``),
    the mean over its tokens."""
    if record.widths:
        return answer_quality(quality, parse_width_steps(record.widths), record.output_tokens or 0)
    return quality[record.width]


def summarise(records: list[RequestOutput], slo_s: float, quality: dict[str, float], duration: float, bins: int) -> dict:
    n = len(records)
    ok = [r for r in records if r.success]
    met = [r for r in ok if r.latency_s <= slo_s]
    shed = [r for r in records if r.status == 429]
    lat = [r.latency_s for r in ok]
    ratios = [r.latency_s / r.predicted_s for r in ok if r.predicted_s]
    edges = np.linspace(0, duration, bins + 1)
    timeline = []
    for lo, hi in itertools.pairwise(edges):
        window = [r for r in records if lo <= r.arrival_s < hi]
        served = [r for r in window if r.success]
        timeline.append({
            "t_mid": float((lo + hi) / 2), "sent": len(window),
            "attainment": (sum(r.latency_s <= slo_s for r in served) / len(window)) if window else None,
            "p99_s": float(np.percentile([r.latency_s for r in served], 99)) if served else None,
            "width_mix": {w: sum(r.width == w for r in served) / len(served) for w in quality} if served else {},
        })
    return {
        "requests": n, "served": len(ok), "met": len(met), "shed": len(shed),
        "errors": n - len(ok) - len(shed),
        "slo_attainment": len(met) / n if n else None,
        "slo_attainment_of_served": len(met) / len(ok) if ok else None,
        "p50_s": statistics.median(lat) if lat else None,
        "p99_s": float(np.percentile(lat, 99)) if lat else None,
        "goodput_requests_per_s": len(met) / duration,
        "goodput_tokens_per_s": sum((r.output_tokens or 0) for r in met) / duration,
        "effective_quality": sum(record_quality(r, quality) for r in met) / n if n else None,
        "quality_of_met": sum(record_quality(r, quality) for r in met) / len(met) if met else None,
        "width_mix": {w: sum(r.width == w for r in ok) / len(ok) for w in quality} if ok else {},
        "send_lag_p99_s": float(np.percentile([r.send_lag_s for r in records], 99)) if records else None,
        "late_after_send_lag": sum(r.latency_s > slo_s >= r.latency_s - r.send_lag_s for r in ok),
        "prediction_ratio_median": statistics.median(ratios) if ratios else None,
        "prediction_ratio_p10_p90": [float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90))]
        if ratios else None,
        "timeline": timeline,
    }


def plot(results: dict, path: Path, slo_records: dict[str, list[RequestOutput]]) -> None:
    """Top row: SLO attainment per scenario (policy groups, one bar per engine). Bottom row: the
    `slo` policy's latencies over the ramp (``slo_records``, per engine), refusals in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(results["scenarios"])
    engines = results["engines"]
    slo = results["slo_ms"] / 1000
    ncols = max(len(scenarios), len(engines))
    fig, axes = plt.subplots(2, ncols, figsize=(5.5 * ncols, 8), squeeze=False)
    for j, scenario in enumerate(scenarios):
        ax = axes[0][j]
        runs = results["scenarios"][scenario]["engines"]
        policies = list(next(iter(runs.values()))["policies"])
        bar = 0.8 / len(engines)
        for k, engine in enumerate(engines):
            values = [100 * runs[engine]["policies"][p]["summary"]["slo_attainment"] for p in policies]
            ax.bar([i - 0.4 + bar * (k + 0.5) for i in range(len(policies))], values, width=bar, label=engine)
        ax.axhline(100 * results["scenarios"][scenario]["attainable_bound"], color="black", linestyle=":",
                   label="attainable bound")
        ax.set_xticks(range(len(policies)), policies)
        ax.set(ylabel="% of requests within SLO", ylim=(0, 105), title=f"{scenario}: {results['scenarios'][scenario]['what']}")
        ax.legend(fontsize=8)
    for j in range(len(scenarios), ncols):
        axes[0][j].axis("off")
    ramp = results["scenarios"].get("ramp") or results["scenarios"][scenarios[0]]
    for j, engine in enumerate(engines):
        ax = axes[1][j]
        records = slo_records.get(engine, [])
        for status, color, label in ((200, "tab:blue", "served"), (429, "tab:red", "shed (429)")):
            pts = [r for r in records if r.status == status]
            ax.scatter([r.arrival_s for r in pts], [r.latency_s for r in pts], s=4, color=color, alpha=0.5, label=label)
        ax.axhline(slo, color="black", linestyle="--", label=f"SLO {results['slo_ms']:.0f} ms")
        ax.set_yscale("log")
        s = ramp["engines"][engine]["policies"]["slo"]["summary"]
        ax.set(xlabel="time (s)", ylabel="latency (s)",
               title=f"slo, {engine} engine: {100 * s['slo_attainment']:.1f}% within SLO, "
                     f"goodput {s['goodput_requests_per_s']:.1f} req/s")
        ax.legend(loc="upper left", fontsize=8)
    for j in range(len(engines), ncols):
        axes[1][j].axis("off")
    fig.suptitle("slo_router (2 cores shared by the server and the load generator)")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def calibrate(args, ckpt, prompts, work: Path, common: tuple, engine: str, width: str) -> dict:
    """Saturated closed-loop throughput of ``fixed:<width>`` on ``engine`` (after a warm-up)."""
    server = Server(args.checkpoint, args.threads, args.max_batch, work / f"calibrate_{engine}_{width}.log",
                    extra_args=(*ENGINES[engine], *common, "--policy", f"fixed:{width}"), compile=args.compile)
    url = server.start(timeout_s=1800)
    try:
        requests = [Request(p, args.max_tokens, 0.0, ckpt.name) for p in prompts]
        asyncio.run(run_closed_loop(url, requests, args.max_batch, stream=False, duration_s=3.0))
        outputs, duration = asyncio.run(run_closed_loop(url, requests, args.max_batch, stream=False, duration_s=15.0))
        s = summarize(outputs, duration)
        return {"requests_per_s": s["request_throughput"], "tokens_per_s": s["output_throughput"],
                "p50_s": s["median_e2el_ms"] / 1000, "p99_s": s["p99_e2el_ms"] / 1000, "requests": s["completed"]}
    finally:
        server.stop()


def verdict(results: dict) -> dict:
    """Each engine's figures against the issue's targets (ratios; the booleans say whether met)."""
    out = {}
    slo_s = results["slo_ms"] / 1000
    student = results["widths"][0]
    for engine in results["engines"]:
        capacity = results["capacity"][engine]["student"]["requests_per_s"]
        mine = {"student_capacity_req_s": capacity}
        scenarios = results["scenarios"]
        if "ramp" in scenarios:
            s = scenarios["ramp"]["engines"][engine]["policies"]["slo"]["summary"]
            mine["ramp"] = {"slo_attainment": s["slo_attainment"],
                            "goodput_over_student_capacity": s["goodput_requests_per_s"] / capacity,
                            "share_of_attainable_bound": s["slo_attainment"] / scenarios["ramp"]["attainable_bound"],
                            "admitted_p99_within_slo": s["p99_s"] is not None and s["p99_s"] <= slo_s}
        if "bursty" in scenarios:
            p = scenarios["bursty"]["engines"][engine]["policies"]
            mine["bursty"] = {"slo_attainment": {n: v["summary"]["slo_attainment"] for n, v in p.items()},
                              "slo_keeps_99_9pct": p["slo"]["summary"]["slo_attainment"] >= 0.999,
                              "quality_of_met": {n: v["summary"]["quality_of_met"] for n, v in p.items()},
                              "slo_quality_above_fixed_student": (p["slo"]["summary"]["quality_of_met"] or 0)
                              > (p[f"fixed:{student}"]["summary"]["quality_of_met"] or 0)}
        if "overload" in scenarios:
            s = scenarios["overload"]["engines"][engine]["policies"]["slo"]["summary"]
            mine["overload"] = {"admitted_goodput_over_capacity": s["goodput_requests_per_s"] / capacity,
                                "admitted_p99_within_slo": s["p99_s"] is not None and s["p99_s"] <= slo_s}
        out[engine] = mine
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    engines = args.engines.split(",")
    scenarios = args.scenarios.split(",")
    unknown = [e for e in engines if e not in ENGINES] + [s for s in scenarios if s not in ("ramp", "bursty", "overload")]
    if unknown:
        raise SystemExit(f"unknown engine or scenario: {unknown}")
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
    common = ("--max-queue", "100000", "--profile", str(profile_path),
              *(("--compile-cache", str(args.compile_cache)) if args.compile_cache else ()))

    capacity = {}
    for engine in engines:
        print(f"calibrating the {engine} engine", flush=True)
        capacity[engine] = {"ta": calibrate(args, ckpt, prompts, work, common, engine, ta),
                            "student": calibrate(args, ckpt, prompts, work, common, engine, student)}
        print(f"  {engine}: TA {capacity[engine]['ta']['requests_per_s']:.1f} req/s "
              f"(p50 {1000 * capacity[engine]['ta']['p50_s']:.0f} ms), "
              f"Student {capacity[engine]['student']['requests_per_s']:.1f} req/s", flush=True)
    reference = capacity[engines[0]]["ta"]
    rate = args.rate or reference["requests_per_s"]
    slo_ms = args.slo_ms or 1000 * args.slo_factor * reference["p50_s"]
    print(f"R = {rate:.1f} req/s ({'given' if args.rate else engines[0] + ' engine' + chr(39) + 's TA'}); "
          f"SLO {slo_ms:.0f} ms", flush=True)

    slo_flags = ("--policy", "slo", "--slo-ms", f"{slo_ms:.1f}", *(("--shed",) if args.shed else ()),
)
    every_policy = {f"fixed:{ta}": ("--policy", f"fixed:{ta}"), f"fixed:{student}": ("--policy", f"fixed:{student}"),
                    "slo": slo_flags}
    if args.ablate_ceiling:  # the same policy choosing per request only, on the same trace
        every_policy[NO_CEILING] = ("--policy", NO_CEILING, *slo_flags[2:])
    def at(times: list[float]) -> list[Request]:
        return requests_at(times, prompts, args.max_tokens, ckpt.name, seed=args.seed)

    bursty, overload = args.bursty_rate * rate, args.overload * rate
    plans = {
        "ramp": (f"Poisson {args.ramp[0]:g}R -> {args.ramp[1]:g}R", args.duration,
                 at(ramp_arrivals(args.ramp[0] * rate, args.ramp[1] * rate, args.duration, args.seed)), every_policy),
        "bursty": (f"gamma burstiness {args.burstiness:g}, mean {args.bursty_rate:g}R", args.duration,
                   at(arrivals(round(bursty * args.duration), bursty, args.burstiness, args.seed)), every_policy),
        "overload": (f"Poisson {args.overload:g}R", args.overload_seconds,
                     at(arrivals(round(overload * args.overload_seconds), overload, 1.0, args.seed)),
                     {"slo": slo_flags}),
    }
    slo_records: dict[str, list[RequestOutput]] = {}  # the plot's latency scatter (the ramp, or the first scenario)
    best_student = max(c["student"]["requests_per_s"] for c in capacity.values())
    results = {"checkpoint": str(args.checkpoint), "widths": widths, "quality": quality, "threads": args.threads,
               "max_batch": args.max_batch, "max_tokens": args.max_tokens, "prompts": prompt_info,
               "engines": engines, "engine_flags": {e: list(ENGINES[e]) for e in engines}, "capacity": capacity,
               "rate_R": rate, "slo_ms": slo_ms, "shed": args.shed, "ramp": list(args.ramp),
               "profile_error": profile["meta"]["relative_error"], "scenarios": {}}
    for scenario in scenarios:
        what, duration, trace, policies = plans[scenario]
        entry = results["scenarios"][scenario] = {
            "what": what, "duration_s": duration, "requests": len(trace),
            "attainable_bound": attainable([r.arrival_s for r in trace], best_student, duration), "engines": {}}
        for engine in engines:
            runs = entry["engines"][engine] = {"policies": {}}
            for name, flags in policies.items():
                print(f"{scenario}: replaying {len(trace)} requests against {name} on the {engine} engine", flush=True)
                log = work / f"{scenario}_{engine}_{name.replace(':', '_')}.log"
                server = Server(args.checkpoint, args.threads, args.max_batch, log,
                                extra_args=(*ENGINES[engine], *common, *flags), compile=args.compile)
                url = server.start(timeout_s=1800)
                try:
                    cpu_before, client_before, wall_before = server.cpu_seconds(), time.process_time(), time.monotonic()
                    # A request still unanswered after --give-up x SLO counts as missed (status 0): a
                    # collapsing policy's backlog would otherwise take minutes to drain.
                    records = replay(url, ckpt.name, trace, slo_ms, timeout_s=max(5.0, args.give_up * slo_ms / 1000))
                    wall = time.monotonic() - wall_before
                    cpu = {k: (v - cpu_before[k]) / wall for k, v in server.cpu_seconds().items()}
                    cpu["client"] = (time.process_time() - client_before) / wall
                    metrics_text = httpx.get(url + "/metrics", timeout=30).text
                finally:
                    server.stop()
                summary = summarise(records, slo_ms / 1000, quality, duration, bins=12)
                summary["cpu_cores"] = cpu  # mean cores busy per process over the replay (2 on this machine)
                summary["server_metrics"] = {
                    line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics_text.splitlines()
                    if line.startswith(("matta_effective_quality", "matta_slo_attainment_ratio",
                                        "matta_latency_correction_ratio"))}
                runs["policies"][name] = {"summary": summary}
                write_rows(records, RUNS / "bench" / "slo_router" / f"{scenario}_{engine}_{name.replace(':', '_')}.jsonl")
                if name == "slo" and (scenario == "ramp" or engine not in slo_records):
                    slo_records[engine] = records
                p99 = f"{summary['p99_s']:.2f} s" if summary["p99_s"] is not None else "-"
                print(f"  {100 * summary['slo_attainment']:.1f}% within SLO, goodput "
                      f"{summary['goodput_requests_per_s']:.1f} req/s, p99 {p99}, shed {summary['shed']}, "
                      f"mix {summary['width_mix']}, cores busy {({k: round(v, 2) for k, v in cpu.items()})}", flush=True)
    results["verdict"] = verdict(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"), slo_records)
    print(json.dumps(results["verdict"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
