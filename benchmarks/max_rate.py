"""Max rate within SLO: the highest request rate each server sustains with goodput >= 99% of requests.

As ``vllm bench sweep serve_sla``, a bisection over the request rate: each probe replays open-loop
Poisson arrivals (``--burstiness`` 1; vLLM's gamma otherwise) at one rate for ``--duration``
seconds (longer for ``--min-requests``, up to 4x) with :mod:`benchmarks.client`, and passes when
at least ``--target`` of the requests sent are good by vLLM's definition under the TTFT + TPOT SLO
(completed, TTFT <= ``--ttft-ms`` and TPOT <= ``--tpot-ms``). The rate doubles from ``--start-rate``
until a probe fails (or halves until one passes, down to 1/16 of it), then bisects until the
bracket is within ``--rel-tol``.

Systems, each a fresh server on this machine (2 cores shared with the client):
- ``matta serve`` with the width policies ``slo`` (per-request width from the latency model, under
  the same TTFT/TPOT targets as server defaults), ``fixed:<Student>`` and ``fixed:<TA>``;
- vLLM's CPU build serving each of those widths exported as a plain HF model (``--vllm-widths``).

Per system: the max rate, its goodput share and p99 TTFT/TPOT, and the width served at that rate
(mix, mean FFN hidden units, mean quality: the checkpoint's cloze accuracy of the width served).
Without ``--ttft-ms``/``--tpot-ms`` the SLO is ``--slo-factor`` x the unloaded TTFT/TPOT of
``matta serve`` at the TA (median of a few sequential requests). Summary JSON + PNG under
``benchmarks/results/``; per-request rows of every probe under ``runs/bench/max_rate/``.

    python -m benchmarks.max_rate                                    # full size (~40 min)
    python -m benchmarks.max_rate --duration 8 --min-requests 100 --rel-tol 0.2   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.client import RUNS, arrivals, requests_at, run_closed_loop, run_open_loop, summarize, write_rows
from benchmarks.harness import VLLM_VENV, Server, VLLMServer, make_prompts, save_png
from matta.checkpoint import load_checkpoint
from matta.hf import export_width
from router.quality import width_quality

RESULTS = Path(__file__).parent / "results"
PROBE_KEYS = ("request_rate", "num_prompts", "completed", "failed", "good_fraction", "request_goodput",
              "request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
              "p99_tpot_ms", "p99_e2el_ms", "width_mix", "failures", "send_lag_p99_ms")


def max_rate_within(probe: Callable[[float], bool], start_rate: float, rel_tol: float = 0.1,
                    max_probes: int = 12, min_rate: float = 0.05, max_rate: float = 1e4) -> tuple[float, float]:
    """Bracket and bisect the highest rate for which ``probe(rate)`` passes (assumed monotone:
    passes below some rate, fails above). Returns ``(lo, hi)``: ``lo`` the highest rate that passed
    (0 when none did, down to ``min_rate``), ``hi`` the lowest that failed (inf when none did, up
    to ``max_rate``). Stops when ``hi - lo <= rel_tol * lo`` or after ``max_probes`` probes."""
    if start_rate <= 0 or rel_tol <= 0:
        raise ValueError(f"start_rate and rel_tol must be > 0, got {start_rate}, {rel_tol}")
    lo, hi, probes = 0.0, math.inf, 0
    rate = start_rate
    while probes < max_probes:  # bracket: double up while passing, halve down while failing
        probes += 1
        if probe(rate):
            lo = rate
            if not math.isinf(hi) or rate * 2 > max_rate:
                break
            rate *= 2
        else:
            hi = rate
            if lo > 0 or rate / 2 < min_rate:
                break
            rate /= 2
    while probes < max_probes and lo > 0 and not math.isinf(hi) and hi - lo > rel_tol * lo:
        probes += 1
        rate = (lo + hi) / 2
        if probe(rate):
            lo = rate
        else:
            hi = rate
    return lo, hi


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    p.add_argument("--policies", nargs="+", help="matta width policies (default: slo, fixed:<Student>, fixed:<TA>)")
    p.add_argument("--vllm-widths", nargs="*", help="widths vLLM serves as exports (default: Student and TA; "
                                                    "none to skip vLLM)")
    p.add_argument("--ttft-ms", type=float, help="TTFT SLO (default: --slo-factor x the unloaded TA's)")
    p.add_argument("--tpot-ms", type=float, help="TPOT SLO (default: --slo-factor x the unloaded TA's)")
    p.add_argument("--slo-factor", type=float, default=5.0)
    p.add_argument("--target", type=float, default=0.99, help="share of requests that must be good")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per probe")
    p.add_argument("--min-requests", type=int, default=200,
                   help="requests per probe at least (at 99%% the probe may miss 1 in 100: fewer judge noise)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1: Poisson)")
    p.add_argument("--start-rate", type=float, default=8.0, help="first probe's rate (req/s)")
    p.add_argument("--rel-tol", type=float, default=0.1, help="stop when the bracket is this tight")
    p.add_argument("--max-probes", type=int, default=10, help="per system")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of matta, OpenMP threads of vLLM")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--compile", default="off", choices=("off", "background", "require"),
                   help="matta's --compile (off: eager, as vLLM runs here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "max_rate")
    return p.parse_args(argv)


def sweep(url: str, model: str, prompts: list, args, slo_ms: dict, name: str) -> dict:
    """Warm the server up, then bisect its max rate within the SLO; every probe's summary."""
    warm = requests_at([0.0] * 16, prompts, args.max_tokens, model, seed=args.seed)
    asyncio.run(run_closed_loop(url, warm, 4))
    probes = []

    def probe(rate: float) -> bool:
        # --duration, or longer for --min-requests, but at most 4x --duration (low rates stay short).
        seconds = min(max(args.duration, args.min_requests / rate), 4 * args.duration)
        n = max(1, round(rate * seconds))
        requests = requests_at(arrivals(n, rate, args.burstiness, args.seed), prompts, args.max_tokens, model,
                               seed=args.seed)
        outputs, duration = asyncio.run(run_open_loop(url, requests, timeout_s=max(30.0, 4 * args.duration)))
        summary = summarize(outputs, duration, slo_ms) | {"request_rate": rate}
        write_rows(outputs, RUNS / "bench" / "max_rate" / f"{name.replace(':', '_')}_{rate:.2f}.jsonl")
        probes.append({k: summary[k] for k in PROBE_KEYS if k in summary})
        passed = summary["good_fraction"] >= args.target
        print(f"  {name}: {rate:7.2f} req/s -> {100 * summary['good_fraction']:5.1f}% good "
              f"(p99 TTFT {summary['p99_ttft_ms'] or 0:.0f} ms, p99 TPOT {summary['p99_tpot_ms'] or 0:.1f} ms, "
              f"mix {summary['width_mix']}) {'pass' if passed else 'fail'}", flush=True)
        return passed

    lo, hi = max_rate_within(probe, args.start_rate, args.rel_tol, args.max_probes, min_rate=args.start_rate / 16)
    at = next((p for p in probes if p["request_rate"] == lo), None)
    return {"max_rate": lo, "failed_at": None if math.isinf(hi) else hi, "at_max_rate": at, "probes": probes}


def served_width(mix: dict, config, quality: dict) -> dict:
    """Mean FFN hidden units and mean quality of a width mix."""
    hidden = {w: statistics.mean(config.resolve_width(w)) for w in mix}
    return {"mean_ffn_hidden": sum(share * hidden[w] for w, share in mix.items()) if mix else None,
            "mean_quality": sum(share * quality[w] for w, share in mix.items()) if mix else None}


def unloaded_slo(url: str, model: str, prompts: list, args) -> dict:
    """``--slo-factor`` x the median TTFT and TPOT of sequential requests to an idle server."""
    requests = requests_at([0.0] * 12, prompts, args.max_tokens, model, seed=args.seed)
    outputs, duration = asyncio.run(run_closed_loop(url, requests, 1))
    s = summarize(outputs[2:], duration)
    return {"ttft": round(args.slo_factor * s["median_ttft_ms"], 1), "tpot": round(args.slo_factor * s["median_tpot_ms"], 2)}


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    config = ckpt.config
    student, ta = config.width_names[0], config.width_names[-1]
    policies = args.policies or ["slo", f"fixed:{student}", f"fixed:{ta}"]
    vllm_widths = [student, ta] if args.vllm_widths is None else args.vllm_widths
    if vllm_widths and not (VLLM_VENV / "bin" / "python").is_file():
        raise SystemExit(f"no vLLM in {VLLM_VENV}: create it with deploy/vllm/setup_venv.sh, or pass --vllm-widths")
    quality = width_quality(ckpt.training, config.width_names)
    prompts, prompt_info = make_prompts(ckpt, [student, ta], args.prompt_tokens, args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="max_rate_"))
    slo_ms = {k: v for k, v in (("ttft", args.ttft_ms), ("tpot", args.tpot_ms)) if v is not None}
    systems: dict[str, dict] = {}

    def matta_server(policy: str) -> Server:
        flags = ["--policy", policy, "--max-queue", "100000"]
        if policy.startswith("slo"):  # the targets the client judges by, as the server's defaults
            flags += ["--ttft-slo-ms", str(slo_ms["ttft"]), "--tpot-slo-ms", str(slo_ms["tpot"])]
        return Server(args.checkpoint, args.threads, args.max_batch, work / f"{policy.replace(':', '_')}.log",
                      tuple(flags), compile=args.compile)

    if len(slo_ms) < 2:
        server = matta_server(f"fixed:{ta}")
        url = server.start(timeout_s=600)
        try:
            slo_ms = unloaded_slo(url, f"{config.name}:{ta}", prompts, args) | slo_ms
        finally:
            server.stop()
    print(f"SLO: TTFT <= {slo_ms['ttft']} ms, TPOT <= {slo_ms['tpot']} ms", flush=True)
    for policy in policies:
        server = matta_server(policy)
        url = server.start(timeout_s=600)
        try:
            systems[f"matta {policy}"] = sweep(url, config.name, prompts, args, slo_ms, f"matta {policy}")
        finally:
            server.stop()
    context = args.prompt_tokens + args.max_tokens + 8
    for width in vllm_widths:
        name = f"vllm {width}"
        export = export_width(ckpt, width, work / f"export-{width}")
        kv_bytes = max(64 * 2**20, 2 * config.n_layer * config.d_model * 4 * context * args.max_batch * 2)
        server = VLLMServer(export, f"{config.name}:{width}", work / f"vllm-{width}.log", threads=args.threads,
                            extra_args=("--max-model-len", str(context), "--kv-cache-memory-bytes", str(kv_bytes),
                                        "--max-num-seqs", str(args.max_batch)))
        url = server.start()
        try:
            systems[name] = sweep(url, f"{config.name}:{width}", prompts, args, slo_ms, name)
        finally:
            server.stop()
    for name, s in systems.items():
        at = s["at_max_rate"] or {}
        mix = at.get("width_mix") or ({name.split()[1]: 1.0} if name.startswith("vllm") and at else {})
        s["served"] = {"width_mix": mix} | served_width(mix, config, quality)
    results = {"checkpoint": str(args.checkpoint), "widths": dict(config.widths), "quality": quality,
               "slo_ms": slo_ms, "target_good_fraction": args.target, "burstiness": args.burstiness,
               "duration_s": args.duration, "rel_tol": args.rel_tol, "max_tokens": args.max_tokens,
               "prompt_tokens": args.prompt_tokens, "threads": args.threads, "max_batch": args.max_batch,
               "compile": args.compile, "prompts": prompt_info, "systems": systems}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(table(results))
    return 0


def table(results: dict) -> str:
    """The max-rate-within-SLO table, matta's policies and vLLM side by side."""
    slo = results["slo_ms"]
    lines = [f"max rate with >= {100 * results['target_good_fraction']:g}% of requests good "
             f"(TTFT <= {slo['ttft']} ms, TPOT <= {slo['tpot']} ms; {results['duration_s']:g} s Poisson probes)",
             f"{'system':<18} {'max req/s':>9} {'good %':>7} {'p99 TTFT ms':>11} {'p99 TPOT ms':>11} "
             f"{'mean FFN':>8} {'quality':>7}  width mix"]
    for name, s in results["systems"].items():
        at, served = s["at_max_rate"] or {}, s["served"]
        mix = " ".join(f"{w} {share:.0%}" for w, share in served["width_mix"].items())
        lines.append(f"{name:<18} {s['max_rate']:>9.2f} {100 * at.get('good_fraction', 0):>7.1f} "
                     f"{at.get('p99_ttft_ms') or 0:>11.1f} {at.get('p99_tpot_ms') or 0:>11.2f} "
                     f"{served['mean_ffn_hidden'] or 0:>8.0f} {served['mean_quality'] or 0:>7.3f}  {mix}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, s in results["systems"].items():
        probes = sorted(s["probes"], key=lambda p: p["request_rate"])
        left.plot([p["request_rate"] for p in probes], [100 * p["good_fraction"] for p in probes], marker="o",
                  label=name, linestyle="--" if name.startswith("vllm") else "-")
    left.axhline(100 * results["target_good_fraction"], color="black", linestyle=":", label="target")
    left.set(xlabel="request rate (req/s)", ylabel="% of requests good", xscale="log", ylim=(0, 102),
             title=f"probes (TTFT <= {results['slo_ms']['ttft']} ms, TPOT <= {results['slo_ms']['tpot']} ms)")
    left.legend(fontsize=8)
    names = list(results["systems"])
    rates = [results["systems"][n]["max_rate"] for n in names]
    bars = right.bar(range(len(names)), rates, color=["tab:gray" if n.startswith("vllm") else "tab:blue" for n in names])
    for bar, n in zip(bars, names, strict=True):
        hidden = results["systems"][n]["served"]["mean_ffn_hidden"]
        right.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
                   f"FFN {hidden:.0f}" if hidden is not None else "", ha="center", va="bottom", fontsize=8)
    right.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    right.set(ylabel="max req/s within SLO", title="max rate within SLO (label: mean FFN width served)")
    fig.suptitle("max rate within SLO: matta serve policies and vLLM (2 cores shared with the client)")
    fig.tight_layout()
    save_png(fig, path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
