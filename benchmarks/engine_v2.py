"""The engine before and after, in one run: capacity by width, the mixed-width step, and a burst.

*Old* is the engine as it was: on a thread of the server process (it shares the GIL with the HTTP
event loop), one forward per width group per step (``--engine inproc --forward per_width``).
*New* is the engine core in its own process, one forward per step across widths, width chosen at
dispatch for SLO requests (``--engine process --forward mixed``, the defaults). Both are real
``matta serve`` subprocesses of the same checkpoint, driven by the same closed-loop client
(``benchmarks.harness.saturate``) from this process, which shares the machine's cores.

1. **Capacity** (requests/s, closed loop, ``--clients`` clients, ``--max-tokens`` tokens each) at
   the TA, at the Student, and a 50/50 mix of both (clients alternate the pinned ids): new/old.
   The Student/TA capacity ratio is set beside the FLOP ratio and a roofline ratio (each width's
   full-batch decode step at the larger of its FLOPs over the measured sgemm rate and its bytes
   over the measured read bandwidth).
2. **Mixed-width step** (in this process, the bare model): a batch half Student, half TA, one
   mixed forward vs the profile's prediction for those rows (``LatencyModel.step_s``), and the
   per-width-group step (two forwards) vs its prediction (the sum of the two groups' steps).
3. **Burst**: 48 concurrent requests with an SLO of 4x the Student's solo latency on
   ``--policy slo --shed``: how many are served, within the SLO, at which widths.

    python -m benchmarks.engine_v2 [--seconds 15] [--rounds 2]

Writes ``benchmarks/results/engine_v2.json`` and ``.png``; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.harness import ENGINES, Server, machine_peaks, make_prompts, saturate, step_bytes, step_flops
from matta.checkpoint import load_checkpoint
from matta.model import StaticKVCache
from serving.profile import profile_model

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    p.add_argument("--seconds", type=float, default=15.0, help="closed-loop seconds per workload")
    p.add_argument("--rounds", type=int, default=2, help="old/new alternations (order swapped each round)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server's engine")
    p.add_argument("--variants", default="old,new", help=f"comma-separated, from {sorted(ENGINES)}; the first "
                                                          "is the reference of the ratios")
    p.add_argument("--skip-burst", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "engine_v2")
    return p.parse_args(argv)


def capacity(args, ckpt, prompts, logs: Path) -> dict:
    """requests/s per variant and workload, every round; medians and new/old ratios."""
    name, widths = ckpt.config.name, ckpt.config.width_names
    workloads = {"ta": f"{name}:{widths[-1]}", "s": f"{name}:{widths[0]}",
                 "mix": [f"{name}:{widths[0]}", f"{name}:{widths[-1]}"]}
    variants = args.variants.split(",")
    runs: dict[str, dict[str, list[float]]] = {v: {w: [] for w in workloads} for v in variants}
    for r in range(args.rounds):
        for variant in (variants if r % 2 == 0 else list(reversed(variants))):
            server = Server(args.checkpoint, args.threads, args.max_batch, logs / f"{variant}-{r}.log",
                            ENGINES[variant])
            url = server.start()
            try:
                asyncio.run(saturate(url, workloads["ta"], prompts, args.max_tokens, args.clients, 2.0))  # warm-up
                for workload, model in workloads.items():
                    out = asyncio.run(saturate(url, model, prompts, args.max_tokens, args.clients, args.seconds))
                    runs[variant][workload].append(out["requests_per_s"])
                    print(f"round {r} {variant:>3} {workload:>3}: {out['requests_per_s']:.1f} req/s", flush=True)
            finally:
                server.stop()
    med = {v: {w: statistics.median(x) for w, x in per.items()} for v, per in runs.items()}
    reference = variants[0]
    return {"runs_req_per_s": runs, "median_req_per_s": med, "reference": reference,
            "over_reference": {v: {w: med[v][w] / med[reference][w] for w in workloads} for v in variants[1:]},
            "student_over_ta": {v: med[v]["s"] / med[v]["ta"] for v in variants}}


@torch.inference_mode()
def mixed_step(ckpt, batch: int, context: int, repeats: int = 30) -> dict:
    """One decode step of a half-Student, half-TA batch: measured vs the profile's prediction."""
    model, config = ckpt.model, ckpt.config
    latency = profile_model(model)
    s, ta = config.width_names[0], config.width_names[-1]
    half = batch // 2
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, config.vocab_size, (batch, context), generator=gen)
    step = torch.randint(0, config.vocab_size, (batch, 1), generator=gen)
    mask = torch.ones(batch, context + 1, dtype=torch.long)
    rows = [ta] * half + [s] * (batch - half)  # widest first, as the engine keeps them
    mixed_cache = StaticKVCache.from_list(model(ctx, row_widths=rows, use_cache=True).past_key_values, context + 1)
    group_caches = {w: StaticKVCache.from_list(model(ctx[i], width=w, use_cache=True).past_key_values, context + 1)
                    for w, i in ((ta, slice(0, half)), (s, slice(half, batch)))}

    def run_mixed() -> None:
        mixed_cache.length = context
        model(step, row_widths=rows, attention_mask=mask, past_key_values=mixed_cache, use_cache=True)

    def run_groups() -> None:
        for w, i in ((ta, slice(0, half)), (s, slice(half, batch))):
            group_caches[w].length = context
            model(step[i], width=w, attention_mask=mask[i], past_key_values=group_caches[w], use_cache=True)

    times = {"mixed": [], "per_width": []}
    for fn in (run_mixed, run_groups):
        fn()
    for r in range(repeats):
        for name, fn in ((("mixed", run_mixed), ("per_width", run_groups)) if r % 2 == 0
                         else (("per_width", run_groups), ("mixed", run_mixed))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    groups = {ta: (half, context + 1), s: (batch - half, context + 1)}
    predicted = {"mixed": latency.step_s(groups),
                 "per_width": sum(latency.decode_step_s(w, b, c) for w, (b, c) in groups.items())}
    measured = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "context": context, "rows": {ta: half, s: batch - half},
            "measured_ms": {k: 1e3 * v for k, v in measured.items()},
            "predicted_ms": {k: 1e3 * v for k, v in predicted.items()},
            "measured_over_predicted": {k: measured[k] / predicted[k] for k in measured},
            "mixed_over_per_width": measured["mixed"] / measured["per_width"],
            # The profile's own mixed-step calibration: its factor and its error on held-out mixes.
            "profile_mixed_steps": latency.meta["relative_error"].get("mixed_steps")}


def burst(args, ckpt, prompts, logs: Path, variant: str) -> dict:
    """48 concurrent requests, SLO = 4x the Student's solo latency, slo policy with shedding."""
    name, widths = ckpt.config.name, ckpt.config.width_names
    server = Server(args.checkpoint, args.threads, args.max_batch, logs / f"burst-{variant}.log",
                    (*ENGINES[variant], "--policy", "slo", "--shed"))
    url = server.start()
    try:
        body = {"model": f"{name}:{widths[0]}", "prompt": prompts[0], "max_tokens": args.max_tokens,
                "temperature": 0}
        solo = []
        for _ in range(7):
            t0 = time.monotonic()
            httpx.post(f"{url}/v1/completions", json=body, timeout=60).raise_for_status()
            solo.append(time.monotonic() - t0)
        solo_s = statistics.median(solo[2:])
        slo_ms = 4000 * solo_s

        async def fire() -> list[tuple[int, str | None, float]]:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as client:
                async def one(i: int):
                    t0 = time.monotonic()
                    r = await client.post(f"{url}/v1/completions", json={
                        **body, "model": name, "prompt": prompts[i % len(prompts)], "latency_slo_ms": slo_ms})
                    return r.status_code, r.headers.get("x-matta-width"), time.monotonic() - t0
                return await asyncio.gather(*[one(i) for i in range(48)])

        results = asyncio.run(fire())
    finally:
        server.stop()
    served = [r for r in results if r[0] == 200]
    return {"student_solo_ms": 1e3 * solo_s, "slo_ms": slo_ms, "requests": len(results), "served": len(served),
            "served_within_slo": sum(1000 * r[2] <= slo_ms for r in served),
            "refused_429": sum(r[0] == 429 for r in results), "other_status": sum(r[0] not in (200, 429) for r in results),
            "widths": {w: sum(r[1] == w for r in served) for w in widths},
            "served_p99_ms": 1e3 * max((r[2] for r in served), default=0.0)}


def roofline(config, batch: int, context: int) -> dict:
    """The Student/TA decode-step ratio the machine allows: each step's FLOPs at the sgemm peak or its
    bytes at the read bandwidth, whichever takes longer, measured now."""
    peaks = machine_peaks()
    s, ta = config.width_names[0], config.width_names[-1]

    def bound(width: str) -> float:
        flops = step_flops(config, width, batch, context) / (peaks["sgemm_gflops"] * 1e9)
        moved = sum(step_bytes(config, width, batch, context).values()) / (peaks["read_gb_per_s"] * 1e9)
        return max(flops, moved)

    return {"peaks": peaks, "batch": batch, "context": context,
            "ta_over_student_step": bound(ta) / bound(s),
            "flop_ratio": config.flops_per_token(ta, context=context) / config.flops_per_token(s, context=context)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    cap = results["capacity"]["median_req_per_s"]
    variants = list(cap)
    workloads = list(cap[variants[0]])
    x = range(len(workloads))
    bar = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        axes[0].bar([i - 0.4 + bar * (k + 0.5) for i in x], [cap[variant][w] for w in workloads], width=bar,
                    label=variant)
    axes[0].set_xticks(list(x), workloads)
    axes[0].set_ylabel("requests/s (closed loop)")
    axes[0].set_title("capacity: old vs new engine")
    axes[0].legend()
    step = results["mixed_step"]
    kinds = ["mixed", "per_width"]
    axes[1].bar([i - 0.2 for i in range(2)], [step["measured_ms"][k] for k in kinds], width=0.4, label="measured")
    axes[1].bar([i + 0.2 for i in range(2)], [step["predicted_ms"][k] for k in kinds], width=0.4, label="predicted")
    axes[1].set_xticks(range(2), ["one forward", "one per width"])
    axes[1].set_ylabel("ms per decode step")
    axes[1].set_title(f"half Student, half TA, batch {step['batch']}")
    axes[1].legend()
    bursts = results.get("burst", {})
    for offset, variant in zip((-0.2, 0.2), bursts, strict=False):
        b = bursts[variant]
        axes[2].bar([i + offset for i in range(3)], [b["served_within_slo"], b["refused_429"], b["other_status"]],
                    width=0.4, label=variant)
    axes[2].set_xticks(range(3), ["served in SLO", "refused 429", "other"])
    axes[2].set_title("48-request burst, SLO 4x Student solo")
    axes[2].legend()
    fig.suptitle("engine v2 (2 cores shared by the servers and the load generator)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    prompts, prompt_info = make_prompts(ckpt, [ckpt.config.width_names[0], ckpt.config.width_names[-1]],
                                        args.prompt_tokens, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        results = {"machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                               "note": "servers and the load generator share the machine's 2 cores"},
                   "args": {k: str(v) for k, v in vars(args).items()}, "prompts": prompt_info}
        results["mixed_step"] = mixed_step(ckpt, args.max_batch, args.prompt_tokens + args.max_tokens // 2)
        print(json.dumps(results["mixed_step"], indent=1), flush=True)
        if not args.skip_burst:
            results["burst"] = {v: burst(args, ckpt, prompts, logs, v) for v in ("old", "new")}
            print(json.dumps(results["burst"], indent=1), flush=True)
        results["capacity"] = capacity(args, ckpt, prompts, logs)
        results["roofline"] = roofline(ckpt.config, args.max_batch, args.prompt_tokens + args.max_tokens // 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    cap = results["capacity"]
    print(json.dumps({"over_reference": cap["over_reference"], "student_over_ta": cap["student_over_ta"],
                      "roofline": results["roofline"]}, indent=1))
    print(f"wrote {args.out}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
