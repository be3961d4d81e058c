"""Chunked prefill: running answers' inter-token latency while long prompts arrive, chunked vs unchunked.

Real `matta serve` processes of the shipped checkpoint (engine core in its own process, one torch
thread, eager steps), one per ``--max-num-batched-tokens`` value (0 = unchunked), in one run, on
the same load, the servers taking turns round after round:

- 8 **running** answers (16-token prompts, ``--running-tokens`` each, all at ``ta``) start together;
- while they decode, ``--long`` **long prompts** (``--long-tokens`` random tokens, within the
  checkpoint's 256-token context window, 16 tokens each, at ``ta``) arrive every ``--long-every`` s.

Reported per budget: ITL p50 / p99 / max of the running answers (every gap between two of their
streamed tokens), TTFT p50 / p99 of the long prompts, and each as a ratio to the unchunked server's.

    python -m benchmarks.chunked_prefill [--budgets 0,64,128] [--rounds 3] [--out benchmarks/results/chunked_prefill]

Writes ``<out>.json`` and ``<out>.png``. The load generator shares the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
from pathlib import Path

from benchmarks.client import Request, RequestOutput, run_open_loop
from benchmarks.harness import REPO, Server, save_png
from matta.checkpoint import load_checkpoint

RESULTS = REPO / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "default")
    p.add_argument("--budgets", default="0,64,128", help="--max-num-batched-tokens values; 0 (unchunked) first")
    p.add_argument("--rounds", type=int, default=3, help="runs of the load per server, servers taking turns")
    p.add_argument("--running", type=int, default=8, help="answers decoding while the long prompts arrive")
    p.add_argument("--running-tokens", type=int, default=200, help="tokens each running answer generates")
    p.add_argument("--long", type=int, default=12, help="long prompts per run")
    p.add_argument("--long-tokens", type=int, default=224, help="tokens of each long prompt")
    p.add_argument("--long-every", type=float, default=0.12, help="seconds between long prompts")
    p.add_argument("--out", type=Path, default=RESULTS / "chunked_prefill")
    return p.parse_args(argv)


def load(args, name: str, vocab_size: int, n_ctx: int, seed: int) -> list[Request]:
    """The running answers at 0 s, then the long prompts, one every ``long_every`` from 0.3 s."""
    if args.long_tokens + 16 > n_ctx or 16 + args.running_tokens > n_ctx:
        raise SystemExit(f"prompts and answers must fit the context window ({n_ctx} tokens)")
    rng = random.Random(seed)
    text = list(range(1, 17))
    running = [Request([rng.randrange(1, vocab_size) for _ in text], args.running_tokens, 0.0, f"{name}:ta")
               for _ in range(args.running)]
    long = [Request([rng.randrange(1, vocab_size) for _ in range(args.long_tokens)], 16,
                    0.3 + i * args.long_every, f"{name}:ta") for i in range(args.long)]
    return running + long


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summarise(runs: list[tuple[list[RequestOutput], int]]) -> dict:
    """ITL of the running answers and TTFT of the long prompts over every run."""
    itl, ttft, failed = [], [], 0
    for outputs, running in runs:
        failed += sum(not o.success for o in outputs)
        for o in outputs[:running]:
            itl += o.itl_s
        ttft += [o.ttft_s for o in outputs[running:] if o.ttft_s is not None]
    ms = 1000
    return {"itl_p50_ms": ms * statistics.median(itl), "itl_p99_ms": ms * percentile(itl, 99),
            "itl_max_ms": ms * max(itl), "ttft_p50_ms": ms * statistics.median(ttft),
            "ttft_p99_ms": ms * percentile(ttft, 99), "itl_samples": len(itl), "ttft_samples": len(ttft),
            "failed": failed}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(report["results"])
    labels = ["unchunked" if b == "0" else f"{b} tokens" for b in budgets]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys, title in ((axes[0], ("itl_p50_ms", "itl_p99_ms"), "running answers' ITL (ms)"),
                            (axes[1], ("ttft_p50_ms", "ttft_p99_ms"), "long prompts' TTFT (ms)")):
        for i, key in enumerate(keys):
            values = [report["results"][b][key] for b in budgets]
            bars = ax.bar([x + 0.38 * i for x in range(len(budgets))], values, 0.38, label=key.split("_")[1])
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks([x + 0.19 for x in range(len(budgets))], labels)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"chunked prefill: {report['load']['running']} answers decoding, {report['load']['long']} prompts "
                 f"of {report['load']['long_tokens']} tokens arriving ({report['load']['rounds']} rounds)")
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    config = load_checkpoint(args.checkpoint, weights=False).config
    runs: dict[int, list] = {b: [] for b in budgets}
    with tempfile.TemporaryDirectory(prefix="matta-chunked-") as tmp:
        servers = {b: Server(args.checkpoint, threads=1, max_batch=32, log_path=Path(tmp) / f"serve-{b}.log",
                             extra_args=("--max-num-batched-tokens", str(b))) for b in budgets}
        try:
            urls = {b: s.start() for b, s in servers.items()}
            for round_ in range(args.rounds + 1):  # round 0 warms every server up and is not counted
                for b in budgets:
                    requests = load(args, config.name, config.vocab_size, config.n_ctx, seed=round_)
                    outputs, _ = asyncio.run(run_open_loop(urls[b], requests))
                    if round_:
                        runs[b].append((outputs, args.running))
        finally:
            for server in servers.values():
                server.stop()
    results = {str(b): summarise(runs[b]) for b in budgets}
    base = results[str(budgets[0])]
    for b in budgets[1:]:
        r = results[str(b)]
        r["vs_unchunked"] = {k: r[k] / base[k] for k in ("itl_p50_ms", "itl_p99_ms", "itl_max_ms", "ttft_p50_ms",
                                                         "ttft_p99_ms")}
    report = {"load": {"checkpoint": str(args.checkpoint.relative_to(REPO)) if args.checkpoint.is_relative_to(REPO)
                       else str(args.checkpoint), "running": args.running, "running_tokens": args.running_tokens,
                       "long": args.long, "long_tokens": args.long_tokens, "long_every_s": args.long_every,
                       "rounds": args.rounds, "width": "ta", "threads": 1, "compile": "off", "max_batch": 32},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
