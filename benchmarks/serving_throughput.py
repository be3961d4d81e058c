"""Serving throughput: the matta HTTP server against HF transformers ``generate``, same widths, same run.

Measured, per width (default: the checkpoint's Student and full/TA width), in one process tree
on one machine, with the same torch thread count on both sides:

* **matta**: a real ``matta serve CKPT --port 0 --threads T`` subprocess (the command users run),
  loaded once for every width. Closed-loop async httpx clients at each concurrency c (1, 4, 16):
  each client sends ``--requests-per-client`` non-streaming greedy requests back to back
  (``temperature: 0``, fixed ``max_tokens``), pinned with ``model: "<name>:<width>"``.
  Throughput = sum of ``usage.completion_tokens`` / wall time from the first send to the last
  response. Latency = the round trip each client sees (HTTP, JSON and queueing included).
* **HF one-at-a-time**: the same width exported with ``matta.hf.export_width`` and loaded as a
  plain ``GPT2LMHeadModel``; ``generate(do_sample=False, max_new_tokens=M)`` over the prompts of
  the 1-client run, one after another, under ``torch.inference_mode``. A serial server's
  throughput does not depend on c; its latency at c clients is reported from a FIFO queue
  *simulated* from the measured service times (labelled so in the JSON), since a one-at-a-time
  server makes the c-th waiting client wait for everyone ahead of it.
* **HF static batching**: for each c > 1, the same c x requests-per-client prompts as the matta
  c-client run, in batches of c (left padding, pad = eos, attention mask) through ``generate``;
  every request in a batch has the batch's latency. At c = 1 static batching is one-at-a-time.
* **Decode speed per width vs the FLOP ratio**: the engine (``serving.engine.inproc.Engine``, in
  process, no HTTP) decodes a batch of ``--decode-batch`` (16) prompts submitted together, so
  they prefill in one step and then decode in lock-step; decode tokens/s = tokens after the
  first / (time of the last step - time of the prefill step), from the engine's own event
  timestamps. The measured Student/TA speed-up is compared with
  ``flops_per_token(ta) / flops_per_token(s)`` at the mean attended context of the decode
  (prompt + max_tokens/2); the ratio at the config's default context is reported too. A bare
  model decode step at the same batch and context (no engine) is timed beside it, to separate
  engine overhead from how the hardware scales with FLOPs. The 16-client HTTP ratio is also given.

Prompts are real text: windows of exactly ``--prompt-tokens`` tokens of the English (Shakespeare)
passages in ``TEXT`` below, tokenized with the checkpoint's own tokenizer and sent to both sides as
token ids, so both sides see identical inputs. The server has no ``ignore_eos``, so generation
length is made fixed by screening: each candidate window is greedy-decoded in process at every
benchmarked width and only windows whose first ``--max-tokens`` greedy tokens contain no
end-of-text are kept. Reported token counts are still the actual ones (``usage`` for matta,
tokens up to and including the first end-of-text for HF), and the JSON records how many requests
stopped early. Equal-length prompts also mean HF's static batches carry no padding waste.

Fairness: the server is started once (it stays idle, its engine thread blocked, while HF runs);
phases are interleaved per repeat (width order and system order rotate), each configuration is
repeated ``--repeats`` times and the median throughput is reported; latency percentiles pool the
requests of all repeats (with few requests p99 is close to the maximum). matta pays for HTTP, JSON
and its asyncio clients (which run in this process, on the same cores); HF runs in process with
no serving layer at all, so the comparison is conservative for matta. As a sanity check, the
matta text at 1 client is compared with the HF one-at-a-time greedy text (agreement fraction).

    python -m benchmarks.serving_throughput [--checkpoint checkpoints/default] [--threads 2]
    python -m benchmarks.serving_throughput --checkpoint /tmp/tiny --quick --threads 1   # smoke run

With the defaults (prompt 64 + 64 tokens, 16 requests per client, 3 repeats) the default-size
model (d_model 128, 4 layers) takes about 2-3 minutes on an otherwise idle 2-core machine; other
CPU load on the machine slows it and, worse, skews it, so run it on a quiet machine.

Writes ``--out``.json (raw numbers, settings, machine) and ``--out``.png, and prints a markdown
table for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.client import RUNS
from benchmarks.harness import Server, make_prompts, model_decode_step, save_png
from matta.checkpoint import Checkpoint, load_checkpoint
from matta.hf import export_width, load_hf_gpt2
from serving.engine.inproc import Engine
from serving.messages import Sampling

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


# --- settings --------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    parser.add_argument("--widths", nargs="+", help="default: the checkpoint's Student and full width")
    parser.add_argument("--clients", type=int, nargs="+", help="concurrent clients (default 1 4 16)")
    parser.add_argument("--requests-per-client", type=int, help="closed-loop requests per client (default 16)")
    parser.add_argument("--prompt-tokens", type=int, help="tokens per prompt (default 64)")
    parser.add_argument("--max-tokens", type=int, help="generated tokens per request (default 64)")
    parser.add_argument("--repeats", type=int, help="repeats of every configuration (default 3)")
    parser.add_argument("--decode-batch", type=int, help="batch of the engine decode measurement (default 16)")
    parser.add_argument("--decode-repeats", type=int, help="repeats of the decode measurement (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the server and for HF")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (explicit flags win)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_throughput")
    args = parser.parse_args(argv)
    full = dict(clients=[1, 4, 16], requests_per_client=16, prompt_tokens=64, max_tokens=64, repeats=3,
                decode_batch=16, decode_repeats=5)
    quick = dict(clients=[1, 4, 16], requests_per_client=1, prompt_tokens=16, max_tokens=16, repeats=1,
                 decode_batch=16, decode_repeats=2)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("requests_per_client", "prompt_tokens", "max_tokens", "repeats", "decode_batch", "decode_repeats",
                "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if any(c < 1 for c in args.clients):
        parser.error("--clients must be >= 1")
    args.clients = sorted(set(args.clients))
    return args


# --- prompts ---------------------------------------------------------------------------------


def assignments(pool: list[list[int]], clients: int, per_client: int) -> list[list[list[int]]]:
    """Prompts of each closed-loop client: client j's k-th request is pool[(j * per_client + k) % len(pool)]."""
    return [[pool[(j * per_client + k) % len(pool)] for k in range(per_client)] for j in range(clients)]


# --- matta: a real server and closed-loop HTTP clients -----------------------------------------


async def closed_loop(url: str, model_id: str, width: str, plan: list[list[list[int]]], max_tokens: int) -> dict:
    """Each client of ``plan`` sends its prompts one after another; all clients run at once."""
    import httpx

    n = len(plan)
    latencies: list[float] = []
    tokens: list[int] = []
    reasons: dict[str, int] = {}
    texts: list[str] = []  # in plan order for a single client (used for the greedy agreement check)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def one_client(prompts: list[list[int]]) -> None:
            for ids in prompts:
                body = {"model": model_id, "prompt": ids, "max_tokens": max_tokens, "temperature": 0}
                t0 = time.perf_counter()
                r = await client.post("/v1/completions", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"POST /v1/completions -> {r.status_code}: {r.text[:500]}")
                if r.headers.get("x-matta-width") != width:
                    raise RuntimeError(f"asked for width {width}, served {r.headers.get('x-matta-width')}")
                data = r.json()
                tokens.append(data["usage"]["completion_tokens"])
                reason = data["choices"][0]["finish_reason"]
                reasons[reason] = reasons.get(reason, 0) + 1
                texts.append(data["choices"][0]["text"])

        start = time.perf_counter()
        await asyncio.gather(*(one_client(p) for p in plan))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "latencies_s": latencies, "completion_tokens": tokens, "finish_reasons": reasons,
            "texts": texts if n == 1 else None}


# --- HF transformers -------------------------------------------------------------------------


def _generated(row: list[int], eos: int) -> list[int]:
    """Generated ids up to and including the first end-of-text (what HF stops at, as matta does)."""
    return row[: row.index(eos) + 1] if eos in row else row


@torch.inference_mode()
def hf_one_at_a_time(model, prompts: list[list[int]], max_tokens: int, eos: int) -> dict:
    latencies, tokens, outputs = [], [], []
    start = time.perf_counter()
    for ids in prompts:
        t0 = time.perf_counter()
        x = torch.tensor([ids], dtype=torch.long)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=max_tokens, pad_token_id=eos, eos_token_id=eos)
        latencies.append(time.perf_counter() - t0)
        row = _generated(out[0, x.shape[1]:].tolist(), eos)
        tokens.append(len(row))
        outputs.append(row)
    return {"wall_s": time.perf_counter() - start, "latencies_s": latencies, "completion_tokens": tokens,
            "outputs": outputs}


@torch.inference_mode()
def hf_static_batches(model, hf_tok, batches: list[list[list[int]]], max_tokens: int, eos: int) -> dict:
    latencies, tokens = [], []
    start = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        enc = hf_tok.pad({"input_ids": batch}, padding=True, return_tensors="pt")  # left padding, pad = eos
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_tokens, pad_token_id=eos, eos_token_id=eos)
        dt = time.perf_counter() - t0
        width = enc["input_ids"].shape[1]
        for row in out[:, width:].tolist():
            latencies.append(dt)
            tokens.append(len(_generated(row, eos)))
    return {"wall_s": time.perf_counter() - start, "latencies_s": latencies, "completion_tokens": tokens}


def simulate_serial_queue(service_s: list[float], clients: int, per_client: int) -> list[float]:
    """Latencies of ``clients`` closed-loop clients against a one-at-a-time FIFO server with these service times."""
    queue = [(0.0, j) for j in range(clients)]  # (enqueue time, client)
    left = [per_client] * clients
    now, k, latencies = 0.0, 0, []
    while queue:
        enqueued, j = queue.pop(0)
        now = max(now, enqueued) + service_s[k % len(service_s)]
        k += 1
        latencies.append(now - enqueued)
        left[j] -= 1
        if left[j]:
            queue.append((now, j))
    return latencies


# --- decode speed per width ------------------------------------------------------------------


async def _engine_decode_once(engine: Engine, prompts: list[list[int]], width: str, max_tokens: int) -> dict:
    stream = engine.submit(prompts, width, Sampling(max_tokens=max_tokens, temperature=0.0))
    first: dict[int, float] = {}
    last, total = 0.0, 0
    async for index, event in stream:
        if event.token_ids:
            total += len(event.token_ids)
            first.setdefault(index, event.time)
            last = max(last, event.time)
    t0 = max(first.values())  # all rows prefill in one step, so their first tokens share one timestamp
    decoded = total - len(first)
    return {"decode_tokens": decoded, "decode_s": last - t0, "tokens_per_s": decoded / (last - t0) if last > t0 else None}


def engine_decode(ckpt: Checkpoint, widths: list[str], prompts: list[list[int]], max_tokens: int,
                  repeats: int) -> dict[str, list[dict]]:
    """Engine decode tokens/s per width at batch len(prompts), widths interleaved (order rotates)."""
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=len(prompts), max_queue=len(prompts))
    engine.start()

    async def run() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {w: [] for w in widths}
        for w in widths:  # warm-up
            await _engine_decode_once(engine, prompts, w, min(4, max_tokens))
        for r in range(repeats):
            for w in widths[r % len(widths):] + widths[: r % len(widths)]:
                out[w].append(await _engine_decode_once(engine, prompts, w, max_tokens))
        return out

    try:
        return asyncio.run(run())
    finally:
        engine.stop()


# --- the run ----------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _stats(runs: list[dict]) -> dict:
    """Median tokens/s over repeats; latency percentiles over every request of every repeat."""
    tps = [sum(r["completion_tokens"]) / r["wall_s"] for r in runs]
    lat = [x * 1e3 for r in runs for x in r["latencies_s"]]
    toks = [t for r in runs for t in r["completion_tokens"]]
    return {"tokens_per_s": statistics.median(tps), "tokens_per_s_repeats": tps,
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "requests": len(lat),
            "completion_tokens": {"total": sum(toks), "min": min(toks), "max": max(toks)},
            "wall_s_repeats": [r["wall_s"] for r in runs]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.checkpoint / "manifest.json").is_file():
        print(f"serving_throughput: no checkpoint at {args.checkpoint} (no manifest.json). Train one with "
              "`matta train configs/default.yaml` or pass --checkpoint DIR.", file=sys.stderr)
        return 2
    import httpx
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    t_start = time.perf_counter()

    ckpt = load_checkpoint(args.checkpoint)
    config = ckpt.config
    widths = args.widths or list(dict.fromkeys([config.student_width, config.full_width]))
    for w in widths:
        if w not in config.widths:
            print(f"serving_throughput: unknown width {w!r}; known: {config.width_names}", file=sys.stderr)
            return 2
    widths = sorted(widths, key=config.widths.__getitem__)
    P, M, rpc = args.prompt_tokens, args.max_tokens, args.requests_per_client
    if P + M > config.n_ctx:
        print(f"serving_throughput: prompt {P} + max_tokens {M} exceeds the context window {config.n_ctx}",
              file=sys.stderr)
        return 2
    eos = config.eos_token_id
    pool, prompt_info = make_prompts(ckpt, widths, P, M)
    print(f"{config.name}: widths {widths}, {len(pool)} prompts of {P} tokens "
          f"({prompt_info['dropped_for_early_eos']} of {prompt_info['candidates']} dropped for early end-of-text), "
          f"max_tokens {M}, threads {args.threads}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="serving_throughput."))
    hf: dict[str, tuple] = {}
    for w in widths:
        path = export_width(ckpt, w, work / f"hf-{w}")
        model = load_hf_gpt2(path).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        tok.padding_side = "left"
        tok.pad_token = tok.eos_token
        hf[w] = (model, tok)

    raw: list[dict] = []
    server = Server(args.checkpoint, args.threads, max_batch=max(32, max(args.clients)), log_path=work / "server.log")
    try:
        url = server.start()
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        name = next(m["id"] for m in models if m.get("parent") is None)
        # Warm-up: both sides, every width and batch size, a few tokens.
        for w in widths:
            asyncio.run(closed_loop(url, f"{name}:{w}", w, assignments(pool, max(args.clients), 1), 4))
            hf_one_at_a_time(hf[w][0], pool[:1], 4, eos)
            for c in args.clients:
                if c > 1:
                    hf_static_batches(hf[w][0], hf[w][1], [[pool[j % len(pool)] for j in range(c)]], 4, eos)
        systems = ["matta", "hf_single", "hf_static"]
        for r in range(args.repeats):
            for w in widths[r % len(widths):] + widths[: r % len(widths)]:
                model, tok = hf[w]
                for system in systems[r % 3:] + systems[: r % 3]:
                    if system == "matta":
                        for c in args.clients:
                            res = asyncio.run(closed_loop(url, f"{name}:{w}", w, assignments(pool, c, rpc), M))
                            raw.append({"repeat": r, "width": w, "system": "matta", "clients": c, **res})
                    elif system == "hf_single":
                        res = hf_one_at_a_time(model, assignments(pool, 1, rpc)[0], M, eos)
                        raw.append({"repeat": r, "width": w, "system": "hf_single", "clients": 1, **res})
                    else:
                        for c in args.clients:
                            if c > 1:
                                plan = assignments(pool, c, rpc)
                                batches = [[plan[j][k] for j in range(c)] for k in range(rpc)]
                                res = hf_static_batches(model, tok, batches, M, eos)
                                raw.append({"repeat": r, "width": w, "system": "hf_static", "clients": c, **res})
                print(f"repeat {r + 1}/{args.repeats} width {w}: done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    finally:
        exit_code = server.stop()
        server_log = (work / "server.log").read_text()[-2000:] if (work / "server.log").exists() else ""
    del hf

    decode_prompts = [pool[i % len(pool)] for i in range(args.decode_batch)]
    decode_raw = engine_decode(ckpt, widths, decode_prompts, M, args.decode_repeats)
    context = P + M // 2
    step_raw = model_decode_step(ckpt.model, widths, args.decode_batch, context, args.decode_repeats)["eager"]
    shutil.rmtree(work, ignore_errors=True)

    # --- summaries
    results: dict = {
        "checkpoint": str(args.checkpoint), "model": config.name, "widths_benchmarked": widths,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
        "server": {"command": " ".join(server.cmd[1:]).replace("-m cli", "matta"), "exit_code_after_sigterm": exit_code},
        "prompts": prompt_info, "widths": {}, "decode": {},
        "runtime_s": None,
    }
    for w in widths:
        runs = [x for x in raw if x["width"] == w]
        single = [x for x in runs if x["system"] == "hf_single"]
        single_stats = _stats(single)
        service = [x for r in single for x in r["latencies_s"]]
        row: dict = {"ffn": config.widths[w], "flops_per_token": config.flops_per_token(w, context=context),
                     "hf_one_at_a_time": single_stats, "clients": {}}
        agree = None
        m1 = [x for x in runs if x["system"] == "matta" and x["clients"] == 1]
        if m1 and single:
            hf_texts = [ckpt.tokenizer.decode([t for t in o if t != eos]) for o in single[0]["outputs"]]
            agree = sum(a == b for a, b in zip(m1[0]["texts"], hf_texts, strict=True)) / len(hf_texts)
        row["greedy_text_agreement_matta_vs_hf"] = agree
        for c in args.clients:
            mruns = [x for x in runs if x["system"] == "matta" and x["clients"] == c]
            m = _stats(mruns)
            m["finish_reasons"] = {}
            for x in mruns:
                for k, v in x["finish_reasons"].items():
                    m["finish_reasons"][k] = m["finish_reasons"].get(k, 0) + v
            sim = simulate_serial_queue(service, c, rpc)
            entry = {"matta": m,
                     "hf_one_at_a_time_simulated_queue": {"p50_ms": _pct(sim, 50) * 1e3, "p99_ms": _pct(sim, 99) * 1e3,
                                                          "note": "FIFO queue simulated from measured service times"},
                     "speedup_vs_hf_one_at_a_time": m["tokens_per_s"] / single_stats["tokens_per_s"]}
            if c > 1:
                s = _stats([x for x in runs if x["system"] == "hf_static" and x["clients"] == c])
                entry["hf_static"] = s
                entry["speedup_vs_hf_static"] = m["tokens_per_s"] / s["tokens_per_s"]
            else:
                entry["speedup_vs_hf_static"] = entry["speedup_vs_hf_one_at_a_time"]
            row["clients"][str(c)] = entry
        results["widths"][w] = row

    for w in widths:
        tps = [d["tokens_per_s"] for d in decode_raw[w] if d["tokens_per_s"]]
        results["decode"][w] = {"engine_tokens_per_s": statistics.median(tps), "engine_tokens_per_s_repeats": tps,
                                "engine_decode_runs": decode_raw[w], "model_step": step_raw[w],
                                "flops_per_token": config.flops_per_token(w, context=context)}
    results["decode"]["batch"] = args.decode_batch
    results["decode"]["context_for_flops"] = context
    cmax = str(max(args.clients))
    goals: dict = {"speedup_vs_hf_one_at_a_time_at_max_clients": {
        w: results["widths"][w]["clients"][cmax]["speedup_vs_hf_one_at_a_time"] for w in widths}}
    goals["at_least_4x_hf_one_at_a_time"] = all(v >= 4 for v in goals["speedup_vs_hf_one_at_a_time_at_max_clients"].values())
    if len(widths) > 1:
        s, ta = widths[0], widths[-1]
        d = results["decode"]
        predicted = config.flops_per_token(ta, context=context) / config.flops_per_token(s, context=context)
        measured = d[s]["engine_tokens_per_s"] / d[ta]["engine_tokens_per_s"]
        http = (results["widths"][s]["clients"][cmax]["matta"]["tokens_per_s"]
                / results["widths"][ta]["clients"][cmax]["matta"]["tokens_per_s"])
        d["student_over_ta"] = {
            "student": s, "ta": ta, "predicted_speedup_flops": predicted,
            "predicted_speedup_flops_default_context": config.flops_per_token(ta) / config.flops_per_token(s),
            "engine_measured_speedup": measured, "engine_measured_over_predicted": measured / predicted,
            "model_step_measured_speedup": d[ta]["model_step"]["median_step_ms"] / d[s]["model_step"]["median_step_ms"],
            f"http_{cmax}_clients_measured_speedup": http,
        }
        st = d["student_over_ta"]
        st["model_step_measured_over_predicted"] = st["model_step_measured_speedup"] / predicted
        goals["decode_speedup_measured_over_predicted"] = measured / predicted
        goals["at_least_0.9_of_predicted"] = measured / predicted >= 0.9
    results["goals"] = goals
    results["runtime_s"] = time.perf_counter() - t_start
    # Per-request latencies are big: under runs/ (ignored by git), not in the committed summary.
    rows = RUNS / "bench" / f"{args.out.name}_runs.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    rows.write_text("".join(json.dumps({k: v for k, v in x.items() if k not in ("texts", "outputs")}) + "\n"
                            for x in raw))
    if exit_code != 0:
        results["server"]["log_tail"] = server_log

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print()
    print(markdown(results))
    print(f"\nwrote {args.out.with_suffix('.json')} and .png in {results['runtime_s']:.0f} s "
          f"(server exit code after SIGTERM: {exit_code})")
    return 0


# --- reporting --------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    lines = ["| width | clients | matta tok/s | p50 ms | p99 ms | HF 1-at-a-time tok/s | HF static tok/s "
             "| HF static p50 ms | x HF 1-at-a-time | x HF static |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w, row in results["widths"].items():
        single = row["hf_one_at_a_time"]["tokens_per_s"]
        for c, e in row["clients"].items():
            m = e["matta"]
            static = e.get("hf_static")
            static_cells = (f"{static['tokens_per_s']:.0f} | {static['p50_ms']:.0f}" if static
                            else f"(= 1-at-a-time) | {row['hf_one_at_a_time']['p50_ms']:.0f}")
            lines.append(f"| {w} | {c} | {m['tokens_per_s']:.0f} | {m['p50_ms']:.0f} | {m['p99_ms']:.0f} | {single:.0f} | "
                         f"{static_cells} | {e['speedup_vs_hf_one_at_a_time']:.2f}x | {e['speedup_vs_hf_static']:.2f}x |")
    d = results["decode"]
    lines += ["", f"| width | FFN | MFLOP/token | engine decode tok/s (batch {d['batch']}) | bare model step ms |",
              "|---|---:|---:|---:|---:|"]
    for w in results["widths_benchmarked"]:
        lines.append(f"| {w} | {results['widths'][w]['ffn']} | {d[w]['flops_per_token'] / 1e6:.2f} | "
                     f"{d[w]['engine_tokens_per_s']:.0f} | {d[w]['model_step']['median_step_ms']:.2f} |")
    if "student_over_ta" in d:
        st = d["student_over_ta"]
        lines += ["", f"Student/TA decode speed-up: measured {st['engine_measured_speedup']:.2f}x (engine), "
                      f"{st['model_step_measured_speedup']:.2f}x (bare model step); FLOP-ratio prediction "
                      f"{st['predicted_speedup_flops']:.2f}x; measured/predicted {st['engine_measured_over_predicted']:.2f} "
                      f"(goal >= 0.9)."]
    g = results["goals"]
    lines.append("Goal >= 4x HF one-at-a-time at the most clients: " + ", ".join(
        f"{w} {v:.2f}x" for w, v in g["speedup_vs_hf_one_at_a_time_at_max_clients"].items()) +
        f" ({'met' if g['at_least_4x_hf_one_at_a_time'] else 'not met'}).")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_tps, ax_dec), (ax_p50, ax_p99) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (w, row) in enumerate(results["widths"].items()):
        color = colors[i % len(colors)]
        cs = [int(c) for c in row["clients"]]
        ent = [row["clients"][str(c)] for c in cs]
        single = row["hf_one_at_a_time"]
        static = [e["hf_static"] if "hf_static" in e else single for e in ent]
        ax_tps.plot(cs, [e["matta"]["tokens_per_s"] for e in ent], "o-", color=color, label=f"matta {w}")
        ax_tps.plot(cs, [s["tokens_per_s"] for s in static], "s--", color=color, alpha=0.7, label=f"HF static {w}")
        ax_tps.plot(cs, [single["tokens_per_s"]] * len(cs), ":", color=color, alpha=0.7, label=f"HF 1-at-a-time {w}")
        for ax, key in ((ax_p50, "p50_ms"), (ax_p99, "p99_ms")):
            ax.plot(cs, [e["matta"][key] for e in ent], "o-", color=color, label=f"matta {w}")
            ax.plot(cs, [s[key] for s in static], "s--", color=color, alpha=0.7, label=f"HF static {w}")
            ax.plot(cs, [e["hf_one_at_a_time_simulated_queue"][key] for e in ent], ":", color=color, alpha=0.7,
                    label=f"HF 1-at-a-time {w} (simulated queue)")
    for ax, title, ylabel in ((ax_tps, "generated tokens/s", "tokens/s"), (ax_p50, "p50 request latency", "ms"),
                              (ax_p99, "p99 request latency", "ms")):
        ax.set_xscale("log", base=2)
        cs = [int(c) for c in next(iter(results["widths"].values()))["clients"]]
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set(title=title, xlabel="concurrent clients", ylabel=ylabel)
        ax.legend(fontsize=7)
    ax_p50.set_yscale("log")
    ax_p99.set_yscale("log")
    d = results["decode"]
    widths = results["widths_benchmarked"]
    measured = [d[w]["engine_tokens_per_s"] for w in widths]
    bare = [d[w]["model_step"]["tokens_per_s"] for w in widths]
    x = np.arange(len(widths))
    ax_dec.bar(x - 0.27, measured, width=0.27, label="engine decode (measured)")
    ax_dec.bar(x, bare, width=0.27, label="bare model step (measured)", color="tab:gray")
    ref = widths[-1]
    predicted = [d[ref]["engine_tokens_per_s"] * d[ref]["flops_per_token"] / d[w]["flops_per_token"] for w in widths]
    ax_dec.bar(x + 0.27, predicted, width=0.27, label=f"FLOP-ratio prediction from {ref}", color="none",
               edgecolor="black", hatch="//")
    ax_dec.set_xticks(list(x), [f"{w}\n(ffn {results['widths'][w]['ffn']})" for w in widths])
    ax_dec.set(title=f"decode tokens/s at batch {d['batch']}", ylabel="tokens/s")
    ax_dec.legend(fontsize=7)
    s = results["settings"]
    fig.suptitle(f"{results['model']}: matta serve vs HF generate, prompt {s['prompt_tokens']} + {s['max_tokens']} "
                 f"tokens, torch threads={results['threads']}, {results['machine']['cpus']} CPUs")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
