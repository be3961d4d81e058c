"""Width changes mid-generation under load: `slo` with and without them, against `fixed:s` and `fixed:ta`.

Real `matta serve` processes of the shipped checkpoint (engine core in its own process, one torch
thread, eager steps, one latency profile measured once for all), in one run, on the same traces:

1. **Bursty trace** (:func:`benchmarks.client.arrivals`, as `benchmarks.slo_router` draws it):
   gamma inter-arrivals of burstiness 0.25 (CV^2 = 4), mean 1.2 R, R the TA's saturated rate; SLO = 2x the
   TA's median latency at that rate. Policies: ``slo --shed`` with ``--width-changes on`` and
   ``off`` (alternating, ``--repeats`` replays each), ``fixed:s``, ``fixed:ta``. Reported: SLO
   attainment and the mean quality of the answers within the SLO (quality = the checkpoint's
   cloze accuracy per width, and 1 / its test perplexity, weighted by the tokens generated at each
   width, from ``x-matta-widths``), through :func:`benchmarks.slo_router.summarise`.
2. **Tight burst over long sequences**: 16 long requests (240 tokens, no SLO, so the scheduler
   runs them at ``ta``), then, 0.3 s later while they run, 48 requests at once with an SLO of 6x,
   10x and 16x the Student's solo latency (`benchmarks.engine_v3`'s burst, whose 4x leaves no room
   beside the long sequences here).
   Counted among the 48: within the SLO, late, refused; with and without width changes.

    python -m benchmarks.width_changes [--duration 30] [--out benchmarks/results/width_changes]

Writes ``<out>.json`` and ``<out>.png``. The load generator shares the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.client import Request, arrivals, requests_at, run_open_loop
from benchmarks.engine_v3 import _counts, _saturate, _solo_ms
from benchmarks.harness import REPO, Server, make_prompts, save_png
from benchmarks.slo_router import summarise
from matta.checkpoint import load_checkpoint
from router.quality import width_quality

RESULTS = REPO / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "default")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of the bursty trace")
    p.add_argument("--bursty-rate", type=float, default=1.2, help="the bursty trace's mean rate, x the TA's")
    p.add_argument("--long-tokens", type=int, default=240, help="tokens of each of the 16 long requests")
    p.add_argument("--burst-after", type=float, default=0.3, help="seconds after the long requests the burst comes")
    p.add_argument("--burst-slo-factors", default="6,10,16",
                   help="the burst's SLOs, x the Student's solo latency (engine_v3's 4x leaves no room beside 16 "
                        "long sequences on 2 shared cores)")
    p.add_argument("--repeats", type=int, default=3, help="replays of the bursty trace per slo variant, alternating")
    p.add_argument("--only", default="bursty,burst")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "width_changes")
    return p.parse_args(argv)


def served(args, log: Path, common: tuple, *flags: str) -> tuple[Server, str]:
    server = Server(args.checkpoint, 1, args.max_batch, log, extra_args=(*common, *flags), compile="off")
    return server, server.start(timeout_s=600)


def with_width_metrics(url: str, summary: dict) -> dict:
    """The server's own count of width changes, from /metrics."""
    changes = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("matta_width_changes_total{"):
            labels = dict(part.split("=") for part in line[line.index("{") + 1:line.index("}")].split(","))
            changes[f"{labels['from'].strip(chr(34))}->{labels['to'].strip(chr(34))}"] = float(line.split()[-1])
    summary["width_changes"] = changes
    return summary


def compact(summary: dict) -> dict:
    """What the JSON keeps of one replay (its timeline is left out)."""
    keys = ("requests", "served", "met", "shed", "slo_attainment", "quality_of_met", "quality_of_met_inverse_ppl",
            "p50_s", "p99_s", "width_mix", "width_changes")
    return {k: summary[k] for k in keys}


def bursty(args, ckpt, prompts, quality, common, work: Path) -> dict:
    quality_ppl = width_quality(ckpt.training, list(quality), metric="inverse_ppl")
    server, url = served(args, work / "calibrate.log", common, "--policy", "fixed:ta")
    try:
        _saturate(url, ckpt.name, prompts, args.max_tokens, args.max_batch, 3.0)  # warm-up
        capacity = _saturate(url, ckpt.name, prompts, args.max_tokens, args.max_batch, 10.0)
    finally:
        server.stop()
    rate, slo_ms = capacity["request_throughput"], 2 * capacity["median_e2el_ms"]
    times = arrivals(round(args.bursty_rate * rate * args.duration), args.bursty_rate * rate, 0.25, args.seed)
    trace = requests_at(times, prompts, args.max_tokens, ckpt.name, {"latency_slo_ms": slo_ms},
                        seed=args.seed)
    slo = ("--policy", "slo", "--slo-ms", f"{slo_ms:.1f}", "--shed")
    flags = {"slo": (*slo, "--width-changes", "on"), "slo, changes off": (*slo, "--width-changes", "off"),
             "fixed:s": ("--policy", "fixed:s"), "fixed:ta": ("--policy", "fixed:ta")}
    # The two slo variants alternate, --repeats times each: on 2 shared cores the machine's speed
    # drifts between replays more than the variants differ.
    order = [*(["slo", "slo, changes off"] * args.repeats), "fixed:s", "fixed:ta"]
    out = {"rate_R": rate, "slo_ms": slo_ms, "requests": len(trace), "runs": {name: [] for name in flags}}
    for i, name in enumerate(order):
        server, url = served(args, work / f"bursty-{i}.log", common, *flags[name])
        try:
            records, _ = asyncio.run(run_open_loop(url, trace, timeout_s=max(5.0, 5 * slo_ms / 1000), stream=False))
            summary = summarise(records, slo_ms / 1000, quality, args.duration, bins=1)
            # The same answers scored by 1 / test perplexity of each width (cloze accuracy is noisy:
            # on this checkpoint m scores below s).
            summary["quality_of_met_inverse_ppl"] = summarise(records, slo_ms / 1000, quality_ppl, args.duration,
                                                              bins=1)["quality_of_met"]
            out["runs"][name].append(compact(with_width_metrics(url, summary)))
        finally:
            server.stop()
        s = out["runs"][name][-1]
        print(f"bursty {name}: attainment {s['slo_attainment']:.3f}, quality of met {s['quality_of_met']} "
              f"(1/ppl: {s['quality_of_met_inverse_ppl']}), changes {s['width_changes']}", flush=True)
    out["policies"] = {name: {key: statistics.mean(r[key] or 0 for r in runs)
                              for key in ("slo_attainment", "quality_of_met", "quality_of_met_inverse_ppl")}
                       for name, runs in out["runs"].items()}
    return out


def burst(args, ckpt, prompts, quality, common, work: Path) -> dict:
    """16 long requests, then the 48-request burst, at each SLO factor; one server per variant."""
    out: dict = {"slo_factors": [float(f) for f in args.burst_slo_factors.split(",")], "variants": {}}
    for name, changes in (("slo", "on"), ("slo, changes off", "off")):
        server, url = served(args, work / f"burst-{changes}.log", common, "--policy", "slo", "--shed",
                             "--width-changes", changes)
        runs = out["variants"][name] = []
        try:
            if "student_solo_ms" not in out:  # measured once: both variants get the same SLOs
                out["student_solo_ms"] = _solo_ms(url, f"{ckpt.name}:s", prompts, args.max_tokens)
            for factor in out["slo_factors"]:
                slo_ms = factor * out["student_solo_ms"]
                long = [Request(prompts[i % len(prompts)], args.long_tokens, 0.0, ckpt.name)
                        for i in range(16)]
                tight = [Request(prompts[i % len(prompts)], args.max_tokens, args.burst_after, ckpt.name,
                                 {"latency_slo_ms": slo_ms}) for i in range(48)]
                before = with_width_metrics(url, {})["width_changes"]
                records, _ = asyncio.run(run_open_loop(url, long + tight, timeout_s=60, stream=False))
                after = with_width_metrics(url, {})["width_changes"]
                runs.append({"slo_factor": factor, "slo_ms": round(slo_ms, 1), **_counts(records[16:], slo_ms / 1000),
                             "long_widths": sorted({r.widths or "" for r in records[:16]}),
                             "width_changes": {k: v - before.get(k, 0) for k, v in after.items()
                                               if v != before.get(k, 0)}})
                print(f"burst {name} x{factor:g}: {json.dumps({k: v for k, v in runs[-1].items() if k != 'long_widths'})}",
                      flush=True)
        finally:
            server.stop()
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [k for k in ("bursty", "burst") if k in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        data = results[name]
        if name == "bursty":
            policies = list(data["runs"])
            x = np.arange(len(policies))
            ax.bar(x - 0.2, [100 * data["policies"][p]["slo_attainment"] for p in policies], 0.4,
                   label="% within SLO (mean; dots: replays)", color="tab:green")
            for i, p in enumerate(policies):
                ax.plot([i - 0.2] * len(data["runs"][p]), [100 * r["slo_attainment"] for r in data["runs"][p]], "k.")
            ax.set_ylabel("% of requests within the SLO")
            ax.set_xticks(x, policies, fontsize=8)
            twin = ax.twinx()
            values = [data["policies"][p]["quality_of_met"] for p in policies]
            twin.bar(x + 0.2, values, 0.4, label="quality of in-SLO answers (cloze)", color="tab:purple")
            twin.set_ylim(0.95 * min(v for v in values if v), 1.01 * max(values))
            ax.set_title(f"bursty trace ({data['requests']} requests, SLO {data['slo_ms']:.0f} ms)", fontsize=9)
            ax.legend(loc="upper left", fontsize=7)
            twin.legend(loc="upper right", fontsize=7)
        else:
            factors = data["slo_factors"]
            x = np.arange(len(factors))
            for k, (variant, hatch) in enumerate((("slo", ""), ("slo, changes off", "//"))):
                runs = data["variants"][variant]
                bottom = np.zeros(len(factors))
                for key, color in (("within_slo", "tab:green"), ("late", "tab:red"), ("refused", "tab:gray")):
                    values = np.array([r[key] for r in runs])
                    ax.bar(x + 0.4 * (k - 0.5), values, 0.38, bottom=bottom, color=color, hatch=hatch,
                           label=f"{key} ({variant})" if key != "refused" or k == 0 else None)
                    bottom += values
            ax.set_xticks(x, [f"{f:g}x ({f * data['student_solo_ms']:.0f} ms)" for f in factors])
            ax.set_xlabel("SLO, x the Student's solo latency")
            ax.set_ylabel("of the 48 requests (left bar: slo; hatched: changes off)")
            ax.set_title("48-request burst over 16 long ta sequences", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle("width changes mid-generation (2 shared CPU cores; server and load generator together)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=80)


def main(argv=None) -> None:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    widths = ckpt.config.width_names
    quality = width_quality(ckpt.training, widths)
    prompts, _ = make_prompts(ckpt, [widths[0], widths[-1]], args.prompt_tokens, args.max_tokens)
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoint": str(args.checkpoint),
                     "quality": quality, "max_batch": args.max_batch, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory(prefix="matta-width-changes-") as tmp:
        work = Path(tmp)
        profile = work / "profile.json"
        subprocess.run([sys.executable, "-m", "cli", "profile", str(args.checkpoint), "--out", str(profile),
                        "--threads", "1"], check=True, cwd=REPO)
        common = ("--max-queue", "100000", "--profile", str(profile))
        for name in args.only.split(","):
            results[name] = {"bursty": bursty, "burst": burst}[name](args, ckpt, prompts, quality, common, work)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
