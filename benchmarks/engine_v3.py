"""The scheduler's promise in every compile mode, start-up stalls, and goodput under TTFT+TPOT targets.

Three measurements against real `matta serve` processes (the shipped checkpoint, the engine core
in its own process, one torch thread), each mode in the same run:

1. **Tight-SLO burst** per ``--compile off|background|require`` (``--policy slo --shed``): the
   Student's solo latency for 32 tokens is measured on the eager server, then on each server 48
   requests arrive at once with an SLO of 4x that (one SLO in milliseconds for every mode).
   Counted: answered within the SLO, answered late (the one outcome ``--shed`` promises never to
   give), refused. ``background`` and ``require`` start with the compile cache
   ``require`` filled (``--cache``), so their steps are compiled.
2. **The first 16-client run after /health** (16 closed-loop clients, 64 tokens, 96 requests)
   with a warm cache and with a cold one (``background``: the worker compiles while the engine
   serves), then the same load again: p99 of the first run over p99 of the second.
3. **TTFT + TPOT goodput**: an open-loop Poisson stream between the TA's and the Student's
   capacity, every request with a TTFT and a TPOT target; a request is good only if it meets
   both (vLLM's goodput, :mod:`benchmarks.client`). ``--policy slo --shed`` vs ``fixed:s`` vs ``fixed:ta``.

4. **Bursts on fresh servers** (``--only bursts``, not in the default run: 36 servers): the burst
   of 1. on ``--repeats`` fresh servers per mode, with ``--calibrate off`` and ``on`` interleaved;
   counted: bursts with any late answer.

    python -m benchmarks.engine_v3 [--cache DIR] [--only burst,bursts,startup,goodput] [--repeats N]

Writes ``benchmarks/results/engine_v3.json`` and ``.png``. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import matplotlib
import numpy as np

from benchmarks.client import Request, RequestOutput, arrivals, requests_at, run_closed_loop, run_open_loop, summarize
from benchmarks.harness import Server, save_png
from matta.checkpoint import load_checkpoint
from tests.helpers import REPO

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CHECKPOINT = REPO / "checkpoints" / "default"
RESULTS = REPO / "benchmarks" / "results"
MODES = ("off", "background", "require")


def _prompts(ckpt, n: int = 64, length: int = 16) -> list[list[int]]:
    text = ckpt.tokenizer.encode(" ".join(["Now is the winter of our discontent made glorious summer by this sun of "
                                           "York and all the clouds that lowered upon our house"] * 8))
    return [text[i:i + length] for i in range(0, n)]


def _server(mode: str, cache: Path, log: Path, *extra: str) -> tuple[Server, str]:
    server = Server(CHECKPOINT, threads=1, max_batch=32, log_path=log, compile=mode,
                    extra_args=("--compile-cache", str(cache), *extra))
    return server, server.start(timeout_s=1800)


def _solo_ms(url: str, model: str, prompts, max_tokens: int, n: int = 8) -> float:
    times = []
    with httpx.Client(timeout=60) as client:
        for i in range(n):
            sent = time.monotonic()
            client.post(f"{url}/v1/completions", json={"model": model, "prompt": prompts[i], "max_tokens": max_tokens,
                                                       "temperature": 0}).raise_for_status()
            times.append(time.monotonic() - sent)
    return 1000 * statistics.median(times[2:])


def _counts(records: list[RequestOutput], slo_s: float) -> dict:
    ok = [r for r in records if r.status == 200]
    return {"sent": len(records), "within_slo": sum(r.latency_s <= slo_s for r in ok),
            "late": sum(r.latency_s > slo_s for r in ok), "refused": sum(r.status == 429 for r in records),
            "other": sorted({r.status for r in records} - {200, 429}),
            "widths": {w: sum(r.width == w for r in ok) for w in sorted({r.width for r in ok})}}


def _saturate(url: str, model: str, prompts, max_tokens: int, clients: int, seconds: float) -> dict:
    """Closed loop of ``clients`` for ``seconds``: vLLM-named figures of the run."""
    requests = [Request(p, max_tokens, 0.0, model) for p in prompts]
    outputs, duration = asyncio.run(run_closed_loop(url, requests, clients, stream=False, duration_s=seconds))
    s = summarize(outputs, duration)
    return {k: s[k] for k in ("request_throughput", "output_throughput", "median_e2el_ms", "p99_e2el_ms",
                              "completed", "failed")}


def _engine_counters(url: str) -> dict:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for line in text.splitlines():
        for name in ("matta_engine_iterations_total", "matta_engine_iteration_overruns_total",
                     "matta_engine_iteration_overrun_seconds_total", "matta_engine_swap_ins_deferred_total"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[-1])
        if line.startswith('matta_decode_steps_total{path="compiled"}'):
            out["compiled_steps"] = float(line.split()[-1])
    return out


def _solo_then_burst(url: str, ckpt, prompts, slo_ms: float | None) -> tuple[float, float, dict]:
    """The Student's solo latency for 32 tokens on the server at ``url``, then the 48-request burst
    under ``slo_ms`` (4x that solo latency when None): (solo ms, SLO ms, the burst's counts)."""
    solo = _solo_ms(url, f"{ckpt.name}:s", prompts, 32)
    slo_ms = slo_ms or 4 * solo
    burst = [Request(prompts[i % len(prompts)], 32, 0.0, ckpt.name, {"latency_slo_ms": slo_ms}) for i in range(48)]
    records, _ = asyncio.run(run_open_loop(url, burst, timeout_s=60, stream=False))
    return solo, slo_ms, {**_counts(records, slo_ms / 1000), "engine": _engine_counters(url)}


def burst(ckpt, cache: Path, tmp: Path) -> dict:
    """The tight-SLO burst per compile mode, every mode under one SLO in milliseconds: 4x the
    Student's solo latency on the eager (``off``) server, measured first (each server still serves
    the same solo requests before its burst, and reports its own solo latency)."""
    prompts = _prompts(ckpt)
    out = {}
    slo_ms = None
    for mode in ("off", "require", "background"):  # require before background: it fills the cache
        server, url = _server(mode, cache, tmp / f"burst-{mode}.log", "--policy", "slo", "--shed")
        try:
            solo, slo_ms, counts = _solo_then_burst(url, ckpt, prompts, slo_ms)
            out[mode] = {"student_solo_ms": round(solo, 1), "slo_ms": round(slo_ms, 1), **counts,
                         "compiled": httpx.get(f"{url}/health").json().get("compiled")}
        finally:
            server.stop()
        print("burst", mode, json.dumps(out[mode]))
    return out


def bursts(ckpt, cache: Path, tmp: Path, repeats: int = 6, slo_ms: float | None = None) -> dict:
    """The tight-SLO burst on many fresh servers, with and without start-up calibration
    (``--calibrate``), interleaved: whether a burst is late depends on what its process's steps cost,
    so one burst per mode says little. A burst is late if any of its answers is. The SLO is 4x the
    Student's solo latency on the first (eager, uncalibrated) server, kept for every server, unless
    ``slo_ms`` fixes it."""
    prompts = _prompts(ckpt)
    runs = []
    for repeat in range(repeats):
        for mode in ("off", "require", "background"):
            for calibrate in ("off", "on"):
                server, url = _server(mode, cache, tmp / f"bursts-{mode}-{calibrate}-{repeat}.log", "--policy", "slo",
                                      "--shed", "--calibrate", calibrate)
                try:
                    solo, slo_ms, counts = _solo_then_burst(url, ckpt, prompts, slo_ms)
                    run = {"mode": mode, "calibrate": calibrate, "repeat": repeat, "student_solo_ms": round(solo, 1),
                           **counts}
                finally:
                    server.stop()
                runs.append(run)
                print("bursts", json.dumps(run))
    summary: dict = {}
    for run in runs:
        entry = summary.setdefault(run["mode"], {}).setdefault(f"calibrate_{run['calibrate']}", {
            "bursts": 0, "late_bursts": 0, "within_slo": 0, "late": 0, "refused": 0})
        entry["bursts"] += 1
        entry["late_bursts"] += run["late"] > 0
        for key in ("within_slo", "late", "refused"):
            entry[key] += run[key]
    return {"slo_ms": round(slo_ms, 1), "repeats": repeats, "summary": summary, "runs": runs}


def startup(ckpt, cache: Path, tmp: Path) -> dict:
    prompts = _prompts(ckpt)
    out = {}
    for name, directory in (("warm", cache), ("cold", Path(tempfile.mkdtemp(prefix="matta-cold-", dir=tmp)))):
        directory.mkdir(mode=0o700, exist_ok=True)
        server, url = _server("background", directory, tmp / f"startup-{name}.log")
        try:
            runs = []
            for _ in range(2):
                runs.append(_saturate(url, f"{ckpt.name}:s", prompts, 64, clients=16, seconds=8))
            out[name] = {"first": runs[0], "second": runs[1],
                         "p99_ratio": round(runs[0]["p99_e2el_ms"] / runs[1]["p99_e2el_ms"], 2),
                         "engine": _engine_counters(url), "compiled": httpx.get(f"{url}/health").json()["compiled"]}
        finally:
            server.stop()
        print("startup", name, json.dumps(out[name]))
    return out


def goodput(ckpt, cache: Path, tmp: Path, seconds: float = 20.0, ttft_ms: float = 150.0, tpot_ms: float = 20.0) -> dict:
    """Poisson arrivals at the geometric mean of the TA's and the Student's closed-loop capacities,
    every request with TTFT and TPOT targets (as :mod:`benchmarks.max_rate`'s defaults: an
    interactive answer starts within 150 ms and streams at 50 tokens/s or faster)."""
    prompts = _prompts(ckpt)
    out = {"policies": {}}
    capacity = {}
    server, url = _server("background", cache, tmp / "goodput-capacity.log")
    try:
        for w in ("s", "ta"):
            capacity[w] = _saturate(url, f"{ckpt.name}:{w}", prompts, 64, clients=32, seconds=8)
    finally:
        server.stop()
    rate = (capacity["s"]["request_throughput"] * capacity["ta"]["request_throughput"]) ** 0.5  # between the two
    times = arrivals(round(rate * seconds), rate, seed=0)
    out.update(rate_req_s=round(rate, 2), ttft_slo_ms=ttft_ms, tpot_slo_ms=tpot_ms,
               capacity_req_s={w: round(c["request_throughput"], 2) for w, c in capacity.items()})
    for policy, extra in (("slo", ("--policy", "slo", "--shed")), ("fixed:s", ("--policy", "fixed:s")),
                          ("fixed:ta", ("--policy", "fixed:ta"))):
        server, url = _server("background", cache, tmp / f"goodput-{policy}.log", *extra)
        try:
            requests = requests_at(times, prompts, 64, ckpt.name, {"ttft_slo_ms": ttft_ms, "tpot_slo_ms": tpot_ms})
            records, duration = asyncio.run(run_open_loop(url, requests, timeout_s=60))
        finally:
            server.stop()
        s = summarize(records, duration, {"ttft": ttft_ms, "tpot": tpot_ms})
        out["policies"][policy] = {
            "sent": len(records), "served": s["completed"], "good": s["good_requests"],
            "refused": sum(r.status == 429 for r in records), "goodput_req_s": round(s["request_goodput"], 2),
            "good_fraction": round(s["good_fraction"], 3), "ttft_p99_ms": s["p99_ttft_ms"],
            "tpot_p99_ms": s["p99_tpot_ms"], "widths": s["width_mix"]}
        print("goodput", policy, json.dumps(out["policies"][policy]))
    return out


def plot(results: dict, path: Path) -> None:
    panels = [k for k in ("burst", "bursts", "startup", "goodput") if k in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        data = results[name]
        if name == "burst":
            modes = list(data)
            for k, (key, color) in enumerate((("within_slo", "tab:green"), ("late", "tab:red"), ("refused", "tab:gray"))):
                ax.bar(np.arange(len(modes)) + 0.27 * (k - 1), [data[m][key] for m in modes], 0.27, label=key, color=color)
            ax.set_xticks(range(len(modes)), modes)
            ax.set_xlabel("--compile")
            ax.set_title("48-request burst, SLO 4x Student solo, --shed")
            ax.set_ylabel("requests")
        elif name == "bursts":
            modes = list(data["summary"])
            for k, calibrate in enumerate(("off", "on")):
                x = np.arange(len(modes)) + 0.4 * (k - 0.5)
                runs = [[r for r in data["runs"] if r["mode"] == m and r["calibrate"] == calibrate] for m in modes]
                bars = ax.bar(x, [np.mean([r["within_slo"] for r in rs]) for rs in runs], 0.4, alpha=0.6,
                              label=f"--calibrate {calibrate}: mean within SLO")
                for xi, rs in zip(x, runs, strict=True):
                    ax.plot([xi] * len(rs), [r["within_slo"] for r in rs], "k.", ms=4)
                late = [data["summary"][m][f"calibrate_{calibrate}"] for m in modes]
                ax.bar_label(bars, [f"late {e['late_bursts']}/{e['bursts']}" for e in late], fontsize=7)
            ax.set_xticks(range(len(modes)), modes)
            ax.set_xlabel("--compile")
            ax.set_ylabel("answers within the SLO per burst (dots: bursts)")
            ax.set_title(f"48-request burst on fresh servers, SLO {data['slo_ms']:g} ms")
        elif name == "startup":
            runs = list(data)
            ax.bar(np.arange(len(runs)) - 0.2, [data[r]["first"]["p99_e2el_ms"] for r in runs], 0.4, label="first run")
            ax.bar(np.arange(len(runs)) + 0.2, [data[r]["second"]["p99_e2el_ms"] for r in runs], 0.4, label="second run")
            ax.set_xticks(range(len(runs)), [f"{r} cache" for r in runs])
            ax.set_ylabel("p99 latency (ms)")
            ax.set_title("16 clients right after /health")
        else:
            policies = list(data["policies"])
            ax.bar(policies, [data["policies"][p]["goodput_req_s"] for p in policies], color="tab:green")
            ax.axhline(data["rate_req_s"], color="k", ls="--", lw=1, label="offered")
            ax.set_ylabel("goodput (req/s meeting TTFT and TPOT)")
            ax.set_title(f"TTFT {data['ttft_slo_ms']:g} ms + TPOT {data['tpot_slo_ms']:g} ms")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "matta" / "compile",
                   help="compile cache the compiled modes share (filled by the require run)")
    p.add_argument("--only", default="burst,startup,goodput", help="any of burst,bursts,startup,goodput")
    p.add_argument("--repeats", type=int, default=6, help="bursts: fresh servers per mode and --calibrate setting")
    p.add_argument("--slo-ms", type=float, help="bursts: one SLO for every server (default 4x the first's solo latency)")
    p.add_argument("--out", type=Path, default=RESULTS / "engine_v3")
    args = p.parse_args()
    ckpt = load_checkpoint(CHECKPOINT)
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="matta-engine-v3-") as tmp:
        for name in args.only.split(","):
            run = {"burst": burst, "bursts": lambda *a: bursts(*a, repeats=args.repeats, slo_ms=args.slo_ms), "startup": startup,
                   "goodput": goodput}[name]
            results[name] = run(ckpt, args.cache, Path(tmp))
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in results.items() if k != "started"}, indent=1)[:4000])


if __name__ == "__main__":
    main()
