"""Does slicing cost anything? The elastic forward at width m against a dense model built at m.

Both models run the same code on the same weights (the dense one holds a copy of the first m
FFN units and nothing more), interleaved in one process, so the ratio isolates the cost of
serving a width as a view of a wider matrix. HF ``GPT2LMHeadModel`` at the same width runs in the
same loop as an outside reference. Medians over repeats; writes JSON + PNG.

    python -m benchmarks.slicing_overhead [--checkpoint checkpoints/default] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import save_png
from matta.checkpoint import load_checkpoint
from matta.config import ModelConfig
from matta.hf import gpt2_config, gpt2_state_dict
from matta.model import NestedGPT

RESULTS = Path(__file__).parent / "results"


def dense_copy(model: NestedGPT, width: str) -> NestedGPT:
    """A dense model of exactly ``width`` FFN units holding a copy of the elastic weights."""
    size = model.config.widths[width]
    config = ModelConfig(**{**model.config.to_dict(), "widths": {width: size}, "profiles": {}})
    dense = NestedGPT(config).eval()
    state = {k: (v[:size].clone() if k.endswith(("fc_weight", "fc_bias", "proj_weight")) else v.clone())
             for k, v in model.state_dict().items()}
    dense.load_state_dict(state)
    return dense


def hf_copy(model: NestedGPT, width: str):
    import transformers

    size = model.config.widths[width]
    hf = transformers.GPT2LMHeadModel(gpt2_config(model.config, size)).eval()
    hf.load_state_dict(gpt2_state_dict(model, size), strict=False)
    hf.tie_weights()
    return hf


def workloads(config: ModelConfig) -> dict[str, dict]:
    """Prefill of a batch of prompts, and one batched decode step against a filled cache."""
    gen = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, config.vocab_size, (8, 128), generator=gen)
    context = torch.randint(0, config.vocab_size, (16, 128), generator=gen)
    step = torch.randint(0, config.vocab_size, (16, 1), generator=gen)
    return {"prefill_8x128": {"ids": prefill}, "decode_16x1_ctx128": {"ids": step, "context": context}}


@torch.inference_mode()
def make_runner(kind: str, model, width: str | None, work: dict):
    """A zero-argument callable running one forward of ``work`` on ``model``."""
    ids = work["ids"]
    if kind == "hf":
        past = model(work["context"], use_cache=True).past_key_values if "context" in work else None

        def run():
            with torch.inference_mode():
                logits = model(ids, past_key_values=past, use_cache=past is not None).logits
            if past is not None:
                past.crop(-ids.shape[1])  # HF's cache grows in place; drop the step to keep the measured context
            return logits
        return run
    past = model(work["context"], width=width, use_cache=True).past_key_values if "context" in work else None

    def run():
        with torch.inference_mode():
            return model(ids, width=width, past_key_values=past).logits
    return run


def measure(runners: dict[str, callable], repeats: int, inner: int) -> dict[str, list[float]]:
    """Interleave the runners (rotating the order) so drift and noise hit them alike."""
    for run in runners.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(inner):
                runners[name]()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "slicing_overhead")
    args = parser.parse_args()
    if (args.checkpoint / "manifest.json").exists():
        model = load_checkpoint(args.checkpoint).model
        source = str(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = NestedGPT(ModelConfig()).eval()
        source = "random weights, default ModelConfig (no checkpoint found)"
    config = model.config
    results = {"checkpoint": source, "threads": torch.get_num_threads(), "repeats": args.repeats,
               "inner": args.inner, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "workloads": {}}
    for work_name, work in workloads(config).items():
        rows = {}
        for width in config.width_names:
            runners = {
                "elastic": make_runner("matta", model, width, work),
                "dense": make_runner("matta", dense_copy(model, width), None, work),
                "hf": make_runner("hf", hf_copy(model, width), None, work),
            }
            times = measure(runners, args.repeats, args.inner)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows[width] = {
                "ffn": config.widths[width],
                "median_ms": {k: v * 1e3 for k, v in med.items()},
                "elastic_over_dense": med["elastic"] / med["dense"],
                "elastic_over_hf": med["elastic"] / med["hf"],
                # Per-repeat ratios show the spread of the interleaved pairs.
                "ratio_p10_p90": _quantiles([e / d for e, d in zip(times["elastic"], times["dense"], strict=True)]),
            }
            print(f"{work_name:20s} {width:3s} elastic/dense={rows[width]['elastic_over_dense']:.3f} "
                  f"elastic/hf={rows[width]['elastic_over_hf']:.3f} "
                  f"({', '.join(f'{k} {v:.2f} ms' for k, v in rows[width]['median_ms'].items())})", flush=True)
        results["workloads"][work_name] = rows
    results["max_elastic_over_dense"] = max(r["elastic_over_dense"] for w in results["workloads"].values()
                                            for r in w.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"max elastic/dense ratio {results['max_elastic_over_dense']:.3f}; wrote {args.out}.json/.png")


def _quantiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=10)
    return [q[0], q[-1]]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads_ = results["workloads"]
    fig, axes = plt.subplots(1, len(workloads_), figsize=(5.5 * len(workloads_), 4))
    for ax, (name, rows) in zip(axes, workloads_.items(), strict=True):
        widths = list(rows)
        x = range(len(widths))
        for offset, kind, color in ((-0.25, "elastic", "tab:blue"), (0.0, "dense", "tab:orange"), (0.25, "hf", "tab:gray")):
            ax.bar([i + offset for i in x], [rows[w]["median_ms"][kind] for w in widths], width=0.25, label=kind,
                   color=color)
        for i, w in enumerate(widths):
            ax.annotate(f"{rows[w]['elastic_over_dense']:.2f}x", (i - 0.25, rows[w]["median_ms"]["elastic"]),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [f"{w}\n(ffn {rows[w]['ffn']})" for w in widths])
        ax.set(title=name, ylabel="median ms per forward")
        ax.legend()
    fig.suptitle("elastic width vs dense model at that width (label: elastic/dense)")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
