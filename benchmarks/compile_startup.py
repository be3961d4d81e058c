"""Start-up with compiled decode steps: time to first served token and throughput over time, in one run.

`matta serve` is started four ways on the same checkpoint, with the same client:

  off               eager decode steps only (the baseline);
  background-cold   ``--compile background`` with an empty compile cache: it serves eager at once
                    while a worker process compiles every step signature, and swaps each in as it
                    lands;
  background-warm   the same with the cache the cold run filled (a restart);
  require-warm      ``--compile require`` with that cache (every step loaded before serving).

For each: seconds from process start to a healthy ``/health`` and to the first served token (a
one-token request sent as soon as it is healthy), then a closed loop of ``--clients`` clients
(half pinned to the Student, half to the TA: mixed batches) from that moment on, with ``/health``
polled every second for the compiled steps loaded. Reported: tokens/s per 10 s window over time,
steady-state tokens/s once every step is loaded against the eager run's (same run), and the
decode steps each path ran (``matta_decode_steps_total``).

    python -m benchmarks.compile_startup [--clients 4] [--cold-seconds 600] [--seconds 60]

JSON + PNG under benchmarks/results/compile_startup.*
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

from benchmarks.harness import Server, make_prompts, save_png
from matta.checkpoint import load_checkpoint

RESULTS = Path(__file__).parent / "results"
WINDOW_S = 10.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=60, help="load after start-up, warm and eager runs")
    p.add_argument("--cold-seconds", type=float, default=600,
                   help="longest load of the cold run (it ends 30 s after the last step is loaded)")
    p.add_argument("--variants", nargs="+", default=["off", "background-cold", "background-warm", "require-warm"])
    p.add_argument("--out", type=Path, default=RESULTS / "compile_startup")
    return p.parse_args(argv)


async def drive(url: str, models: list[str], prompts: list[list[int]], args, started: float, limit_s: float,
                stop_after_ready_s: float | None) -> dict:
    """Closed-loop clients until ``limit_s`` after ``started`` (or ``stop_after_ready_s`` after every
    compiled step is loaded); ``/health`` polled each second. Times are seconds since process start."""
    done: list[tuple[float, int]] = []
    ready: list[tuple[float, int, int]] = []
    end = started + limit_s

    async def client_loop(j: int, client: httpx.AsyncClient) -> None:
        k = 0
        while time.monotonic() < end:
            body = {"model": models[j % len(models)], "prompt": prompts[(j * 7 + k) % len(prompts)],
                    "max_tokens": args.max_tokens, "temperature": 0}
            r = await client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            done.append((time.monotonic() - started, r.json()["usage"]["completion_tokens"]))
            k += 1

    async def poll_health(client: httpx.AsyncClient) -> None:
        nonlocal end, stop_after_ready_s
        while time.monotonic() < end:
            compiled = (await client.get(f"{url}/health")).json()["compiled"]
            ready.append((time.monotonic() - started, compiled["ready"], compiled["signatures"]))
            if stop_after_ready_s is not None and compiled["signatures"] and compiled["ready"] == compiled["signatures"]:
                end = min(end, time.monotonic() + stop_after_ready_s)
                stop_after_ready_s = None
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(poll_health(client), *[client_loop(j, client) for j in range(args.clients)])
    return {"completions": done, "compiled_ready": ready}


def windows(completions: list[tuple[float, int]], first: float) -> list[dict]:
    """Tokens/s per whole WINDOW_S window from ``first`` on (a last partial window is left out)."""
    if not completions:
        return []
    last = max(t for t, _ in completions)
    out, start = [], first
    while start + WINDOW_S <= last:
        tokens = sum(n for t, n in completions if start <= t < start + WINDOW_S)
        out.append({"start_s": start, "tokens_per_s": tokens / WINDOW_S})
        start += WINDOW_S
    return out


def run_variant(name: str, args, cache: Path, models: list[str], prompts: list[list[int]], work: Path) -> dict:
    mode = name.split("-")[0]
    server = Server(args.checkpoint, args.threads, 32, work / f"{name}.log", compile=mode,
                    extra_args=("--compile-cache", str(cache)))
    started = time.monotonic()
    server.start(timeout_s=3600)
    health_s = time.monotonic() - started
    first = httpx.post(f"{server.url}/v1/completions", timeout=120,
                       json={"model": models[0], "prompt": prompts[0], "max_tokens": 1, "temperature": 0})
    first.raise_for_status()
    first_token_s = time.monotonic() - started
    cold = name == "background-cold"
    trace = asyncio.run(drive(server.url, models, prompts, args, started,
                              args.cold_seconds if cold else first_token_s + args.seconds, 30.0 if cold else None))
    health = httpx.get(f"{server.url}/health").json()
    metrics = httpx.get(f"{server.url}/metrics").text
    server.stop()
    all_ready = next((t for t, r, n in trace["compiled_ready"] if n and r == n), None)
    series = windows(trace["completions"], first_token_s)
    steady_from = all_ready if all_ready is not None else first_token_s
    steady = [w["tokens_per_s"] for w in series if w["start_s"] >= steady_from]
    result = {"variant": name, "health_s": health_s, "first_token_s": first_token_s, "all_ready_s": all_ready,
              "steady_tokens_per_s": statistics.median(steady) if steady else None, "windows": series,
              "compiled_ready": trace["compiled_ready"], "compiled_at_end": health["compiled"],
              "decode_steps": {path: _metric(metrics, path) for path in ("compiled", "eager")}}
    print(json.dumps({k: v for k, v in result.items() if k not in ("windows", "compiled_ready")}), flush=True)
    return result


def _metric(text: str, path: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f'matta_decode_steps_total{{path="{path}"}}'):
            return float(line.split()[-1])
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    widths = [ckpt.config.width_names[0], ckpt.config.width_names[-1]]
    prompts, _ = make_prompts(ckpt, widths, args.prompt_tokens, args.max_tokens)
    models = [f"{ckpt.config.name}:{w}" for w in widths]
    results = {"checkpoint": str(args.checkpoint), "clients": args.clients, "max_tokens": args.max_tokens,
               "threads": args.threads, "models": models, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="matta-compile-") as tmp:
        work = Path(tmp)
        cache = work / "cache"  # empty: the cold run fills it, the warm runs reuse it
        for name in args.variants:
            results["variants"][name] = run_variant(name, args, cache, models, prompts, work)
    eager = results["variants"].get("off", {}).get("steady_tokens_per_s")
    for v in results["variants"].values():
        v["steady_over_eager"] = v["steady_tokens_per_s"] / eager if eager and v["steady_tokens_per_s"] else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({n: {k: v[k] for k in ("health_s", "first_token_s", "all_ready_s", "steady_tokens_per_s",
                                            "steady_over_eager")} for n, v in results["variants"].items()}, indent=1))
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_r) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for i, (name, v) in enumerate(results["variants"].items()):
        ws = v["windows"]
        ax_t.step([w["start_s"] for w in ws], [w["tokens_per_s"] for w in ws], where="post", color=f"C{i}",
                  label=f"{name} (first token {v['first_token_s']:.1f} s)")
        ax_t.axvline(v["first_token_s"], color=f"C{i}", linestyle=":", linewidth=0.8)
        ready = v["compiled_ready"]
        ax_r.step([t for t, _, _ in ready], [r for _, r, _ in ready], where="post", color=f"C{i}", label=name)
    ax_t.set(ylabel="tokens/s (10 s windows)", title=f"matta serve from process start, {results['clients']} "
             f"clients ({' / '.join(results['models'])})")
    ax_r.set(xlabel="seconds since process start", ylabel="compiled step signatures loaded")
    ax_t.legend(fontsize=8)
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
