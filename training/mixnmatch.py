"""``matta mixnmatch``: search per-layer width profiles and add the best as named widths.

A nested checkpoint serves any FFN size per layer (MatFormer's Mix'n'Match), not only its
uniform named widths. This module evaluates per-layer profiles built from the named sizes on
held-out tokens and keeps the Pareto front of perplexity against FLOPs per token:

* ``heuristic`` (MatFormer): profiles non-decreasing with depth that change as gently as
  possible, i.e. between two adjacent named sizes, the last k layers on the larger one;
* ``exhaustive``: every profile over the named sizes, where there are at most ``max_exhaustive``.

The profiles on the front that keep the served ladder (widths and profiles ordered by FLOPs)
monotone in held-out perplexity are added to the checkpoint as ``ModelConfig.profiles``
(``mixnmatch.json``), with their test-split evaluation in training.json, so the server lists
them as pinned ids, ``matta profile`` times them and the ``slo`` policy uses them as operating
points with their own quality. A decode-step latency is measured for every point on a front.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from matta.checkpoint import load_checkpoint, save_checkpoint
from matta.config import ModelConfig
from matta.kv_cache import StaticKVCache
from matta.model import NestedDecoder
from training.data import TokenData

Profile = tuple[int, ...]


def heuristic_profiles(sizes: list[int], n_layer: int) -> list[Profile]:
    """MatFormer's Mix'n'Match heuristic: non-decreasing with depth, at most one step between adjacent sizes.

    For each pair of adjacent sizes a < b, the profiles with the first n - k layers at a and the
    last k at b (k = 1..n-1); the uniform profiles are included.
    """
    sizes = sorted(sizes)
    profiles: list[Profile] = [(s,) * n_layer for s in sizes]
    for a, b in itertools.pairwise(sizes):
        profiles += [(a,) * (n_layer - k) + (b,) * k for k in range(1, n_layer)]
    return profiles


def exhaustive_profiles(sizes: list[int], n_layer: int) -> list[Profile]:
    """Every per-layer assignment of the named sizes (len(sizes) ** n_layer profiles)."""
    return list(itertools.product(sorted(sizes), repeat=n_layer))


@torch.inference_mode()
def profile_perplexities(model: NestedDecoder, profiles: list[Profile], tokens: np.ndarray, window: int,
                         max_windows: int, batch_size: int = 16) -> dict[Profile, float]:
    """Held-out perplexity of every profile, sharing the layers that profiles have in common.

    A depth-first walk over layers: profiles with the same first k sizes reuse one computation of
    those k layers, so the exhaustive set over 4 sizes and 4 layers costs 340 layer passes, not 1024.
    """
    model.eval()
    n_windows = min((len(tokens) - 1) // window, max_windows)
    if n_windows < 1:
        raise ValueError(f"need more than {window} held-out tokens, got {len(tokens)}")
    data = torch.from_numpy(tokens[: n_windows * window + 1].astype(np.int64))
    wanted = set(profiles)
    nll = dict.fromkeys(wanted, 0.0)
    count = 0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        x = torch.stack([data[r * window : r * window + window] for r in rows])
        y = torch.stack([data[r * window + 1 : r * window + window + 1] for r in rows])
        positions = torch.arange(window).expand_as(x)
        _walk(model, model.embed(x, positions), model.rope(positions), (), y, wanted, nll)
        count += y.numel()
    return {p: math.exp(v / count) for p, v in nll.items()}


def _walk(model: NestedDecoder, h: torch.Tensor, rope, prefix: Profile, y: torch.Tensor, wanted: set[Profile],
          nll: dict[Profile, float]) -> None:
    """Run layer len(prefix) at every size some wanted profile continues ``prefix`` with; sum NLL at the leaves.
    ``rope``: the blocks' positional input (:meth:`NestedDecoder.rope`), None for GPT-2."""
    depth = len(prefix)
    if depth == model.config.n_layer:
        logits = model.lm_head(model.ln_f(h))
        nll[prefix] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        return
    for size in sorted({p[depth] for p in wanted if p[:depth] == prefix}):
        _walk(model, model.h[depth](h, size, None, None, None, rope)[0], rope, (*prefix, size), y, wanted, nll)


def pareto_front(points: dict[Profile, tuple[float, float]]) -> list[Profile]:
    """Profiles not dominated in (cost, ppl), both lower-is-better; cheapest first."""
    ordered = sorted(points, key=lambda p: points[p])
    front, best = [], math.inf
    for p in ordered:
        if points[p][1] < best:
            front.append(p)
            best = points[p][1]
    return front


@torch.inference_mode()
def decode_step_ms(model: NestedDecoder, profiles: list[Profile], batch: int = 16, context: int = 128,
                   repeats: int = 7, inner: int = 5) -> dict[Profile, float]:
    """Median wall time (ms) of one decode step per profile: ``batch`` rows against a ``context``-token cache.

    Profiles are timed interleaved, round after round, so drift in the machine's speed (other
    work on shared cores) spreads over all of them instead of biasing the ones timed last.
    """
    context = min(context, model.config.n_ctx - inner - 1)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator)
    step = torch.randint(0, model.config.vocab_size, (batch, 1), generator=generator)
    caches = {p: StaticKVCache.from_list(model(ids, width=list(p), use_cache=True).past_key_values, context + inner)
              for p in profiles}
    times: dict[Profile, list[float]] = {p: [] for p in profiles}
    for _ in range(repeats):
        for p in profiles:
            caches[p].rewind(context)
            started = time.perf_counter()
            for _ in range(inner):
                model(step, width=list(p), past_key_values=caches[p], use_cache=True)
            times[p].append((time.perf_counter() - started) / inner * 1000)
    return {p: statistics.median(t) for p, t in times.items()}


def choose_profiles(config: ModelConfig, ppl: dict[Profile, float], candidates: list[Profile],
                    count: int, margin: float = 0.01) -> list[Profile]:
    """Up to ``count`` candidates that keep the served ladder monotone, spread over the FLOP range.

    The ladder is the uniform widths plus the chosen profiles, ordered by FLOPs; a candidate is
    admissible when its perplexity lies between those of its cheaper and dearer neighbours on
    the ladder with a relative ``margin`` to each, so the order found on the search tokens
    survives on other held-out text (without it, a profile 0.5% above ``l`` on val came out 0.5%
    below it on test). Each round adds the admissible candidate farthest (in log FLOPs) from
    every rung already on the ladder, so the points fill the widest gaps first.
    """
    uniform = [(m,) * config.n_layer for m in config.widths.values()]
    ladder = list(uniform)
    flops = {p: config.flops_per_token(list(p)) for p in set(candidates) | set(uniform)}
    chosen: list[Profile] = []
    pool = [p for p in candidates if p not in uniform]
    while len(chosen) < count:
        best, best_gap = None, 0.0
        for p in pool:
            if p in chosen:
                continue
            cheaper = [q for q in ladder if flops[q] < flops[p]]
            dearer = [q for q in ladder if flops[q] > flops[p]]
            if any(flops[q] == flops[p] for q in ladder):
                continue
            below = max(cheaper, key=flops.get) if cheaper else None
            above = min(dearer, key=flops.get) if dearer else None
            if ((below is not None and not ppl[p] < ppl[below] * (1 - margin))
                    or (above is not None and not ppl[p] > ppl[above] * (1 + margin))):
                continue
            gap = min(abs(math.log(flops[p] / flops[q])) for q in ladder)
            if gap > best_gap:
                best, best_gap = p, gap
        if best is None:
            break
        chosen.append(best)
        ladder.append(best)
    return sorted(chosen, key=flops.get)


def search(model: NestedDecoder, tokens: np.ndarray, search_tokens: int = 16384, max_exhaustive: int = 512,
           latency_batch: int = 16, latency_context: int = 128) -> dict:
    """Evaluate heuristic (and, where small enough, exhaustive) profiles; fronts and which search wins."""
    config = model.config
    sizes = sorted(config.widths.values())
    heuristic = heuristic_profiles(sizes, config.n_layer)
    space = len(sizes) ** config.n_layer
    exhaustive = exhaustive_profiles(sizes, config.n_layer) if space <= max_exhaustive else []
    window = min(256, config.n_ctx)
    started = time.perf_counter()
    ppl = profile_perplexities(model, list(dict.fromkeys(heuristic + exhaustive)), tokens, window,
                               max_windows=max(1, search_tokens // window))
    search_seconds = time.perf_counter() - started
    flops = {p: config.flops_per_token(list(p)) for p in ppl}
    fronts = {"heuristic": pareto_front({p: (flops[p], ppl[p]) for p in heuristic})}
    if exhaustive:
        fronts["exhaustive"] = pareto_front({p: (flops[p], ppl[p]) for p in exhaustive})
    timed = list(dict.fromkeys(p for front in fronts.values() for p in front))
    timed += [(m,) * config.n_layer for m in sizes if (m,) * config.n_layer not in timed]
    latency = decode_step_ms(model, timed, latency_batch, latency_context)
    result: dict = {
        "sizes": sizes, "n_layer": config.n_layer, "space": space, "exhaustive": bool(exhaustive),
        "search_tokens": max(1, search_tokens // window) * window, "split": "val",
        "search_seconds": search_seconds,
        "latency": {"batch": latency_batch, "context": latency_context, "what": "median decode step, ms"},
        "points": [{"profile": list(p), "flops_per_token": flops[p], "ppl": ppl[p],
                    "heuristic": p in heuristic, "uniform": len(set(p)) == 1,
                    "decode_step_ms": latency.get(p)} for p in sorted(ppl, key=flops.get)],
        "fronts": {k: [list(p) for p in v] for k, v in fronts.items()},
        "latency_front": [list(p) for p in pareto_front({p: (latency[p], ppl[p]) for p in timed})],
    }
    if exhaustive:
        result["comparison"] = compare_fronts(fronts["heuristic"], fronts["exhaustive"], flops, ppl)
    return result


def compare_fronts(heuristic: list[Profile], exhaustive: list[Profile], flops: dict, ppl: dict) -> dict:
    """Which search wins: at every exhaustive-front FLOP budget, the best ppl each search finds within it."""
    gaps = []
    for p in exhaustive:
        budget = flops[p]
        best_h = min((ppl[q] for q in heuristic if flops[q] <= budget), default=math.inf)
        gaps.append(best_h / ppl[p] - 1)
    shared = len(set(heuristic) & set(exhaustive))
    return {"exhaustive_front_points": len(exhaustive), "heuristic_front_points": len(heuristic),
            "heuristic_points_on_exhaustive_front": shared,
            "budgets_where_heuristic_matches": sum(g <= 1e-9 for g in gaps),
            "max_ppl_gap": max(gaps), "median_ppl_gap": statistics.median(gaps),
            "winner": "tie" if max(gaps) <= 1e-9 else "exhaustive"}


def add_profiles(path: str | Path, data: str | Path, out: str | Path | None = None, count: int = 3,
                 search_tokens: int = 16384, max_exhaustive: int = 512, cloze_items: int = 1000,
                 prefix: str = "mnm", progress: bool = False) -> tuple[Path, dict]:
    """Search ``path``'s profiles, add ``count`` of them as named widths, write ``out`` (default: in place)."""
    from training.evaluate import cloze_accuracy, perplexity, width_logits_fn

    ckpt = load_checkpoint(path)
    token_data = TokenData(data)
    if token_data.tokenizer().backend.get_vocab() != ckpt.tokenizer.backend.get_vocab():
        raise ValueError(f"{data} was tokenized with a different tokenizer than {path}")
    config = ckpt.config
    if len(config.widths) < 2:
        raise ValueError(f"{path} has one width {config.widths}; nothing to mix (run `matta elastify` first)")
    result = search(ckpt.model, token_data.tokens("val"), search_tokens, max_exhaustive)
    ppl = {tuple(p["profile"]): p["ppl"] for p in result["points"]}
    front = result["fronts"].get("exhaustive") or result["fronts"]["heuristic"]
    chosen = choose_profiles(config, ppl, [tuple(p) for p in front], count)
    existing = {tuple(v): k for k, v in config.profiles.items()}
    profiles = dict(config.profiles)
    number = len(profiles)
    for p in chosen:
        if p in existing:
            continue
        number += 1
        while f"{prefix}{number}" in profiles:
            number += 1
        profiles[f"{prefix}{number}"] = list(p)
    new_config = ModelConfig(**{**config.to_dict(), "profiles": profiles})
    ckpt.model.config = new_config
    training = dict(ckpt.training)
    evaluation = dict(training.get("eval") or {"split": "test", "widths": {}})
    evaluation["widths"] = dict(evaluation.get("widths") or {})
    tokens, items = token_data.tokens("test"), token_data.cloze("test")[:cloze_items]
    for name in profiles:
        if name in evaluation["widths"]:
            continue
        fn = width_logits_fn(ckpt.model, name)
        cloze = cloze_accuracy(fn, ckpt.tokenizer, items, config.n_ctx) if items else None
        evaluation["widths"][name] = {
            "ffn": profiles[name], "ppl": perplexity(fn, tokens, config.n_ctx), "cloze": cloze,
            "params": new_config.param_count(name), "flops_per_token": new_config.flops_per_token(name),
            **({"cloze_acc": cloze["acc"]} if cloze else {}),
        }
        if progress:
            print(f"  {name} {profiles[name]}: test ppl {evaluation['widths'][name]['ppl']:.2f}", flush=True)
    training["eval"] = evaluation
    training["mixnmatch"] = {**result, "chosen": {n: p for n, p in profiles.items() if tuple(p) in chosen}}
    written = save_checkpoint(out or path, ckpt.model, ckpt.tokenizer, training, chat_template=ckpt.chat_template)
    return written, training


def served_ladder(config: ModelConfig, evaluation: dict) -> list[dict]:
    """Every served name, cheapest first, with its FLOPs and test perplexity."""
    return [{"width": n, "ffn": list(config.resolve_width(n)), "flops_per_token": config.flops_per_token(n),
             "ppl": (evaluation.get("widths", {}).get(n) or {}).get("ppl")} for n in config.served_widths]


def plot(result: dict, path: str | Path, title: str) -> Path:
    """Uniform widths against Mix'n'Match points on one Pareto plot (val ppl vs FLOPs), plus latency."""
    import matplotlib.pyplot as plt

    from training.plots import save_figure  # sets the Agg backend

    points = result["points"]
    chosen = {tuple(p): n for n, p in result["chosen"].items()}
    fig, (ax, ax_l) = plt.subplots(1, 2, figsize=(12, 4.5))
    other = [p for p in points if not p["uniform"] and not p["heuristic"]]
    heur = [p for p in points if not p["uniform"] and p["heuristic"]]
    uni = [p for p in points if p["uniform"]]
    ax.scatter([p["flops_per_token"] for p in other], [p["ppl"] for p in other], s=10, color="tab:gray", alpha=0.5,
               label=f"exhaustive ({len(other) + len(heur) + len(uni)} profiles)" if other else None)
    ax.scatter([p["flops_per_token"] for p in heur], [p["ppl"] for p in heur], s=22, color="tab:orange",
               label="MatFormer heuristic")
    ax.plot([p["flops_per_token"] for p in uni], [p["ppl"] for p in uni], "o-", color="tab:blue",
            label="uniform widths")
    for name, key in (("exhaustive", "tab:green"), ("heuristic", "tab:red")):
        front = result["fronts"].get(name)
        if front:
            pts = [next(q for q in points if q["profile"] == f) for f in front]
            ax.plot([q["flops_per_token"] for q in pts], [q["ppl"] for q in pts], "--", color=key, alpha=0.7,
                    label=f"{name} front")
    for p in points:
        if tuple(p["profile"]) in chosen:
            ax.scatter(p["flops_per_token"], p["ppl"], marker="*", s=160, color="black", zorder=5)
            ax.annotate(chosen[tuple(p["profile"])], (p["flops_per_token"], p["ppl"]), xytext=(5, 5),
                        textcoords="offset points", fontsize=8)
    ax.set(xlabel="FLOPs / token", ylabel=f"val perplexity ({result['search_tokens']} tokens, log)",
           yscale="log", title="quality vs FLOPs")
    timed = [p for p in points if p["decode_step_ms"] is not None]
    ax_l.scatter([p["decode_step_ms"] for p in timed if p["uniform"]], [p["ppl"] for p in timed if p["uniform"]],
                 color="tab:blue", label="uniform widths")
    ax_l.scatter([p["decode_step_ms"] for p in timed if not p["uniform"]],
                 [p["ppl"] for p in timed if not p["uniform"]], color="tab:orange", label="Mix'n'Match (front points)")
    lat = result["latency"]
    ax_l.set(xlabel=f"decode step ms (batch {lat['batch']}, context {lat['context']})", ylabel="val perplexity (log)",
             yscale="log", title="quality vs measured latency")
    for a in (ax, ax_l):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    return save_figure(fig, path, title)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``matta mixnmatch`` options."""
    parser.add_argument("checkpoint", type=Path, help="a nested checkpoint (e.g. from `matta elastify`)")
    parser.add_argument("--data", type=Path, default=Path("data/shakespeare"),
                        help="prepared corpus: val split for the search, test split for the chosen profiles")
    parser.add_argument("--out", type=Path, help="write the checkpoint here (default: update CHECKPOINT in place)")
    parser.add_argument("--count", type=int, default=3, help="profiles to add as named widths")
    parser.add_argument("--prefix", default="mnm", help="names of added profiles: PREFIX1, PREFIX2, ...")
    parser.add_argument("--search-tokens", type=int, default=16384, help="val tokens each profile is scored on")
    parser.add_argument("--max-exhaustive", type=int, default=512,
                        help="search every profile when there are at most this many (else the heuristic only)")
    parser.add_argument("--cloze-items", type=int, default=1000, help="test cloze items per added profile")
    parser.add_argument("--json", metavar="PATH", help="write the search (every point, fronts, choice) as JSON")
    parser.add_argument("--plot", metavar="PNG", help="uniform widths vs Mix'n'Match points on one Pareto plot")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``matta mixnmatch``: search, add the chosen profiles, print the served ladder."""
    out, training = add_profiles(args.checkpoint, args.data, args.out, count=args.count,
                                 search_tokens=args.search_tokens, max_exhaustive=args.max_exhaustive,
                                 cloze_items=args.cloze_items, prefix=args.prefix, progress=True)
    result = training["mixnmatch"]
    config = load_checkpoint(out).config
    print(f"searched {len(result['points'])} profiles of {result['space']} "
          f"({'exhaustive + heuristic' if result['exhaustive'] else 'heuristic only'}) on "
          f"{result['search_tokens']} val tokens in {result['search_seconds']:.1f} s")
    if "comparison" in result:
        c = result["comparison"]
        print(f"heuristic vs exhaustive front: {c['winner']}; heuristic matches at {c['budgets_where_heuristic_matches']}"
              f" of {c['exhaustive_front_points']} FLOP budgets, worst ppl gap {c['max_ppl_gap']:.2%}")
    print(f"{'width':<8} {'ffn per layer':<28} {'MFLOPs/token':>12} {'test ppl':>9}")
    for row in served_ladder(config, training["eval"]):
        ppl = "-" if row["ppl"] is None else f"{row['ppl']:.2f}"
        print(f"{row['width']:<8} {'/'.join(map(str, row['ffn'])):<28} {row['flops_per_token'] / 1e6:>12.2f} {ppl:>9}")
    print(f"wrote {out}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": str(out), **result,
                                               "ladder": served_ladder(config, training["eval"])}, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot, f"{config.name}: Mix'n'Match")
        print(f"wrote {args.plot}")
    return 0
