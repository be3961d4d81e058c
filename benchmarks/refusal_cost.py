"""What refusing requests costs the serving they share a machine with: the Student's capacity while
the server refuses R requests a second, one run.

``slo_router``'s ramp ends at 4x the TA's capacity, 2-3x the Student's: most requests of its second
half are refused (shed), and each still costs the client a request, the API process a parse and an
answer, and the engine-core process a message, a pricing and a refusal. This measures what that
leaves the requests being served, on this machine (client and server share its cores):

- the server runs as ``slo_router`` runs it (``--policy slo --shed``, ``--compile background``,
  one torch thread, a 32-row batch);
- **served**: a closed loop of ``--max-batch`` clients keeps the batch full with pinned Student
  requests (no SLO: best effort, admitted as slots free up);
- **refused**: beside it, an open loop at R requests a second (Poisson) with a 1 ms SLO, which the
  engine's scheduler refuses on arrival (429), as it refuses the hopeless part of an overload.

R = 0 is the peer: the same server and clients without refusals. The report is the served
requests a second at each R and their ratio to R = 0, the CPU cores each process used, and the
**ramp bound**: the goodput ``slo_router``'s ramp (0.5R_TA -> 4R_TA over 60 s) could reach here if
every request it serves were served at this capacity given the refusals around it, over the
Student's capacity at R = 0 (the ramp's ``goodput_over_student_capacity``).

    python -m benchmarks.refusal_cost [--rates 0,50,100,150,200] [--seconds 15] [--ta-rate 82]

Writes ``benchmarks/results/refusal_cost.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np

from benchmarks.client import Request, arrivals, run_closed_loop, run_open_loop, summarize
from benchmarks.harness import Server, make_prompts, save_png
from matta.checkpoint import load_checkpoint

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    p.add_argument("--rates", default="0,50,100,150,200,250", help="refused requests a second, comma-separated")
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per rate (after a 3 s warm-up)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slo-ms", type=float, default=777.0, help="the server's default SLO (not used by either loop)")
    p.add_argument("--ta-rate", type=float, default=None,
                   help="R_TA of the ramp bound (req/s; default: 2/3 of the Student's capacity at R = 0, "
                        "the ratio slo_router measured)")
    p.add_argument("--out", type=Path, default=RESULTS / "refusal_cost")
    return p.parse_args(argv)


async def _measure(url: str, served: list[Request], refused: list[Request], concurrency: int,
                   seconds: float) -> tuple[list, float, list]:
    closed = run_closed_loop(url, served, concurrency, stream=False, duration_s=seconds)
    if not refused:
        outputs, duration = await closed
        return outputs, duration, []
    (outputs, duration), (refusals, _) = await asyncio.gather(closed, run_open_loop(url, refused, 10.0, stream=False))
    return outputs, duration, refusals


def ramp_bound(curve: list[tuple[float, float]], ta_rate: float, window_s: float = 5.0) -> float:
    """Goodput over the ramp 0.5R -> 4R (60 s) if each 5 s window served min(offered, capacity while
    refusing the rest), capacity interpolated on ``curve`` [(refused/s, served/s)]; over capacity at 0."""
    refused_rates, capacities = zip(*sorted(curve), strict=True)
    served_total = 0.0
    for start in np.arange(0.0, 60.0, window_s):
        offered = ta_rate * (0.5 + 3.5 * (start + window_s / 2) / 60.0)
        served = min(offered, capacities[0])
        for _ in range(50):  # served = min(offered, capacity(offered - served)): a fixed point
            served = min(offered, float(np.interp(offered - served, refused_rates, capacities)))
        served_total += served * window_s
    return served_total / 60.0 / capacities[0]


def plot(report: dict, path: Path) -> None:
    rows = report["rates"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    r = [x["refused_per_s_offered"] for x in rows]
    ax[0].plot(r, [x["served_per_s"] for x in rows], "o-", label="served (closed loop, Student)")
    ax[0].set_xlabel("refused requests / s (open loop, 1 ms SLO)")
    ax[0].set_ylabel("served requests / s")
    ax[0].set_ylim(bottom=0)
    ax[0].set_title(f"Student capacity while refusing; ramp bound {report['ramp_bound']:.2f}")
    ax[0].legend()
    for name in ("api", "engine_core", "client"):
        ax[1].plot(r, [x["cpu_cores"][name] for x in rows], "o-", label=name)
    ax[1].set_xlabel("refused requests / s")
    ax[1].set_ylabel("CPU cores")
    ax[1].set_title("where the 2 cores go")
    ax[1].legend()
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    student = ckpt.config.served_widths[0]
    prompts, prompt_info = make_prompts(ckpt, [student, ckpt.config.served_widths[-1]], 16, args.max_tokens)
    rates = [float(r) for r in args.rates.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.mkdtemp(prefix="refusal_cost_")) / "server.log"
    server = Server(args.checkpoint, 1, args.max_batch, log,
                    extra_args=("--policy", "slo", "--slo-ms", f"{args.slo_ms:.1f}", "--shed"), compile="background")
    url = server.start(timeout_s=1800)
    served = [Request(p, args.max_tokens, 0.0, f"{ckpt.name}:{student}") for p in prompts]
    rows = []
    try:
        asyncio.run(run_closed_loop(url, served, args.max_batch, stream=False, duration_s=10.0))  # compiled steps in
        for rate in rates:
            refused = []
            if rate > 0:
                times = arrivals(int(rate * args.seconds), rate, 1.0, seed=int(rate))
                refused = [Request(prompts[i % len(prompts)], args.max_tokens, t, ckpt.name, {"latency_slo_ms": 1})
                           for i, t in enumerate(times)]
            asyncio.run(run_closed_loop(url, served, args.max_batch, stream=False, duration_s=3.0))
            cpu0, client0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
            outputs, duration, refusals = asyncio.run(_measure(url, served, refused, args.max_batch, args.seconds))
            wall = time.perf_counter() - t0
            cpu1, client1 = server.cpu_seconds(), time.process_time()
            s = summarize(outputs, duration)
            statuses = {}
            for r in refusals:
                statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
            row = {"refused_per_s_offered": rate, "served_per_s": s["request_throughput"],
                   "served_p50_s": s["median_e2el_ms"] / 1000, "served_p99_s": s["p99_e2el_ms"] / 1000,
                   "served": s["completed"], "refusal_statuses": statuses,
                   "cpu_cores": {"api": (cpu1["api"] - cpu0["api"]) / wall,
                                 "engine_core": (cpu1["engine_core"] - cpu0["engine_core"]) / wall,
                                 "client": (client1 - client0) / wall}}
            rows.append(row)
            print(f"refusing {rate:5.0f}/s: served {row['served_per_s']:6.1f}/s (p99 {row['served_p99_s']:.3f} s), "
                  f"refusals {statuses}, cores api {row['cpu_cores']['api']:.2f} engine "
                  f"{row['cpu_cores']['engine_core']:.2f} client {row['cpu_cores']['client']:.2f}", flush=True)
    finally:
        server.stop()
    base = next((r["served_per_s"] for r in rows if r["refused_per_s_offered"] == 0), rows[0]["served_per_s"])
    for row in rows:
        row["served_over_no_refusals"] = row["served_per_s"] / base
    ta_rate = args.ta_rate or base * 2 / 3
    curve = [(r["refused_per_s_offered"], r["served_per_s"]) for r in rows]
    report = {"checkpoint": str(args.checkpoint), "max_batch": args.max_batch, "max_tokens": args.max_tokens,
              "prompts": prompt_info, "seconds": args.seconds, "server": "--policy slo --shed --compile background "
              "--threads 1", "rates": rows, "ta_rate": ta_rate, "ramp_bound": ramp_bound(curve, ta_rate),
              "ramp_bound_without_refusal_cost": ramp_bound([(0.0, base), (1e9, base)], ta_rate)}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"ramp bound: goodput {report['ramp_bound']:.2f} of the Student's capacity "
          f"({report['ramp_bound_without_refusal_cost']:.2f} if refusals cost nothing); "
          f"wrote {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
