"""Eager, per-shape compiled and the engine's compiled decode steps, per width and batch, in one run.

For the shipped checkpoint, each width in ``--widths`` and each batch in ``--batches`` at one
context, the engine's decode step (``serving.worker.compiled.decode_logits``: one token per row against a
``StaticKVCache``) three ways, timed interleaved (medians):

  eager     the forward as the engine ran it before issue 20;
  static    ``torch.compile(dynamic=False)`` for that exact shape (one graph per width x batch x
            context: the best inductor does here, and what serving could not afford);
  frozen    the same with inductor's ``freezing`` (weights as constants of the graph: folded and,
            for its linear layers, prepacked), which a step cached per checkpoint could use;
  engine    what ``matta serve --compile`` runs: ``serving.worker.compiled.DecodeSteps`` with one step per
            signature, batch, context and FFN plan symbolic, loaded from the compile cache.

Prefill stays eager in the engine; to see what compiling it would buy, the engine's prefill forward
(the whole prompt batch at one width, building the KV cache, logits for the last position only)
is timed eager and compiled for its exact shape (``--prefill-batches`` x ``--prompts``), beside
the same forward with logits at every position (what the engine ran before it kept only the
last). ``benchmarks.vs_vllm`` reports the share of a serving engine's time that prefill takes.

Per point: each against the step's roofline (its FLOPs at the measured sgemm rate or its bytes at
the measured read bandwidth, whichever is larger; the same yardstick as ``decode_scaling``), the
largest logit difference from eager (fp32), and where the engine step's time goes
(``torch.profiler``: its matrix multiplications, which inductor leaves to the BLAS, and the rest:
fused kernels, the compiled wrapper, its guard check). Also the Student/TA step ratio of each
against the roofline ratio, and the operator count of one eager step.

    python -m benchmarks.compiled_decode [--batches 1 4 16] [--context 64] [--prompts 32 128]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import interleaved, machine_peaks, roofline_ms, save_png, step_bytes, step_flops
from matta.checkpoint import load_checkpoint
from matta.kv_cache import StaticKVCache
from serving.worker.compiled import DecodeSteps, decode_logits, step_inputs

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("eager", "static", "frozen", "engine")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    p.add_argument("--widths", nargs="+", help="default: the Student and the TA")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--prefill-batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompts", type=int, nargs="+", default=[32, 128], help="prompt lengths of the prefill points")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile-cache", type=Path, help="the engine steps' cache (default ~/.cache/matta/compile)")
    p.add_argument("--out", type=Path, default=RESULTS / "compiled_decode")
    return p.parse_args(argv)


def eager_op_count(model, inputs) -> dict:
    """Operators one eager step launches, and the share of its CPU time the top ones take."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_logits(model, *inputs)
    events = prof.key_averages()
    ops = [e for e in events if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in ops) or 1
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"aten_calls": int(sum(e.count for e in ops)),
            "top_self_cpu": [{"op": e.key, "calls": int(e.count), "share": e.self_cpu_time_total / total} for e in top]}


def time_split(run, repeats: int) -> dict:
    """Per step: wall ms, ms inside matrix multiplications (their self CPU time, from the profiler),
    and the rest."""
    from torch.profiler import ProfilerActivity, profile

    run()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    wall = (time.perf_counter() - started) / repeats * 1e3
    matmul = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS) / repeats / 1e3
    return {"profiled_ms": wall, "matmul_ms": matmul, "other_ms": wall - matmul, "matmul_share": matmul / wall}


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, width: str, logits_to_keep: int = 1):
    """The engine's prefill forward (``serving.engine.core.EngineCore._prefill``): logits and the KV cache."""
    out = model(ids, width=width, attention_mask=mask, use_cache=True, logits_to_keep=logits_to_keep)
    return out.logits, out.past_key_values


PREFILL_VARIANTS = ("all_logits", "eager", "compiled")


def prefill_points(args, model, widths: list[str]) -> list[dict]:
    """Prefill of random prompts per width x batch x prompt length, three ways: ``all_logits`` (the
    LM head at every position, as the engine ran before it kept only the last), ``eager`` (what
    the engine runs) and ``compiled`` (the same compiled for that exact shape)."""
    points = []
    generator = torch.Generator().manual_seed(0)
    for width in widths:
        for batch in args.prefill_batches:
            for length in args.prompts:
                ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
                call = (model, ids, torch.ones_like(ids), width)
                compiled = torch.compile(prefill, dynamic=False)
                runs = {"all_logits": functools.partial(prefill, *call, 0), "eager": functools.partial(prefill, *call),
                        "compiled": functools.partial(compiled, *call)}
                reference = runs["eager"]()[0]
                started = time.perf_counter()
                diff = float((runs["compiled"]()[0] - reference).abs().max())
                compile_s = time.perf_counter() - started
                ms = median_ms(runs, max(20, args.repeats // 5))
                point = {"width": width, "batch": batch, "prompt": length, "compile_s": compile_s,
                         "max_abs_logit_diff": diff, **{f"{v}_ms": ms[v] for v in PREFILL_VARIANTS},
                         "eager_over_all_logits": ms["eager"] / ms["all_logits"],
                         "compiled_over_eager": ms["compiled"] / ms["eager"]}
                points.append(point)
                print(json.dumps(point), flush=True)
                torch._dynamo.reset()
    return points


def rewinding(fn, args: tuple):
    """``fn(*args)`` as a function to time, the KV cache among ``args`` rewound before every call."""
    cache = next(a for a in args if isinstance(a, StaticKVCache))
    length = cache.length

    def run():
        cache.rewind(length)
        return fn(*args)
    return run


def median_ms(runs: dict, repeats: int) -> dict:
    """Median ms of each callable, timed interleaved (:func:`benchmarks.harness.interleaved`)."""
    return {n: statistics.median(ts) * 1e3 for n, ts in interleaved(runs, repeats).items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Loaded outside inference mode, as the server loads it: a compiled step's guards check that its
    # parameters are ordinary tensors.
    ckpt = load_checkpoint(args.checkpoint)
    with torch.inference_mode():
        return measure(args, ckpt.model.eval(), ckpt.config)


def measure(args, model, config) -> int:
    widths = args.widths or [config.width_names[0], config.width_names[-1]]
    peaks = machine_peaks()
    started = time.perf_counter()
    # One width's two signatures serve every width: the FFN size is a symbol of the compiled step.
    engine = DecodeSteps(model, "require", max_batch=max(args.batches), cache_dir=args.compile_cache,
                         rows=[[widths[0]] * 2, [widths[0]]])
    engine_ready_s = time.perf_counter() - started
    points = []
    for width in widths:
        for batch in args.batches:
            inputs = step_inputs(model, [width] * batch, args.context)
            static = torch.compile(decode_logits, dynamic=False)
            frozen = torch.compile(decode_logits, dynamic=False, options={"freezing": True})
            runs = {"eager": rewinding(decode_logits, (model, *inputs)), "static": rewinding(static, (model, *inputs)),
                    "frozen": rewinding(frozen, (model, *inputs)), "engine": rewinding(engine, inputs)}
            reference = runs["eager"]()
            diffs, compile_s = {}, {}
            for variant in ("static", "frozen", "engine"):
                compile_started = time.perf_counter()
                diffs[variant] = float((runs[variant]() - reference).abs().max())
                compile_s[variant] = time.perf_counter() - compile_started
            ms = median_ms(runs, args.repeats)
            roof_ms = roofline_ms(step_flops(config, width, batch, args.context),
                                  sum(step_bytes(config, width, batch, args.context).values()), peaks)
            point = {"width": width, "batch": batch, "context": args.context, "first_call_s": compile_s,
                     "roofline_ms": roof_ms, "max_abs_logit_diff": diffs,
                     **{f"{v}_ms": ms[v] for v in VARIANTS},
                     **{f"{v}_efficiency": roof_ms / ms[v] for v in VARIANTS},
                     "engine_split": time_split(runs["engine"], args.repeats),
                     "eager_split": time_split(runs["eager"], args.repeats)}
            points.append(point)
            print(json.dumps(point), flush=True)
            torch._dynamo.reset()  # one static graph at a time, as a fresh process would have
    s, ta = widths[0], widths[-1]
    ratios = []
    for batch in args.batches:
        p = {w: next(x for x in points if x["width"] == w and x["batch"] == batch) for w in (s, ta)}
        ratios.append({"batch": batch, "roofline": p[ta]["roofline_ms"] / p[s]["roofline_ms"],
                       **{v: p[ta][f"{v}_ms"] / p[s][f"{v}_ms"] for v in VARIANTS}})
    results = {"checkpoint": str(args.checkpoint), "threads": args.threads, "torch": torch.__version__,
               "peaks": peaks, "engine_signatures_ready_s": engine_ready_s, "points": points, "ta_over_student": ratios,
               "eager_ops": eager_op_count(model, step_inputs(model, [s], args.context)),
               "prefill": prefill_points(args, model, widths)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({"ta_over_student": ratios, "eager_ops": results["eager_ops"]["aten_calls"]}, indent=1))
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"eager": "o-", "static": "^:", "frozen": "v-.", "engine": "s--"}
    for i, width in enumerate(dict.fromkeys(p["width"] for p in results["points"])):
        pts = [p for p in results["points"] if p["width"] == width]
        batches = [p["batch"] for p in pts]
        for v, style in styles.items():
            ax_t.plot(batches, [p[f"{v}_ms"] for p in pts], style, color=f"C{i}", label=f"{width} {v}")
            ax_e.plot(batches, [p[f"{v}_efficiency"] for p in pts], style, color=f"C{i}", label=f"{width} {v}")
    ax_t.set(xscale="log", xlabel="batch", ylabel="decode step (ms)", title="step time")
    ax_e.axhline(0.7, color="grey", linestyle=":", label="issue 20 target")
    ax_e.set(xscale="log", xlabel="batch", ylabel="roofline / measured", title="efficiency vs roofline")
    for ax in (ax_t, ax_e):
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"eager, per-shape compiled (static, frozen) and the engine's compiled step ({results['threads']} thread, "
                 f"context {results['points'][0]['context']})")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
