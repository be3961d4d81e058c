"""`matta serve` against vLLM's CPU build on the same export, with the same client, in one run.

For each model shape and width, vLLM serves the width exported as a plain HF GPT-2 directory
(``matta export``; ``deploy/vllm/launch.py`` flags: float32, eager, ``--threads`` OpenMP threads)
and `matta serve` serves the elastic checkpoint it came from, the width pinned by its model id
(``--threads`` torch threads; the engine core in its own process, as vLLM's is), with eager decode
steps (``matta``) and with compiled ones (``matta-compiled``: ``--compile require``, every step
signature compiled or loaded from the compile cache before serving). One closed-loop
client (:func:`benchmarks.harness.saturate`: async httpx, token-id prompts, greedy, fixed
``max_tokens``) drives each at 1 and 16 concurrent clients; throughput counts the completion tokens
each server reports. Both answer the same prompts greedily, so they generate the same tokens.
Around each matta measurement the engine's scheduler seconds per phase
(``matta_engine_busy_seconds_total``) give the share of wall time it spent prefilling, decoding and
swapping in compiled steps: the prefill share bounds what compiling prefill too could buy.

Shapes:
  shipped     checkpoints/default (d_model 128, 4 layers, 2048-token vocabulary);
  gpt2-small  GPT-2 small's shape (d_model 768, 12 layers, 12 heads of 64, FFN 3072 with nested
              widths 384/768/1536/3072), random weights, the shipped tokenizer: what a user who
              elastifies their own GPT-2 serves (`matta elastify`), at a realistic size;
  smollm-135m SmolLM-135M's shape as a nested Llama (d_model 576, 30 layers, 9 query heads of 64 on 3
              key/value heads, SwiGLU FFN 1536 with widths 192/384/768/1536), random weights, the
              shipped tokenizer; vLLM serves the width exported as a plain HF LlamaForCausalLM.

Ratios are matta/vLLM and compiled/eager per shape, width and client count, from the same run; the
servers alternate (`--rounds`) and the medians are reported. The client shares the 2 cores with the
server.

    python -m benchmarks.vs_vllm [--shapes shipped gpt2-small smollm-135m] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.harness import SHAPE_BUILDERS, VLLM_VENV, Server, VLLMServer, make_prompts, metric, saturate
from matta.checkpoint import load_checkpoint, save_checkpoint
from matta.hf import export_width
from serving.messages import BUSY_PHASES

RESULTS = Path(__file__).parent / "results"
SHAPES = ("shipped", "gpt2-small", "smollm-135m")
SYSTEMS = ("matta", "matta-compiled", "vllm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"), help="the shipped shape")
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--widths", nargs="+", help="widths to serve (default: the Student and the TA)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seconds", type=float, default=15.0, help="closed-loop seconds per measurement")
    p.add_argument("--rounds", type=int, default=1, help="matta/vLLM alternations (order swapped each round)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of matta, OpenMP threads of vLLM")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--compile-cache", type=Path, help="matta-compiled's cache (default ~/.cache/matta/compile)")
    p.add_argument("--out", type=Path, default=RESULTS / "vs_vllm")
    return p.parse_args(argv)


def shape_checkpoint(label: str, shipped: Path, work: Path) -> Path:
    """The checkpoint directory of a shape (the random-weight ones are written to ``work``)."""
    if label == "shipped":
        return shipped
    base = load_checkpoint(shipped)
    model = SHAPE_BUILDERS[label](base.config.vocab_size, base.config.eos_token_id)
    return save_checkpoint(work / label, model, base.tokenizer, {"source": f"random weights, {label}'s shape"})


def measure(url: str, model: str, prompts: list[list[int]], args, engine: bool = False) -> dict:
    """Tokens/s at each client count, after a short warm-up; with ``engine`` (a matta server) also
    the share of the measurement's wall time its engine spent per phase (prefill, decode, swap_in)."""
    asyncio.run(saturate(url, model, prompts, args.max_tokens, max(args.clients), 3.0))
    results = {}
    for c in args.clients:
        before, started = engine_busy_s(url) if engine else {}, time.monotonic()
        results[str(c)] = asyncio.run(saturate(url, model, prompts, args.max_tokens, c, args.seconds))
        if engine:
            elapsed, after = time.monotonic() - started, engine_busy_s(url)
            results[str(c)]["engine_busy_share"] = {p: (after[p] - before[p]) / elapsed for p in after}
    return results


def engine_busy_s(url: str) -> dict[str, float]:
    """The engine's scheduler seconds per phase so far (matta_engine_busy_seconds_total)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {phase: metric(text, "matta_engine_busy_seconds_total", phase=phase) for phase in BUSY_PHASES}


def run_shape(label: str, args, work: Path) -> dict:
    path = shape_checkpoint(label, args.checkpoint, work)
    ckpt = load_checkpoint(path)
    widths = args.widths or [ckpt.config.width_names[0], ckpt.config.width_names[-1]]
    prompts, prompt_info = make_prompts(ckpt, widths, args.prompt_tokens, args.max_tokens)
    context = args.prompt_tokens + args.max_tokens + 8
    runs: dict[str, dict[str, dict[str, list[dict]]]] = {system: {w: {} for w in widths} for system in args.systems}
    vllm_start_s, matta_start_s = [], {}
    for r in range(args.rounds):
        for system in (args.systems if r % 2 == 0 else args.systems[::-1]):
            if system.startswith("matta"):
                compiled = system == "matta-compiled"
                cache = ("--compile-cache", str(args.compile_cache)) if compiled and args.compile_cache else ()
                server = Server(path, args.threads, max(args.clients), work / f"{system}-{label}-{r}.log",
                                ("--policy", f"fixed:{widths[-1]}", *cache), compile="require" if compiled else "off")
                started = time.monotonic()
                url = server.start(timeout_s=3600)
                matta_start_s.setdefault(system, []).append(time.monotonic() - started)
                try:
                    for w in widths:
                        for c, out in measure(url, f"{ckpt.config.name}:{w}", prompts, args, engine=True).items():
                            runs[system][w].setdefault(c, []).append(out)
                            busy = " ".join(f"{p} {s:.0%}" for p, s in out["engine_busy_share"].items())
                            print(f"{label} round {r} {system} {w} {c} clients: {out['tokens_per_s']:.0f} tok/s "
                                  f"(engine busy: {busy})", flush=True)
                finally:
                    server.stop()
                continue
            for w in widths:
                export = export_width(ckpt, w, work / f"export-{label}-{w}")
                # A KV cache for every client's whole context, and the context no longer than used.
                kv_bytes = (2 * ckpt.config.n_layer * ckpt.config.d_model * 4) * context * max(args.clients) * 2
                server = VLLMServer(export, f"{ckpt.config.name}:{w}", work / f"vllm-{label}-{w}-{r}.log",
                                    threads=args.threads,
                                    extra_args=("--max-model-len", str(context), "--kv-cache-memory-bytes",
                                                str(max(kv_bytes, 64 * 2**20))))
                url = server.start()
                vllm_start_s.append(server.start_s)
                try:
                    for c, out in measure(url, f"{ckpt.config.name}:{w}", prompts, args).items():
                        runs["vllm"][w].setdefault(c, []).append(out)
                        print(f"{label} round {r} vllm  {w} {c} clients: {out['tokens_per_s']:.0f} tok/s", flush=True)
                finally:
                    server.stop()
    medians = {system: {w: {c: statistics.median(o["tokens_per_s"] for o in outs) for c, outs in per_c.items()}
                        for w, per_c in per_w.items()} for system, per_w in runs.items()}
    return {"checkpoint": str(path), "model": {"d_model": ckpt.config.d_model, "n_layer": ckpt.config.n_layer,
                                               "n_head": ckpt.config.n_head, "widths": ckpt.config.widths},
            "widths": widths, "prompts": prompt_info, "runs": runs, "tokens_per_s": medians,
            "matta_over_vllm": {system: {w: {c: medians[system][w][c] / medians["vllm"][w][c]
                                             for c in medians[system][w]} for w in widths}
                                for system in medians if system != "vllm" and "vllm" in medians},
            "compiled_over_eager": {w: {c: medians["matta-compiled"][w][c] / medians["matta"][w][c]
                                        for c in medians["matta"][w]} for w in widths}
            if {"matta", "matta-compiled"} <= set(medians) else {},
            "matta_start_s": matta_start_s,
            # Median share of wall time the engine spent per phase: what compiling that phase could buy.
            "engine_busy_share": {system: {w: {c: {p: statistics.median(o["engine_busy_share"][p] for o in outs)
                                                    for p in BUSY_PHASES} for c, outs in per_c.items()}
                                           for w, per_c in runs[system].items()}
                                  for system in runs if system.startswith("matta")},
            "student_over_ta": {system: {c: medians[system][widths[0]][c] / medians[system][widths[-1]][c]
                                         for c in medians[system][widths[0]]} for system in medians},
            "vllm_start_s": vllm_start_s}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = results["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(8, 6 * len(shapes)), 4.5), squeeze=False)
    for ax, (label, shape) in zip(axes[0], shapes.items(), strict=True):
        systems = list(shape["tokens_per_s"])
        first = shape["tokens_per_s"][systems[0]]
        keys = [(w, c) for w in shape["widths"] for c in first[w]]
        bar = 0.8 / len(systems)
        names = {"matta": "matta serve (eager)", "matta-compiled": "matta serve (compiled)", "vllm": "vLLM (CPU build)"}
        for k, system in enumerate(systems):
            values = [shape["tokens_per_s"][system][w][c] for w, c in keys]
            xs = [i - 0.4 + bar * (k + 0.5) for i in range(len(keys))]
            ax.bar(xs, values, width=bar, label=names[system])
            if system in shape["matta_over_vllm"]:
                for x, v, (w, c) in zip(xs, values, keys, strict=True):
                    ax.text(x, v, f"{shape['matta_over_vllm'][system][w][c]:.2f}x", ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(range(len(keys)), [f"{w}\n{c} client{'s' * (c != '1')}" for w, c in keys])
        ax.set(ylabel="completion tokens/s", title=f"{label}: d_model {shape['model']['d_model']}, "
                                                     f"{shape['model']['n_layer']} layers")
        ax.legend(fontsize=8)
    fig.suptitle(f"matta serve vs vLLM on the same export ({results['threads']} thread each; "
                 f"2 cores shared with the client; labels: / vLLM)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (VLLM_VENV / "bin" / "vllm").is_file():
        raise SystemExit(f"no vLLM in {VLLM_VENV}: create it with deploy/vllm/setup_venv.sh")
    work = Path(tempfile.mkdtemp(prefix="vs_vllm_"))
    results = {"threads": args.threads, "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
               "seconds": args.seconds, "rounds": args.rounds, "shapes": {}}
    for label in args.shapes:
        results["shapes"][label] = run_shape(label, args, work)
        print(json.dumps({label: results["shapes"][label]["matta_over_vllm"]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({k: v["matta_over_vllm"] for k, v in results["shapes"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
