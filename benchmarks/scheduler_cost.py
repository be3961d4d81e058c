"""What one scheduling decision costs the engine's loop, against the length of the queue, one run.

:meth:`serving.engine.scheduler.Scheduler.schedule` runs once per iteration on the engine's one
thread, so its time is time no decode step runs. Two states that load brings, each with 0..256
promised sequences waiting (``--shed``, an SLO) beside a running batch:

- **full batch**: no slot is free; the scheduler only checks which waiting sequences can no longer
  make their targets (the refusal check runs over the whole queue every iteration);
- **admission refused**: slots are free, but the running rows' deadlines leave no room for another
  row, so each waiting sequence it tries (up to 64 an iteration) is priced and left waiting.

Each is measured with every waiting sequence of **one shape** (one prompt length and token budget,
as a benchmark's trace) and with **random shapes** (prompts of 8-256 tokens, budgets of 16-64, seeded:
a chat workload's queue, and the peer: before the scheduler priced per shape, every queue cost what
one of distinct shapes costs the refusal check). The
latency model is a table (no torch, no model): what is measured is the scheduler's own Python.
Median of ``--repeats`` fresh schedulers per point, with ``matta serve``'s chunked prefill budget
unless ``--max-num-batched-tokens`` says otherwise.

    python -m benchmarks.scheduler_cost [--queues 0 16 64 256] [--running 4 16 31]

Writes ``benchmarks/results/scheduler_cost.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import matplotlib

from benchmarks.harness import save_png
from router.latency import LatencyModel, WidthCost
from serving.engine.pricing import Plan
from serving.engine.scheduler import Scheduler
from serving.messages import Slo
from serving.settings import ServeSettings

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
WIDTHS = ["s", "m", "l", "ta"]
SIZES = {"s": 1, "m": 2, "l": 3, "ta": 4}
# Orders of the shipped checkpoint's profile: ~1-1.3 ms a step's fixed cost, 50 us a row.
LATENCY = LatencyModel({w: WidthCost(1e-3 * (1 + i / 3), 5e-5, 1e-7, 1e-3, 2e-5) for i, w in enumerate(WIDTHS)})


def state(case: str, running: int, waiting: int, distinct: bool, token_budget: int) -> Scheduler:
    """A scheduler ``running`` rows into its batch with ``waiting`` promised sequences queued."""
    sched = Scheduler(WIDTHS, SIZES, max_batch=32, max_queue=1024, latency=LATENCY, token_budget=token_budget)
    for i in range(running):
        sched.add(i, [16], [32], ("s",), Slo(e2e_deadline=10.0, shed=True), 0.0)
    while sched.waiting or any(seq.prefill_left for seq in sched.running):
        sched.schedule(0.0)  # chunked, the prompts take a few iterations
        for seq in sched.running:  # a prompt that ran makes its first token
            if not seq.prefill_left and seq.first_token_at is None:
                sched.update(seq, 1, 0.0)
    if case == "full batch":
        sched.max_batch = running  # no free slot: only the refusal check runs over the queue
        deadline = 10.0
    else:
        ends = sched._ends(Plan(list(sched.running), []), 0.0)
        for seq in sched.running:  # promised exactly at their predicted ends: no room for one more row
            seq.aim_end = ends[seq.seq_id]
        deadline = 100.0
    rng = random.Random(0)
    for i in range(waiting):
        prompt, budget = (rng.randint(8, 256), rng.randint(16, 64)) if distinct else (16, 32)
        sched.add(1000 + i, [prompt], [budget], WIDTHS, Slo(e2e_deadline=deadline, shed=True), 0.0)
    return sched


def measure(case: str, running: int, waiting: int, distinct: bool, repeats: int, token_budget: int) -> dict:
    times, admitted, shed = [], 0, 0
    for _ in range(repeats):
        sched = state(case, running, waiting, distinct, token_budget)
        started = time.perf_counter()
        out = sched.schedule(1e-3)
        times.append(time.perf_counter() - started)
        admitted, shed = len(out.admitted), len(out.shed)
    return {"case": case, "running": running, "waiting": waiting, "shapes": "random" if distinct else "one",
            "schedule_ms_median": 1e3 * statistics.median(times), "admitted": admitted, "shed": shed}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queues", type=int, nargs="+", default=[0, 16, 64, 256])
    p.add_argument("--running", type=int, nargs="+", default=[4, 16, 31])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--max-num-batched-tokens", type=int, default=ServeSettings().max_num_batched_tokens,
                   help="chunked prefill's token budget (default: matta serve's); 0: unchunked")
    p.add_argument("--out", type=Path, default=RESULTS / "scheduler_cost")
    args = p.parse_args(argv)
    rows = []
    for case in ("full batch", "admission refused"):
        for running in args.running:
            for waiting in args.queues:
                one = measure(case, running, waiting, False, args.repeats, args.max_num_batched_tokens)
                distinct = measure(case, running, waiting, True, args.repeats, args.max_num_batched_tokens)
                one["random_over_one"] = distinct["schedule_ms_median"] / max(one["schedule_ms_median"], 1e-9)
                rows += [one, distinct]
                print(f"{case:17s} running {running:2d} waiting {waiting:3d}: one shape "
                      f"{one['schedule_ms_median']:.3f} ms, random {distinct['schedule_ms_median']:.3f} ms "
                      f"({one['random_over_one']:.1f}x)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"rows": rows, "repeats": args.repeats, "max_num_batched_tokens": args.max_num_batched_tokens}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, case in zip(axes, ("full batch", "admission refused"), strict=True):
        for running in args.running:
            for shapes, style in (("one", "-o"), ("random", "--x")):
                pts = [(r["waiting"], r["schedule_ms_median"]) for r in rows
                       if r["case"] == case and r["running"] == running and r["shapes"] == shapes]
                ax.plot(*zip(*pts, strict=True), style, label=f"{running} running, {shapes} shape(s)")
        ax.set_title(case)
        ax.set_xlabel("promised sequences waiting")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("schedule() ms per iteration (median)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
