"""bfloat16 against float32: what ``--dtype bfloat16`` costs in quality and buys in decode speed, one run.

Quality, per shipped checkpoint (``checkpoints/default``, ``checkpoints/llama``) and width: test
perplexity on the held-out plays (the checkpoint's own data split, ``--eval-windows`` windows of
its context) with the weights in float32 and in bfloat16, and greedy agreement: ``--prompts``
prompts from the test split, ``--max-tokens`` greedy tokens each at both dtypes, the share of
tokens generated before the first difference and the share of continuations identical throughout.

Speed, per shape (the shipped checkpoint; GPT-2 small's and SmolLM-135M's shapes with random
weights), width (Student, TA) and batch: the engine's eager decode step against a ``--context``
token cache, float32 and bfloat16 models timed in rotating order (``benchmarks.harness.interleaved``),
median step time, and the bf16 speed-up over float32 beside the bytes a step reads at each dtype.

    python -m benchmarks.dtype [--threads 1] [--shapes shipped gpt2-small smollm-135m]

Writes ``benchmarks/results/dtype.json`` and ``.png``; run it on an otherwise idle machine for the
speed part (the quality part does not depend on load).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import matplotlib
import torch

from benchmarks.harness import SHAPE_BUILDERS, greedy_batch, interleaved, save_png, step_bytes
from matta.checkpoint import load_checkpoint
from matta.kv_cache import StaticKVCache
from serving.worker.compiled import decode_logits
from training.data import TokenData
from training.evaluate import perplexity, width_logits_fn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
CHECKPOINTS = {"default": Path("checkpoints/default"), "llama": Path("checkpoints/llama")}


def quality(path: Path, args: argparse.Namespace) -> dict:
    """Test perplexity per width at both dtypes, and greedy agreement of bf16 with fp32."""
    fp32 = load_checkpoint(path)
    bf16 = load_checkpoint(path, dtype="bfloat16")
    data = TokenData(fp32.training["data"]["path"])
    if data.tokenizer().backend.get_vocab() != fp32.tokenizer.backend.get_vocab():
        raise ValueError(f"{path}: its data directory was tokenized with another tokenizer")
    tokens = data.tokens("test")
    window = fp32.config.n_ctx
    step = max(1, len(tokens) // (args.prompts + 1))
    prompts = [tokens[i * step : i * step + args.prompt_tokens].tolist() for i in range(args.prompts)]
    out = {"eval_tokens": min(args.eval_windows, (len(tokens) - 1) // window) * window, "widths": {}}
    for width in fp32.config.width_names:
        ppl = {name: perplexity(width_logits_fn(ckpt.model, width), tokens, window, max_windows=args.eval_windows)
               for name, ckpt in (("float32", fp32), ("bfloat16", bf16))}
        with torch.inference_mode():
            a = greedy_batch(fp32.model, prompts, width, args.max_tokens)
            b = greedy_batch(bf16.model, prompts, width, args.max_tokens)
        prefix = [next((i for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y), len(ra))
                  for ra, rb in zip(a, b, strict=True)]
        out["widths"][width] = {"ppl_float32": round(ppl["float32"], 3), "ppl_bfloat16": round(ppl["bfloat16"], 3),
                                "ppl_ratio": round(ppl["bfloat16"] / ppl["float32"], 4),
                                "greedy_tokens_before_first_difference": round(sum(prefix) / (len(a) * args.max_tokens), 3),
                                "greedy_identical": round(sum(p == args.max_tokens for p in prefix) / len(a), 3)}
        print(f"{path.name} {width}: ppl {ppl['float32']:.2f} -> {ppl['bfloat16']:.2f} "
              f"(x{ppl['bfloat16'] / ppl['float32']:.4f}), greedy identical {out['widths'][width]['greedy_identical']:.2f}",
              flush=True)
    return out


def speed(model, label: str, args: argparse.Namespace) -> dict:
    """Eager decode step, fp32 vs bf16, interleaved, per batch and width (Student, TA)."""
    models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    widths = [model.config.width_names[0], model.config.width_names[-1]]
    gen = torch.Generator().manual_seed(0)
    points = []
    context = min(args.context, model.config.n_ctx - 1)
    for batch in args.batches:
        ctx = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen)
        ids = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen)
        mask = torch.ones(batch, context + 1, dtype=torch.long)
        runs = {}
        for name, m in models.items():
            for w in widths:
                with torch.inference_mode():
                    cache = StaticKVCache.from_list(m(ctx, width=w, use_cache=True).past_key_values, context + 1)
                plans = model.config.resolve_width(w)

                def run(m=m, cache=cache, plans=plans, ids=ids, mask=mask, context=context) -> None:
                    with torch.inference_mode():
                        cache.rewind(context)
                        decode_logits(m, ids, mask, cache, plans)

                runs[name, w] = run
        times = interleaved(runs, args.repeats * 3, args.inner)
        point = {"batch": batch, "widths": {}}
        for w in widths:
            ms = {name: 1000 * statistics.median(times[name, w]) for name in models}
            nbytes = sum(step_bytes(model.config, w, batch, context).values())  # at 4 bytes a value
            point["widths"][w] = {"float32_ms": round(ms["float32"], 3), "bfloat16_ms": round(ms["bfloat16"], 3),
                                  "speedup": round(ms["float32"] / ms["bfloat16"], 3),
                                  "float32_mb_read": round(nbytes / 1e6, 2), "bfloat16_mb_read": round(nbytes / 2e6, 2)}
        points.append(point)
        print(f"{label} batch {batch}: " + "  ".join(
            f"{w} {p['float32_ms']:.2f} -> {p['bfloat16_ms']:.2f} ms (x{p['speedup']:.2f})"
            for w, p in point["widths"].items()), flush=True)
    return {"model": {"d_model": model.config.d_model, "n_layer": model.config.n_layer,
                      "widths": dict(model.config.widths)}, "context": context, "points": points}


def plot(results: dict, path: Path) -> None:
    fig, (ax_q, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    labels, ratios = [], []
    for name, q in results["quality"].items():
        for w, row in q["widths"].items():
            labels.append(f"{name}:{w}")
            ratios.append(100 * (row["ppl_ratio"] - 1))
    ax_q.bar(labels, ratios, color="tab:purple")
    ax_q.axhline(1, color="k", ls="--", lw=1, label="+1% (target bound)")
    ax_q.axhline(-1, color="k", ls="--", lw=1)
    ax_q.set_ylabel("bf16 test ppl vs fp32 (%)")
    ax_q.set_title("quality cost of bfloat16")
    ax_q.tick_params(axis="x", rotation=60, labelsize=7)
    ax_q.legend(fontsize=8)
    x = 0
    ticks, names = [], []
    for label, s in results["speed"].items():
        for point in s["points"]:
            for k, row in enumerate(point["widths"].values()):
                ax_s.bar(x + 0.4 * k, row["speedup"], 0.4, color=("tab:blue", "tab:orange")[k],
                         label=("Student", "TA")[k] if x == 0 else None)
            ticks.append(x + 0.2)
            names.append(f"{label}\nB={point['batch']}")
            x += 1
    ax_s.axhline(1, color="k", lw=1)
    ax_s.set_xticks(ticks, names, fontsize=7)
    ax_s.set_ylabel("decode step speed-up, bf16 over fp32")
    ax_s.set_title(f"eager decode step, context {'/'.join(str(s['context']) for s in results['speed'].values())}")
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", choices=list(CHECKPOINTS), default=list(CHECKPOINTS))
    p.add_argument("--eval-windows", type=int, default=200, help="test windows (of n_ctx tokens) per perplexity")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--shapes", nargs="+", choices=["shipped", *SHAPE_BUILDERS], default=["shipped", *SHAPE_BUILDERS])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", choices=["quality", "speed"], help="leave one part out")
    p.add_argument("--out", type=Path, default=RESULTS / "dtype")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": args.threads,
                     "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "quality": {}, "speed": {}}
    if args.skip != "quality":
        for name in args.checkpoints:
            results["quality"][name] = quality(CHECKPOINTS[name], args)
    if args.skip != "speed":
        shipped = load_checkpoint(CHECKPOINTS["default"])
        for label in args.shapes:
            model = shipped.model if label == "shipped" else SHAPE_BUILDERS[label](
                shipped.config.vocab_size, shipped.config.eos_token_id)
            results["speed"][label] = speed(model, label, args)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    if results["quality"] and results["speed"]:
        plot(results, args.out.with_suffix(".png"))
    worst = max((abs(r["ppl_ratio"] - 1) for q in results["quality"].values() for r in q["widths"].values()),
                default=float("nan"))
    print(f"worst ppl change {100 * worst:.2f}%; speed-ups " + ", ".join(
        f"{label} B={pt['batch']} {w} x{row['speedup']:.2f}" for label, s in results["speed"].items()
        for pt in s["points"] for w, row in pt["widths"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
