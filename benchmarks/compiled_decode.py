"""Eager against `torch.compile`d decode steps, per width and batch, in one run (issue 20's first figure).

For the shipped checkpoint, each width in ``--widths`` and each batch in ``--batches`` at one
context: the decode step the engine runs (``serving.profile.decode_step_case``: one token per row
against a ``StaticKVCache``, next token picked) eager, then compiled with inductor for that exact shape
(``dynamic=False``: one graph per width x batch). Reported per point: the compile time of the
shape, the median step time of each, compiled/eager, each against the step's roofline (its FLOPs at
the measured sgemm rate or its bytes at the measured read bandwidth, whichever is larger; the same
yardstick as ``decode_scaling``), and the largest logit difference compiled vs eager (fp32). Also
the Student/TA step ratio eager and compiled against the roofline ratio, and the operator count of
one eager step (``torch.profiler``), which is where eager time goes at small batch.

Nothing here changes serving: the engine still runs eager steps. JSON + PNG.

    python -m benchmarks.compiled_decode [--batches 1 4 16] [--context 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.harness import machine_peaks, step_bytes, step_flops
from matta.checkpoint import load_checkpoint
from serving.profile import decode_step_case, median_time

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    p.add_argument("--widths", nargs="+", help="default: the Student and the TA")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "compiled_decode")
    return p.parse_args(argv)


def eager_op_count(model, step) -> dict:
    """Operators one eager step launches, and the share of its CPU time the top ones take."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model)
    events = prof.key_averages()
    ops = [e for e in events if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in ops) or 1
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"aten_calls": int(sum(e.count for e in ops)),
            "top_self_cpu": [{"op": e.key, "calls": int(e.count), "share": e.self_cpu_time_total / total} for e in top]}


@torch.inference_mode()
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    model, config = ckpt.model.eval(), ckpt.config
    widths = args.widths or [config.width_names[0], config.width_names[-1]]
    peaks = machine_peaks()
    points = []
    for width in widths:
        for batch in args.batches:
            step = decode_step_case(model, {"width": width}, batch, args.context, torch.Generator().manual_seed(batch))
            reference = step(model)
            compiled = torch.compile(model, dynamic=False)
            started = time.perf_counter()
            out = step(compiled)
            compile_s = time.perf_counter() - started
            eager_ms = 1e3 * median_time(partial(step, model), args.repeats)
            compiled_ms = 1e3 * median_time(partial(step, compiled), args.repeats)
            flops = step_flops(config, width, batch, args.context)
            moved = sum(step_bytes(config, width, batch, args.context).values())
            roof_ms = 1e3 * max(flops / (peaks["sgemm_gflops"] * 1e9), moved / (peaks["read_gb_per_s"] * 1e9))
            point = {"width": width, "batch": batch, "context": args.context, "compile_s": compile_s,
                     "eager_ms": eager_ms, "compiled_ms": compiled_ms, "compiled_over_eager": compiled_ms / eager_ms,
                     "roofline_ms": roof_ms, "eager_efficiency": roof_ms / eager_ms,
                     "compiled_efficiency": roof_ms / compiled_ms,
                     "max_abs_logit_diff": float((out - reference).abs().max())}
            points.append(point)
            print(json.dumps(point), flush=True)
            torch._dynamo.reset()  # one compiled graph at a time, as a fresh process would have
    s, ta = widths[0], widths[-1]
    ratios = []
    for batch in args.batches:
        p = {w: next(x for x in points if x["width"] == w and x["batch"] == batch) for w in (s, ta)}
        ratios.append({"batch": batch, "ta_over_student_eager": p[ta]["eager_ms"] / p[s]["eager_ms"],
                       "ta_over_student_compiled": p[ta]["compiled_ms"] / p[s]["compiled_ms"],
                       "ta_over_student_roofline": p[ta]["roofline_ms"] / p[s]["roofline_ms"]})
    results = {"checkpoint": str(args.checkpoint), "threads": args.threads, "torch": torch.__version__,
               "peaks": peaks, "points": points, "student_ta": ratios,
               "eager_ops": eager_op_count(model, decode_step_case(model, {"width": s}, 1, args.context, torch.Generator()))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({"student_ta": ratios, "eager_ops": results["eager_ops"]["aten_calls"]}, indent=1))
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for width in dict.fromkeys(p["width"] for p in results["points"]):
        pts = [p for p in results["points"] if p["width"] == width]
        batches = [p["batch"] for p in pts]
        ax_t.plot(batches, [p["eager_ms"] for p in pts], "o-", label=f"{width} eager")
        ax_t.plot(batches, [p["compiled_ms"] for p in pts], "s--", label=f"{width} compiled")
        ax_e.plot(batches, [p["eager_efficiency"] for p in pts], "o-", label=f"{width} eager")
        ax_e.plot(batches, [p["compiled_efficiency"] for p in pts], "s--", label=f"{width} compiled")
    ax_t.set(xscale="log", xlabel="batch", ylabel="decode step (ms)", title="step time")
    ax_e.axhline(0.7, color="grey", linestyle=":", label="issue 20 target")
    ax_e.set(xscale="log", xlabel="batch", ylabel="roofline / measured", title="efficiency vs roofline")
    for ax in (ax_t, ax_e):
        ax.legend(fontsize=8)
    fig.suptitle(f"eager vs torch.compile decode step ({results['threads']} thread, context "
                 f"{results['points'][0]['context']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
