"""Width changes mid-generation under load: `slo` with and without them, against `fixed:s` and `fixed:ta`.

Real `matta serve` processes of the shipped checkpoint (engine core in its own process, one torch
thread, eager steps, one latency profile measured once for all), in one run, on the same traces:

1. **Bursty trace** (:func:`benchmarks.harness.make_bursty_trace`, as `benchmarks.slo_router`
   draws it): gamma inter-arrivals, CV^2 = 4, mean 1.2 R, R the TA's saturated rate; SLO = 2x the
   TA's median latency at that rate. Policies: ``slo --shed`` with ``--width-changes on`` and
   ``off``, ``fixed:s``, ``fixed:ta``. Reported: SLO attainment and the mean quality of the
   answers within the SLO (quality = the checkpoint's cloze accuracy per width, weighted by the
   tokens generated at each width, from ``x-matta-widths``), through
   :func:`benchmarks.slo_router.summarise`.
2. **Tight burst over long sequences**: 16 long requests (no SLO, so the scheduler runs them at
   ``ta``), then, once they run, 48 requests at once with an SLO of 4x the Student's solo latency
   (`benchmarks.engine_v3`'s burst). Counted among the 48: within the SLO, late, refused; with and
   without width changes.

    python -m benchmarks.width_changes [--duration 30] [--out benchmarks/results/width_changes]

Writes ``<out>.json`` and ``<out>.png``. The load generator shares the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.engine_v3 import _counts, _solo_ms
from benchmarks.harness import REPO, Server, make_bursty_trace, make_prompts, open_loop, saturate
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
    p.add_argument("--long-tokens", type=int, default=200, help="tokens of each of the 16 long requests")
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


def bursty(args, ckpt, prompts, quality, common, work: Path) -> dict:
    server, url = served(args, work / "calibrate.log", common, "--policy", "fixed:ta")
    try:
        asyncio.run(saturate(url, ckpt.name, prompts, args.max_tokens, args.max_batch, 3.0))
        capacity = asyncio.run(saturate(url, ckpt.name, prompts, args.max_tokens, args.max_batch, 10.0))
    finally:
        server.stop()
    rate, slo_ms = capacity["requests_per_s"], 2000 * capacity["p50_s"]
    trace = make_bursty_trace(prompts, args.bursty_rate * rate, 4.0, args.duration, args.seed)
    slo = ("--policy", "slo", "--slo-ms", f"{slo_ms:.1f}", "--shed")
    policies = {"slo": (*slo, "--width-changes", "on"), "slo, changes off": (*slo, "--width-changes", "off"),
                "fixed:s": ("--policy", "fixed:s"), "fixed:ta": ("--policy", "fixed:ta")}
    out = {"rate_R": rate, "slo_ms": slo_ms, "requests": len(trace), "policies": {}}
    for name, flags in policies.items():
        server, url = served(args, work / f"bursty-{name.replace(' ', '_')}.log", common, *flags)
        try:
            bodies = [(t, {"model": ckpt.name, "prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
                           "latency_slo_ms": slo_ms}) for t, p in trace]
            records = asyncio.run(open_loop(url, bodies, timeout_s=max(5.0, 5 * slo_ms / 1000)))
            summary = summarise(records, slo_ms / 1000, quality, args.duration, bins=6)
            out["policies"][name] = with_width_metrics(url, summary)
        finally:
            server.stop()
        s = out["policies"][name]
        print(f"bursty {name}: attainment {s['slo_attainment']:.3f}, quality of met {s['quality_of_met']}, "
              f"changes {s['width_changes']}", flush=True)
    return out


def burst(args, ckpt, prompts, quality, common, work: Path) -> dict:
    out = {}
    slo_ms = None
    for name, changes in (("slo", "on"), ("slo, changes off", "off")):
        server, url = served(args, work / f"burst-{changes}.log", common, "--policy", "slo", "--shed",
                             "--width-changes", changes)
        try:
            if slo_ms is None:  # measured once: both variants get the same SLO
                solo = _solo_ms(url, f"{ckpt.name}:s", prompts, args.max_tokens)
                slo_ms = 4 * solo
            long = [(0.0, {"model": ckpt.name, "prompt": prompts[i % len(prompts)], "max_tokens": args.long_tokens,
                           "temperature": 0}) for i in range(16)]
            tight = [(1.0, {"model": ckpt.name, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                            "temperature": 0, "latency_slo_ms": slo_ms}) for i in range(48)]
            records = asyncio.run(open_loop(url, long + tight, timeout_s=60))
            entry = {"student_solo_ms": round(solo, 1), "slo_ms": round(slo_ms, 1),
                     **_counts(records[16:], slo_ms / 1000),
                     "long": {"served": sum(r["status"] == 200 for r in records[:16]),
                              "widths": [r.get("widths") for r in records[:16]]}}
            out[name] = with_width_metrics(url, entry)
        finally:
            server.stop()
        print(f"burst {name}: {json.dumps({k: v for k, v in out[name].items() if k != 'long'})}", flush=True)
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
            policies = list(data["policies"])
            summaries = [data["policies"][p] for p in policies]
            x = np.arange(len(policies))
            ax.bar(x - 0.2, [100 * s["slo_attainment"] for s in summaries], 0.4, label="% within SLO",
                   color="tab:green")
            ax.set_ylabel("% of requests within the SLO")
            ax.set_xticks(x, policies, fontsize=8)
            twin = ax.twinx()
            twin.bar(x + 0.2, [s["quality_of_met"] or 0 for s in summaries], 0.4, label="quality of met",
                     color="tab:purple")
            twin.set_ylabel("mean quality of in-SLO answers (cloze acc.)")
            lo = min(s["quality_of_met"] or 1 for s in summaries)
            twin.set_ylim(0.95 * lo, None)
            ax.set_title(f"bursty trace ({data['requests']} requests, SLO {data['slo_ms']:.0f} ms)")
            ax.legend(loc="upper left", fontsize=8)
            twin.legend(loc="upper right", fontsize=8)
        else:
            variants = list(data)
            for k, (key, color) in enumerate((("within_slo", "tab:green"), ("late", "tab:red"),
                                              ("refused", "tab:gray"))):
                ax.bar(np.arange(len(variants)) + 0.27 * (k - 1), [data[v][key] for v in variants], 0.27, label=key,
                       color=color)
            ax.set_xticks(range(len(variants)), variants)
            ax.set_ylabel("of the 48 tight-SLO requests")
            ax.set_title("48-request burst over 16 long ta sequences")
            ax.legend(fontsize=8)
    fig.suptitle("width changes mid-generation (2 shared CPU cores; server and load generator together)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
