"""What a join or a leave costs the running batch's KV cache, over context 256..2048: the engine's
cache of row slots against the layout it replaced, one run.

The slot cache (``matta.model.StaticKVCache`` as ``serving.worker.model_runner`` uses it): a join
copies the new row's keys and values into a free slot and moves one row per narrower width group;
a leave moves one row per group from its own to the narrowest. The replaced layout, rebuilt here as
the peer: one left-padded buffer per batch; a join pads and concatenates every row into a new
buffer, a leave gathers the survivors into a new one, the widest-first order re-sorts them.

Per context length and batch size: median milliseconds of a join (a ``context``-token row joining
``batch`` rows of that length) and of a leave, for both layouts, and the ratio. The cache has
GPT-2 small's heads (12 x 64) and ``--layers`` layers (12 in GPT-2 small; fewer keep the copies in
memory here: every figure scales with the layer count for both layouts alike). Two widths, so the
slot cache moves at most one row per event besides the row itself.

    python -m benchmarks.kv_cache [--contexts 256 512 1024 2048] [--batches 8 32] [--layers 4]

Writes ``benchmarks/results/kv_cache.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F

from matta.kv_cache import StaticKVCache

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
HEADS, HEAD_DIM = 12, 64


def rows(batch: int, context: int, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(batch, HEADS, context, HEAD_DIM), torch.randn(batch, HEADS, context, HEAD_DIM))
            for _ in range(layers)]


def slot_join(cache: StaticKVCache, new: list, context: int) -> None:
    """A join as the runner makes it: the row into a free slot, then one narrower-group row moved
    to its group's end and the joining row into the freed slot (two widths)."""
    cache.write_rows(new, torch.tensor([context]))
    B = cache.batch_size
    cache.reserve(0, 0, B + 1)
    cache.move_row(B - 1, B)  # the joining row parked in the spare slot
    cache.move_row(B // 2, B - 1)  # the narrower group's first row to its end
    cache.move_row(B, B // 2)  # the joining row at its group's end


def slot_leave(cache: StaticKVCache) -> None:
    """A leave from the wider group: its last row fills the hole, the narrower group's last row its slot."""
    B = cache.batch_size
    cache.move_row(B // 2 - 1, 0)
    cache.move_row(B - 1, B // 2 - 1)
    cache.set_batch_size(B - 1)


def copied(cache: list, capacity: int) -> StaticKVCache:
    """The replaced layout's buffer: every row copied into new, uninitialised buffers."""
    length = cache[0][0].shape[2]
    keys, values = [], []
    for k, v in cache:
        kb, vb = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3]), v.new_empty(k.shape[0], k.shape[1], capacity,
                                                                                        k.shape[3])
        kb[:, :, :length], vb[:, :, :length] = k, v
        keys.append(kb)
        values.append(vb)
    return StaticKVCache(keys, values, torch.full((k.shape[0],), length), k.shape[0])


def padded_join(cache: StaticKVCache, new: list, length: int) -> StaticKVCache:
    """The replaced layout's join: pad both to the longer, concatenate every row, re-sort by width."""
    L, P = cache.length, new[0][0].shape[2]
    T = max(L, P)
    merged = [(torch.cat([F.pad(ko, (0, 0, T - L, 0)), F.pad(kn, (0, 0, T - P, 0))]),
               torch.cat([F.pad(vo, (0, 0, T - L, 0)), F.pad(vn, (0, 0, T - P, 0))]))
              for (ko, vo), (kn, vn) in zip(cache.as_list(), new, strict=True)]
    joined = copied(merged, cache.capacity)
    B = joined.batch_size
    order = torch.tensor([*range(B // 2), B - 1, *range(B // 2, B - 1)])  # the new row into its width's place
    return copied([(k.index_select(0, order), v.index_select(0, order)) for k, v in joined.as_list()], joined.capacity)


def padded_leave(cache: StaticKVCache) -> StaticKVCache:
    """The replaced layout's leave: gather the survivors into a new buffer."""
    keep = torch.arange(1, cache.batch_size)
    return copied([(k.index_select(0, keep), v.index_select(0, keep)) for k, v in cache.as_list()], cache.capacity)


def measure(batch: int, context: int, layers: int, repeats: int) -> dict:
    base = rows(batch, context, layers)
    new = rows(1, context, layers)
    times: dict[str, list[float]] = {"slot_join": [], "slot_leave": [], "padded_join": [], "padded_leave": []}
    for _ in range(repeats):  # each repeat on a fresh cache, the layouts in turn
        slots = StaticKVCache.from_list(base, capacity=context + 16)
        slots.reserve(0, 0, batch + 2)
        t0 = time.perf_counter()
        slot_join(slots, new, context)
        t1 = time.perf_counter()
        slot_leave(slots)
        t2 = time.perf_counter()
        times["slot_join"].append(t1 - t0)
        times["slot_leave"].append(t2 - t1)
        del slots
        padded = copied(base, context + 16)
        t0 = time.perf_counter()
        padded = padded_join(padded, new, context)
        t1 = time.perf_counter()
        padded = padded_leave(padded)
        t2 = time.perf_counter()
        times["padded_join"].append(t1 - t0)
        times["padded_leave"].append(t2 - t1)
        del padded
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "context": context, **{k: round(v, 3) for k, v in ms.items()},
            "join_ratio": round(ms["padded_join"] / ms["slot_join"], 1),
            "leave_ratio": round(ms["padded_leave"] / ms["slot_leave"], 1),
            "row_mb": round(2 * layers * HEADS * context * HEAD_DIM * 4 / 1e6, 2),
            "batch_mb": round(2 * layers * batch * HEADS * context * HEAD_DIM * 4 / 1e6, 1)}


def plot(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, event in zip(axes, ("join", "leave"), strict=True):
        for batch, style in zip(results["batches"], ("-", "--", ":"), strict=False):
            points = [p for p in results["points"] if p["batch"] == batch]
            contexts = [p["context"] for p in points]
            ax.plot(contexts, [p[f"padded_{event}"] for p in points], style, color="tab:red", marker="o",
                    label=f"left-padded batch, B={batch}")
            ax.plot(contexts, [p[f"slot_{event}"] for p in points], style, color="tab:green", marker="o",
                    label=f"row slots, B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(f"one {event}, {results['layers']} layers of 12x64 heads")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ms (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "kv_cache")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"layers": args.layers, "batches": args.batches, "threads": args.threads, "points": []}
    with torch.inference_mode():
        for batch in args.batches:
            for context in args.contexts:
                point = measure(batch, context, args.layers, args.repeats)
                results["points"].append(point)
                print(f"B={batch:3d} context {context:5d}: join {point['padded_join']:8.2f} -> {point['slot_join']:6.2f} ms "
                      f"(x{point['join_ratio']}), leave {point['padded_leave']:8.2f} -> {point['slot_leave']:6.2f} ms "
                      f"(x{point['leave_ratio']})", flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
