"""Where the Student's decode speed-up goes: a batch x context sweep of the bare decode step.

The serving benchmark compares the measured Student/TA decode speed-up with the FLOP ratio
(``ModelConfig.flops_per_token``). This benchmark asks *why* the two differ, by timing one
``NestedGPT`` decode step (batch x 1 token against a ``StaticKVCache`` of ``context`` tokens, as in
the engine; no engine, no HTTP) for each width over a grid of batch sizes and context lengths,
widths interleaved in rotating order (``benchmarks.harness.model_decode_step``), median of
``--repeats`` x 3 samples of ``--inner`` steps each.

Per grid point and width it reports the step time, the FLOPs and the bytes a step must move:
the weights the width reads (fp32, including the LM head) and the KV cache every layer reads
(K and V, ``batch x context x d_model`` each) - the KV bytes and the attention FLOPs are the same
for every width, because the widths differ only in FFN units. It also measures the machine's
attainable FLOP rate (a large sgemm) and copy bandwidth (a large tensor sum) in the same run, and
reports per point the FLOP rate each width achieves. Measured speed-up over the FLOP prediction
is the figure the serving issue sets a goal for (>= 0.9). A roofline prediction sits beside it:
per width, max(FLOPs / sgemm peak, bytes / read bandwidth) with the peaks measured in this run.

Eager and compiled steps in the same run (``--steps eager compiled``): the compiled step is the
engine's (``serving.worker.compiled.DecodeSteps`` with ``require``: one compiled step per signature with
dynamic batch and context), timed interleaved with the eager one; per point, each against its
roofline (the issue's target: >= 0.7 at batch >= 4), and the Student/TA step ratio of each against
the roofline ratio (target >= 0.9 of it).

Two shapes in the same run: the shipped checkpoint (d_model 128, 4 layers) and a GPT-2-small
shaped elastic model (``gpt2-small``: d_model 768, 12 layers, head_dim 64, FFN 3072 with
widths 384 / 768 / 1536 / 3072, the shipped tokenizer's 2,048-token vocabulary, random
weights: a step's time does not depend on the values), so the trade is measured where the FFN
is most of the work. A third, ``smollm-135m``, is a nested Llama of SmolLM-135M's shape (d_model
576, 30 layers, 9 query heads of 64 on 3 key/value heads, SwiGLU FFN 1536 with widths 192 / 384 /
768 / 1536, random weights): RMSNorm, rotary positions, grouped-query attention (a third of the
KV-cache bytes) and a three-matrix FFN.

    python -m benchmarks.decode_scaling [--checkpoint checkpoints/default] [--threads 2] [--shapes shipped gpt2-small smollm-135m]

Takes about 6 minutes on 2 cores for the default grid; run it on an otherwise idle machine.
Writes ``--out``.json and ``--out``.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import SHAPE_BUILDERS, machine_peaks, model_decode_step, roofline_ms, save_png, step_bytes, step_flops
from matta.checkpoint import load_checkpoint
from matta.model import NestedDecoder
from serving.worker.compiled import DecodeSteps

SHAPES = ("shipped", "gpt2-small", "smollm-135m")


def sweep(model: NestedDecoder, args: argparse.Namespace, peaks: dict, label: str) -> dict:
    """The batch x context grid for one model; per point and width, step time, FLOPs, bytes, roofline."""
    config = model.config
    widths = args.widths or list(config.widths)
    student, ta = widths[0], widths[-1]
    steps = {"eager": DecodeSteps(model)}
    if "compiled" in args.steps:
        started = time.perf_counter()
        steps["compiled"] = DecodeSteps(model, "require", max_batch=max(args.batches), cache_dir=args.compile_cache,
                                        rows=[[w, w] for w in widths[:1]] + [[w] for w in widths[:1]])
        print(f"{label}: compiled steps ready in {time.perf_counter() - started:.0f} s", flush=True)
    points = []
    for batch in args.batches:
        for context in args.contexts:
            timing = model_decode_step(model, widths, batch, context, args.repeats, inner=args.inner, steps=steps)
            point: dict = {"batch": batch, "context": context, "widths": {}, "compiled": {}}
            for w in widths:
                flops = step_flops(config, w, batch, context)
                nbytes = step_bytes(config, w, batch, context)
                roof = roofline_ms(flops, sum(nbytes.values()), peaks)
                ms = timing["eager"][w]["median_step_ms"]
                point["widths"][w] = {"median_step_ms": ms, "step_ms": timing["eager"][w]["step_ms"], "flops": flops,
                                      "bytes": nbytes, "achieved_gflops": flops / ms / 1e6, "roofline_ms": roof,
                                      "efficiency": roof / ms}
                if "compiled" in timing:
                    cms = timing["compiled"][w]["median_step_ms"]
                    point["compiled"][w] = {"median_step_ms": cms, "step_ms": timing["compiled"][w]["step_ms"],
                                            "achieved_gflops": flops / cms / 1e6, "efficiency": roof / cms,
                                            "over_eager": cms / ms}
            if point["compiled"]:
                cs, ct = point["compiled"][student], point["compiled"][ta]
                point["compiled_speedup"] = ct["median_step_ms"] / cs["median_step_ms"]
            ws, wt = point["widths"][student], point["widths"][ta]
            predicted = wt["flops"] / ws["flops"]
            roofline = wt["roofline_ms"] / ws["roofline_ms"]
            measured = wt["median_step_ms"] / ws["median_step_ms"]
            point.update(predicted_speedup_flops=predicted, predicted_speedup_roofline=roofline,
                         measured_speedup=measured, measured_over_predicted=measured / predicted,
                         measured_over_roofline=measured / roofline)
            if point["compiled"]:
                point["compiled_speedup_over_roofline"] = point["compiled_speedup"] / roofline
            points.append(point)
            print(f"{label} batch {batch:4d} context {context:4d}: " + "  ".join(
                f"{w} {point['widths'][w]['median_step_ms']:.2f} ms" for w in widths)
                + f"  speed-up {measured:.2f}x of {predicted:.2f}x FLOPs ({measured / predicted:.2f}), "
                  f"{roofline:.2f}x roofline ({measured / roofline:.2f})" + ("" if not point["compiled"] else
                  "  compiled: " + "  ".join(f"{w} {point['compiled'][w]['median_step_ms']:.2f} ms "
                                             f"(eff {point['compiled'][w]['efficiency']:.2f} vs "
                                             f"{point['widths'][w]['efficiency']:.2f})" for w in widths)
                  + f", speed-up {point['compiled_speedup']:.2f}x ({point['compiled_speedup_over_roofline']:.2f} "
                    f"of roofline)"), flush=True)
    best = max(points, key=lambda p: p["measured_over_predicted"])
    return {
        "model": {"name": config.name, "d_model": config.d_model, "n_layer": config.n_layer,
                  "head_dim": config.head_dim, "vocab_size": config.vocab_size, "widths": dict(config.widths)},
        "student": student, "ta": ta, "widths": widths, "points": points,
        "summary": {"best_measured_over_predicted": best["measured_over_predicted"],
                    "best_at": {"batch": best["batch"], "context": best["context"]},
                    "median_measured_over_predicted": statistics.median(p["measured_over_predicted"] for p in points),
                    "median_measured_over_roofline": statistics.median(p["measured_over_roofline"] for p in points),
                    "goal_0.9_met_anywhere": best["measured_over_predicted"] >= 0.9,
                    **compiled_summary(points, widths)},
    }


def compiled_summary(points: list[dict], widths: list[str]) -> dict:
    """Issue 20's targets over the grid: efficiency (roofline / measured) >= 0.7 at batch >= 4, and the
    compiled Student/TA step ratio >= 0.9 of the roofline ratio."""
    if not points or not points[0]["compiled"]:
        return {}
    big = [p for p in points if p["batch"] >= 4]
    at_batch_ge_4 = {
        "compiled_median_efficiency_batch_ge_4": {w: statistics.median(p["compiled"][w]["efficiency"] for p in big)
                                                  for w in widths},
        "eager_median_efficiency_batch_ge_4": {w: statistics.median(p["widths"][w]["efficiency"] for p in big)
                                               for w in widths},
        "compiled_points_at_0.7_batch_ge_4": {w: f"{sum(p['compiled'][w]['efficiency'] >= 0.7 for p in big)}/"
                                                 f"{len(big)}" for w in widths},
    } if big else {}  # a grid of batches below 4 has no point the target speaks of
    return {
        **at_batch_ge_4,
        "compiled_median_over_eager": {w: statistics.median(p["compiled"][w]["over_eager"] for p in points)
                                       for w in widths},
        "compiled_median_speedup_over_roofline": statistics.median(p["compiled_speedup_over_roofline"]
                                                                   for p in points),
        "eager_median_speedup_over_roofline": statistics.median(p["measured_over_roofline"] for p in points),
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    peaks = machine_peaks()
    shapes = {}
    for label in args.shapes:
        model = (ckpt.model if label == "shipped"
                 else SHAPE_BUILDERS[label](ckpt.config.vocab_size, ckpt.config.eos_token_id))
        shapes[label] = sweep(model, args, peaks, label)
        del model
    return {
        "benchmark": "decode_scaling", "checkpoint": str(args.checkpoint), "threads": args.threads,
        "repeats": args.repeats, "inner": args.inner,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, **peaks},
        "shapes": shapes,
    }


def markdown(results: dict) -> str:
    lines = []
    for label, shape in results["shapes"].items():
        s, ta, model = shape["student"], shape["ta"], shape["model"]
        lines += [f"\n{label}: d_model {model['d_model']}, {model['n_layer']} layers, widths {model['widths']}\n",
                  f"| batch | context | {s} step ms | {ta} step ms | speed-up measured | FLOP-predicted | ratio "
                  f"| roofline-predicted | ratio | {s} GFLOP/s | {ta} GFLOP/s | KV MB per step "
                  f"| {s} compiled ms (eff.) | {ta} compiled ms (eff.) | compiled speed-up (/ roofline) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in shape["points"]:
            ws, wt = p["widths"][s], p["widths"][ta]
            lines.append(f"| {p['batch']} | {p['context']} | {ws['median_step_ms']:.2f} | {wt['median_step_ms']:.2f} | "
                         f"{p['measured_speedup']:.2f}x | {p['predicted_speedup_flops']:.2f}x | "
                         f"{p['measured_over_predicted']:.2f} | {p['predicted_speedup_roofline']:.2f}x | "
                         f"{p['measured_over_roofline']:.2f} | {ws['achieved_gflops']:.1f} | "
                         f"{wt['achieved_gflops']:.1f} | {ws['bytes']['kv_cache'] / 1e6:.1f} | "
                         + (f"{p['compiled'][s]['median_step_ms']:.2f} ({p['compiled'][s]['efficiency']:.2f} vs "
                            f"{ws['efficiency']:.2f}) | {p['compiled'][ta]['median_step_ms']:.2f} "
                            f"({p['compiled'][ta]['efficiency']:.2f} vs {wt['efficiency']:.2f}) | "
                            f"{p['compiled_speedup']:.2f}x ({p['compiled_speedup_over_roofline']:.2f}) |"
                            if p["compiled"] else "- | - | - |"))
    m = results["machine"]
    lines.append(f"\nMachine, same run: sgemm {m['sgemm_gflops']:.0f} GFLOP/s, streaming read {m['read_gb_per_s']:.1f} GB/s.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = results["shapes"]
    fig, axes = plt.subplots(len(shapes), 3, figsize=(16, 4 * len(shapes)), squeeze=False)
    for (label, shape), (ax_r, ax_g, ax_e) in zip(shapes.items(), axes, strict=True):
        s, ta = shape["student"], shape["ta"]
        contexts = sorted({p["context"] for p in shape["points"]})
        batches = sorted({p["batch"] for p in shape["points"]})
        for i, c in enumerate(contexts):
            pts = [p for p in shape["points"] if p["context"] == c]
            ax_r.plot([p["batch"] for p in pts], [p["measured_over_predicted"] for p in pts], marker="o",
                      color=f"C{i}", label=f"/ FLOPs, context {c}")
            ax_r.plot([p["batch"] for p in pts], [p["measured_over_roofline"] for p in pts], marker="^",
                      color=f"C{i}", linestyle="--", label=f"/ roofline, context {c}")
            ax_g.plot([p["batch"] for p in pts], [p["widths"][s]["achieved_gflops"] for p in pts], marker="o",
                      color=f"C{i}", label=f"{s}, context {c}")
            ax_g.plot([p["batch"] for p in pts], [p["widths"][ta]["achieved_gflops"] for p in pts], marker="s",
                      color=f"C{i}", linestyle="--", label=f"{ta}, context {c}")
            if pts[0]["compiled"]:
                ax_r.plot([p["batch"] for p in pts], [p["compiled_speedup_over_roofline"] for p in pts], marker="*",
                          color=f"C{i}", linestyle="-.", label=f"compiled / roofline, context {c}")
                for w, marker in ((s, "o"), (ta, "s")):
                    ax_e.plot([p["batch"] for p in pts], [p["widths"][w]["efficiency"] for p in pts], marker=marker,
                              color=f"C{i}", linestyle=":", alpha=0.6, label=f"{w} eager, context {c}")
                    ax_e.plot([p["batch"] for p in pts], [p["compiled"][w]["efficiency"] for p in pts],
                              marker=marker, color=f"C{i}", label=f"{w} compiled, context {c}")
        ax_r.axhline(0.9, color="grey", linestyle=":", label="goal 0.9")
        ax_r.set(xscale="log", xticks=batches, xticklabels=batches, ylim=(0, 1.6), xlabel="decode batch",
                 ylabel="measured / predicted speed-up", title=f"{label}: {s} over {ta} decode speed-up")
        ax_g.axhline(results["machine"]["sgemm_gflops"], color="grey", linestyle=":", label="sgemm 1024^3")
        ax_g.set(xscale="log", yscale="log", xticks=batches, xticklabels=batches, xlabel="decode batch",
                 ylabel="GFLOP/s achieved", title=f"{label}: FLOP rate of a decode step")
        ax_e.axhline(0.7, color="grey", linestyle=":", label="target 0.7")
        ax_e.set(xscale="log", xticks=batches, xticklabels=batches, ylim=(0, 1.3), xlabel="decode batch",
                 ylabel="roofline / measured step", title=f"{label}: step efficiency, eager vs compiled")
        ax_r.legend(fontsize=6)
        ax_g.legend(fontsize=6)
        ax_e.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    parser.add_argument("--widths", nargs="+", help="widths to time, smallest first (default: all)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8, 64, 224])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--steps", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--compile-cache", type=Path, help="compiled steps' cache (default ~/.cache/matta/compile)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_scaling")
    args = parser.parse_args()
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(markdown(results))


if __name__ == "__main__":
    main()
