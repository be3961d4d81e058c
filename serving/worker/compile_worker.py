"""The background compile worker (``python -m serving.worker.compile_worker``): compiles the decode
steps the cache lacks, in its own nice'd process, and tells the engine each one it saved.

Started by :class:`serving.worker.compiled.DecodeSteps` in ``compile="background"`` mode; one JSON line
per signature on stdout (``{"index": i, "compile_s": s}``, or ``{"fault": kind, ...}`` for a step it
could not save)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from matta.checkpoint import DTYPES, load_checkpoint
from serving.lifecycle import die_with_parent
from serving.worker.compile_cache import CacheFault, artifact_path, check_private
from serving.worker.compiled import compile_step, configure, representative_rows, rows_signature


def main(argv: list[str] | None = None) -> int:
    """The background compile worker: compile and save the given signatures, one JSON line each."""
    die_with_parent()  # a compile takes minutes: it must not outlive the engine that asked for it
    p = argparse.ArgumentParser(prog="python -m serving.worker.compile_worker", description=main.__doc__)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--max-batch", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", type=Path, required=True, help="the architecture's directory (cache_dir_for)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the engine's weights' dtype")
    p.add_argument("--only", help="comma-separated indices into representative_rows (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    check_private(args.cache_dir)
    configure(args.cache_dir)
    model = load_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype).model.eval()
    rows = representative_rows(model.config, args.max_batch)
    indices = [int(i) for i in args.only.split(",")] if args.only else range(len(rows))
    for index in indices:
        started = time.perf_counter()
        path = artifact_path(args.cache_dir, rows_signature(model.config, rows[index]), model.wte.weight.device,
                             model.wte.weight.dtype)
        try:
            compile_step(model, rows[index], path)
        except CacheFault as fault:  # told to the engine, which keeps this signature eager; try the rest
            print(json.dumps({"fault": fault.kind, "path": str(path), "error": fault.message}), flush=True)
            continue
        print(json.dumps({"index": index, "compile_s": round(time.perf_counter() - started, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
