"""How well the latency model prices decode steps of each width class, per class against pooled, one run.

The engine (``EngineCore``, compiled steps as ``--compile`` says, ``--calibrate on``) serves rounds
of pinned requests the way mixed traffic arrives: a batch all at the Student, then all at the TA,
then half and half, then every width, at 2..32 rows, repeated. Two latency models see the same
profile (measured at the start of the run) and the same observations, calibration included:

- **per class**, as shipped (:mod:`router.latency`): one correction per path, batch bucket and
  width class (the step's one width, or "mixed");
- **pooled**, the peer and the model it replaced: one correction per path and batch bucket, shared
  by every width class.

For every decode step, each model's prediction is taken before the step is observed; the report is
measured / predicted per (class, bucket) (and measured / the eager profile: what a class's
correction must learn) and its spread per model: the median absolute log error
and the 10th-90th percentiles. A ratio under 1 means the step was priced slower than it ran (the
scheduler refuses what it could serve); over 1, faster (it promises what it then serves late).

    python -m benchmarks.step_corrections [--compile require] [--rounds 3]

Writes ``benchmarks/results/step_corrections.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

from benchmarks.harness import save_png
from matta.checkpoint import load_checkpoint
from router.latency import MIXED, STEP_RISE, LatencyModel, batch_bucket, width_class
from serving import messages as msg
from serving.engine.core import EngineCore
from serving.worker.compiled import COMPILE_MODES, DecodeSteps
from serving.worker.profile import profile_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"


def pooled_observe(model: LatencyModel, groups, path: str, seconds: float) -> None:
    """Feed ``model`` an observation as the pooled peer learns it: every width class in one factor
    per path and batch bucket (kept in the "mixed" class's slot, which the peer alone reads)."""
    raw = model.profiled_step_s(groups)
    batch = sum(b for b, _ in groups.values())
    ewma = model._step[path, batch_bucket(batch), MIXED]
    if not ewma.samples:
        ewma.value = model.step_factor(path, batch, MIXED)
    ewma.update(seconds / raw if raw > 0 else float("nan"), model.alpha, rise=STEP_RISE)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"))
    p.add_argument("--compile", choices=COMPILE_MODES, default="require",
                   help="require: every compiled step loaded (or compiled) before the rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=12, help="tokens per request (decode steps per batch)")
    p.add_argument("--out", type=Path, default=RESULTS / "step_corrections")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    shipped = profile_model(ckpt.model)
    pooled = LatencyModel.from_json(shipped.to_json())
    steps = DecodeSteps(ckpt.model, args.compile, max_batch=32, checkpoint=args.checkpoint)
    core = EngineCore(ckpt.model, ckpt.tokenizer, max_batch=32, max_queue=256, latency=shipped, steps=steps)
    steps.start()
    records = []
    observe = shipped.observe_step

    def both(groups, path, seconds):
        """Each model's prediction of this step, then both learn it (the peer pooled)."""
        batch = sum(b for b, _ in groups.values())
        pooled_pred = pooled.profiled_step_s(groups) * pooled.step_factor(path, batch, MIXED)
        records.append({"class": width_class(groups), "batch": batch, "path": path, "seconds": seconds,
                        "over_profile": seconds / shipped.profiled_step_s(groups),
                        "per_class": seconds / shipped.step_s(groups, path), "pooled": seconds / pooled_pred,
                        "calibrating": calibrating})
        observe(groups, path, seconds)
        pooled_observe(pooled, groups, path, seconds)

    shipped.observe_step = both
    widths = ckpt.config.served_widths
    student, ta = widths[0], widths[-1]
    ids = iter(range(1, 1 << 30))
    prompt = list(range(1, 17))
    with torch.inference_mode():
        calibrating = True
        core.calibrate()
        calibrating = False
        for _ in range(args.rounds):
            for rows in (2, 4, 8, 16, 32):
                for mix in ([student], [ta], [student, ta], widths):
                    for i in range(rows):
                        core.add(msg.Add(next(ids), [prompt], (mix[i % len(mix)],),
                                         msg.Sampling(max_tokens=args.tokens, temperature=0.0), msg.NO_SLO,
                                         time.monotonic(), stream=False))
                    while core.scheduler.waiting or core.scheduler.running:
                        core.step()
    served = [r for r in records if not r["calibrating"]]
    table = collections.defaultdict(lambda: {"per_class": [], "pooled": [], "over_profile": []})
    for r in served:
        key = f"{r['path']}:{r['class']}:b{1 << batch_bucket(r['batch'])}"
        for model in ("per_class", "pooled", "over_profile"):
            table[key][model].append(r[model])
    summary = {}
    for model in ("per_class", "pooled"):
        ratios = [r[model] for r in served]
        summary[model] = {"median_abs_log_error": statistics.median(abs(math.log(x)) for x in ratios),
                          "p10_p90": [float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90))],
                          "steps": len(ratios)}
        print(f"{model:9s}: measured/predicted p10-p90 {summary[model]['p10_p90'][0]:.2f}-"
              f"{summary[model]['p10_p90'][1]:.2f}, median |log error| {summary[model]['median_abs_log_error']:.3f}")
    cells = {k: {m: statistics.median(v[m]) for m in v} | {"steps": len(v["per_class"])} for k, v in sorted(table.items())}
    for k, v in cells.items():
        print(f"  {k:22s} {v['steps']:3d} steps: measured/profiled {v['over_profile']:.2f}; "
              f"measured/predicted per class {v['per_class']:.2f}, pooled {v['pooled']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"compile": args.compile, "rounds": args.rounds, "tokens": args.tokens, "widths": widths,
         "mixed_factor": shipped.mixed_factor, "summary": summary, "cells": cells}, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(10, 4))
    keys = list(cells)
    x = np.arange(len(keys))
    ax.bar(x - 0.2, [cells[k]["per_class"] for k in keys], 0.4, label="per width class (shipped)")
    ax.bar(x + 0.2, [cells[k]["pooled"] for k in keys], 0.4, label="pooled per bucket (peer)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, keys, rotation=70, fontsize=7)
    ax.set_ylabel("measured / predicted step (median)")
    ax.legend()
    fig.tight_layout()
    save_png(fig, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
