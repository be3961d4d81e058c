"""What a width change mid-generation costs: continuations scored on a KV cache built at another width.

Only the FFN is nested, so the cache a sequence built at one width has exactly the shape every
other width reads; a running sequence can continue at another width with no recompute. This
measures what that costs in quality, on each shipped checkpoint (``--checkpoints``):

1. **Scored continuations.** Windows of held-out text (the test split of ``--data`` when it is
   prepared, else the harness's built-in Shakespeare), ``--window`` tokens each. A *width
   schedule* runs positions [0, k) at width A (their keys and values fill the cache) and
   positions [k, T) at width B on that same cache: one forward per segment, each continuing the
   previous one's cache, which is what a decode loop with that schedule computes (the test
   ``tests/test_width_changes.py`` checks the engine does exactly that). Scored: the next-token
   perplexity of positions [k, T), against pure A and pure B on the same positions (paired: the
   same tokens). Schedules: ``ta->s`` and ``s->ta`` at several k, ``ta->m->ta`` (an excursion of
   ``--excursion`` tokens at ``m``, then back), and every ordered pair of widths at k = T/2.
2. **Greedy agreement.** On the same windows, how often the schedule's greedy next token (its
   argmax) is pure B's, at the positions after the switch (``top1_agree_*``; the figure's third
   panel). And free-running: greedy continuations of ``--gen-tokens`` tokens from
   ``--prompt-tokens`` prompts, the width switched at generated token k: the share of tokens after
   the switch equal to pure A's and pure B's at the same position, and how many match before the
   first that differs (``greedy``).

The cost of a switch A->B is ppl(A->B) / ppl(pure B) - 1 on the positions after it: what the
sequence loses against having run at B all along.

    python -m benchmarks.width_switch [--windows 256] [--out benchmarks/results/width_switch]

Writes ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from itertools import permutations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import REPO, TEXT
from matta.checkpoint import load_checkpoint
from matta.model import NestedDecoder

RESULTS = REPO / "benchmarks" / "results"
Schedule = list[tuple[str, int]]
"""A width schedule: (width, first position at it), ascending; the first entry starts at 0."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", default="checkpoints/default,checkpoints/llama")
    p.add_argument("--data", type=Path, default=REPO / "data" / "shakespeare",
                   help="a prepared data directory (`matta data prepare`); its test split is scored")
    p.add_argument("--windows", type=int, default=128, help="windows of held-out text scored per schedule")
    p.add_argument("--window", type=int, default=128, help="tokens per window")
    p.add_argument("--switch-at", default="8,16,32,64,96", help="positions k at which the width switches")
    p.add_argument("--excursion", type=int, default=16, help="tokens at m in ta->m->ta")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=64, help="prompts for greedy agreement")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS / "width_switch")
    return p.parse_args(argv)


def held_out_tokens(ckpt, data: Path) -> tuple[np.ndarray, str]:
    """The test split when ``data`` is prepared with this checkpoint's tokenizer, else the built-in text."""
    if (data / "test.npy").is_file() and (data / "tokenizer.json").read_bytes() == (
            ckpt.path / "tokenizer.json").read_bytes():
        return np.load(data / "test.npy", allow_pickle=False).astype(np.int64), f"{data.name} test split"
    return np.asarray(ckpt.tokenizer.encode(" ".join(TEXT.split())), dtype=np.int64), "benchmarks.harness.TEXT"


def windows(tokens: np.ndarray, n: int, length: int) -> torch.Tensor:
    """``n`` windows of ``length + 1`` tokens spread evenly over ``tokens`` (overlapping when it is short)."""
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(int)
    return torch.from_numpy(np.stack([tokens[s:s + length + 1] for s in starts]))


@torch.inference_mode()
def scheduled_logits(model: NestedDecoder, ids: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Logits (B, T, V) of ``ids`` (B, T) run segment by segment, each segment at its width on the
    cache the earlier segments built."""
    bounds = [start for _, start in schedule[1:]] + [ids.shape[1]]
    past, logits = None, []
    for (width, start), end in zip(schedule, bounds, strict=True):
        if end <= start:
            continue
        out = model(ids[:, start:end], width=width, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


Scored = tuple[np.ndarray, np.ndarray]
"""Per window and position (windows, T): the next token's NLL and the greedy (argmax) next token."""


def score(model: NestedDecoder, data: torch.Tensor, schedule: Schedule, batch: int) -> Scored:
    """Every position of every window under ``schedule``: next-token NLL and greedy prediction."""
    nll, top1 = [], []
    for lo in range(0, len(data), batch):
        chunk = data[lo:lo + batch]
        logits = scheduled_logits(model, chunk[:, :-1], schedule).float()
        nll.append(F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none").numpy())
        top1.append(logits.argmax(-1).numpy())
    return np.concatenate(nll), np.concatenate(top1)


def compare(scored: Scored, references: dict[str, Scored], first: int) -> dict:
    """Perplexity of the positions from ``first`` on, the paired cost against each reference (with a
    95% interval over windows), and how often its greedy next token is the reference's."""
    nll, top1 = scored
    per_window = nll[:, first:].mean(axis=1)  # mean NLL per window
    out = {"ppl": math.exp(per_window.mean())}
    for name, (ref, ref_top1) in references.items():
        ref_scored = ref[:, first:].mean(axis=1)
        diff = per_window - ref_scored
        half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
        out[f"ppl_{name}"] = math.exp(ref_scored.mean())
        out[f"cost_vs_{name}"] = out["ppl"] / out[f"ppl_{name}"] - 1
        out[f"cost_vs_{name}_ci95"] = [math.exp(diff.mean() - half) - 1, math.exp(diff.mean() + half) - 1]
        out[f"top1_agree_{name}"] = float((top1[:, first:] == ref_top1[:, first:]).mean())
    return out


@torch.inference_mode()
def greedy(model: NestedDecoder, prompts: torch.Tensor, schedule: Schedule, tokens: int) -> torch.Tensor:
    """Greedy continuations (B, tokens) of equal-length ``prompts``; ``schedule`` positions count
    generated tokens (the prompt runs at the first width; generated token j is fed at schedule(j))."""
    def width_at(j: int) -> str:
        return [w for w, start in schedule if start <= j][-1]

    out = model(prompts, width=schedule[0][0], use_cache=True)
    generated = []
    for j in range(tokens):
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(next_ids)
        if j + 1 < tokens:
            out = model(next_ids, width=width_at(j + 1), past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(generated, dim=1)


def agreement(switched: torch.Tensor, pure: torch.Tensor, first: int) -> float:
    """Share of tokens from ``first`` on equal to the pure run's at the same position."""
    return float((switched[:, first:] == pure[:, first:]).float().mean())


def same_run(switched: torch.Tensor, pure: torch.Tensor, first: int) -> float:
    """Mean number of tokens from ``first`` on equal to the pure run's before the first that differs."""
    equal = (switched[:, first:] == pure[:, first:]).int()
    return float(equal.cumprod(dim=1).sum(dim=1).float().mean())


def measure(ckpt, args) -> dict:
    model = ckpt.model.eval()
    tokens, source = held_out_tokens(ckpt, args.data)
    data = windows(tokens, args.windows, args.window)
    ks = [int(k) for k in args.switch_at.split(",")]
    pure = {w: score(model, data, [(w, 0)], args.batch) for w in ckpt.config.widths}
    ex = args.excursion
    out: dict = {"source": source, "windows": len(data), "window_tokens": args.window, "by_k": {}}
    for k in ks:
        down = score(model, data, [("ta", 0), ("s", k)], args.batch)
        up = score(model, data, [("s", 0), ("ta", k)], args.batch)
        trip = score(model, data, [("ta", 0), ("m", k), ("ta", k + ex)], args.batch)
        out["by_k"][k] = {
            "ta->s": compare(down, {"s": pure["s"], "ta": pure["ta"]}, k),
            "s->ta": compare(up, {"ta": pure["ta"], "s": pure["s"]}, k),
            f"ta->m({ex})->ta": compare(trip, {"ta": pure["ta"]}, k),
            f"ta->m({ex})->ta after return": compare(trip, {"ta": pure["ta"]}, min(k + ex, args.window - 1)),
        }
    half = args.window // 2
    out["pairs_at_half"] = {f"{a}->{b}": compare(score(model, data, [(a, 0), (b, half)], args.batch),
                                                 {b: pure[b]}, half)
                            for a, b in permutations(ckpt.config.widths, 2)}
    prompts = data[: args.prompts, : args.prompt_tokens]
    pure_greedy = {w: greedy(model, prompts, [(w, 0)], args.gen_tokens) for w in ("s", "ta")}
    out["greedy"] = {}
    for k in (k for k in ks if k < args.gen_tokens):
        row = {}
        for a, b in (("ta", "s"), ("s", "ta")):
            switched = greedy(model, prompts, [(a, 0), (b, k)], args.gen_tokens)
            row[f"{a}->{b}"] = {**{f"agree_{w}": agreement(switched, pure_greedy[w], k) for w in (a, b)},
                                **{f"same_run_{w}": same_run(switched, pure_greedy[w], k) for w in (a, b)}}
        switched = greedy(model, prompts, [("ta", 0), ("m", k), ("ta", k + ex)], args.gen_tokens)
        row[f"ta->m({ex})->ta"] = {"agree_ta": agreement(switched, pure_greedy["ta"], k),
                                   "same_run_ta": same_run(switched, pure_greedy["ta"], k)}
        out["greedy"][k] = row
    out["greedy_pure_s_vs_ta"] = agreement(pure_greedy["s"], pure_greedy["ta"], 0)
    out["top1_pure_s_vs_ta"] = compare(pure["s"], {"ta": pure["ta"]}, 0)["top1_agree_ta"]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["checkpoints"])
    fig, axes = plt.subplots(len(names), 3, figsize=(15, 4 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        r = results["checkpoints"][name]
        ks = [int(k) for k in r["by_k"]]
        by_k = list(r["by_k"].values())
        ax = row[0]
        ax.plot(ks, [b["ta->s"]["ppl"] for b in by_k], "o-", color="tab:orange", label="ta->s at k")
        ax.plot(ks, [b["ta->s"]["ppl_s"] for b in by_k], "--", color="tab:orange", label="pure s")
        ax.plot(ks, [b["s->ta"]["ppl"] for b in by_k], "o-", color="tab:blue", label="s->ta at k")
        ax.plot(ks, [b["s->ta"]["ppl_ta"] for b in by_k], "--", color="tab:blue", label="pure ta")
        exc = next(key for key in by_k[0] if key.startswith("ta->m") and "after" not in key)
        ax.plot(ks, [b[exc]["ppl"] for b in by_k], "s-", color="tab:green", label=f"{exc} at k")
        ax.set(xlabel="switch at position k", ylabel="perplexity of positions >= k", title=f"{name}: scored continuations")
        ax.legend(fontsize=7)
        ax = row[1]
        widths = list(dict.fromkeys(p.split("->")[0] for p in r["pairs_at_half"]))
        grid = np.full((len(widths), len(widths)), np.nan)
        for pair, v in r["pairs_at_half"].items():
            a, b = pair.split("->")
            grid[widths.index(a), widths.index(b)] = 100 * v[f"cost_vs_{b}"]
        limit = np.nanmax(np.abs(grid))
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
        for i in range(len(widths)):
            for j in range(len(widths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:+.1f}%", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(widths)), widths)
        ax.set_yticks(range(len(widths)), widths)
        ax.set(xlabel="to (B)", ylabel="from (A: cache built at)",
               title=f"ppl(A->B) / ppl(pure B) - 1, switch at {results['window'] // 2}")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax = row[2]
        ax.plot(ks, [b["ta->s"]["top1_agree_s"] for b in by_k], "o-", color="tab:orange", label="ta->s vs pure s")
        ax.plot(ks, [b["s->ta"]["top1_agree_ta"] for b in by_k], "o-", color="tab:blue", label="s->ta vs pure ta")
        ax.plot(ks, [b[exc]["top1_agree_ta"] for b in by_k], "s-", color="tab:green", label=f"{exc} vs pure ta")
        ax.axhline(r["top1_pure_s_vs_ta"], color="k", ls=":", label="pure s vs pure ta")
        ax.set(xlabel="switch at position k", ylabel="greedy next token equal (positions >= k)", ylim=(0, 1.05),
               title="greedy agreement with the pure width")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=52)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "window": args.window, "checkpoints": {}}
    for path in args.checkpoints.split(","):
        ckpt = load_checkpoint(REPO / path)
        started = time.perf_counter()
        results["checkpoints"][ckpt.name] = measure(ckpt, args)
        print(f"{ckpt.name}: {time.perf_counter() - started:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(_rounded(results), indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    for name, r in results["checkpoints"].items():
        print(name, {pair: f"{100 * v['cost_vs_' + pair.split('->')[1]]:+.2f}%" for pair, v in r["pairs_at_half"].items()})


def _rounded(value):
    """Floats to 5 significant digits (the JSON stays small and readable)."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    main()
