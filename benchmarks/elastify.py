"""What elastify buys: held-out perplexity per width of the shipped dense teacher made elastic.

The shipped dense teacher (``checkpoints/teacher``, d_model 256, 4 layers, FFN 1024) is exported
to a HF GPT-2 directory first, so the import path is the one users take, then, at widths
128 / 256 / 512 / 1024 (s / m / l / ta):

(a) the original unit order, sliced as is;
(b) each importance order (``training.elastify.CRITERIA``), no training;
(c) (b) with the default criterion after a short MatTA fine-tune (``configs/elastify.yaml``:
    ``init_from`` the elastified checkpoint, the original model as the frozen teacher);
(d) the same widths trained by MatTA from scratch with the same compute
    (``configs/elastify-scratch.yaml``: same steps, batch, tokens, loss and teacher).

Test split (4 held-out plays), every width. The training runs are skipped when their
checkpoints exist and resume when interrupted; each writes its log under runs/elastify/.

    python -m benchmarks.elastify            # ~45 min on 2 cores, most of it the two training runs

Writes ``--out``.json and ``--out``.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.harness import save_png
from matta.checkpoint import load_checkpoint, sha256_file
from matta.hf import export_width
from training.config import load_train_config
from training.data import TokenData
from training.elastify import CRITERIA, DEFAULT_CRITERION, calibration_batches, elastify, elastify_model, load_dense
from training.evaluate import perplexity, width_logits_fn
from training.trainer import train

WIDTHS = {"s": 128, "m": 256, "l": 512, "ta": 1024}


def width_ppl(model, tokens, window: int, max_windows: int | None) -> dict[str, float]:
    """Test perplexity of every named width of ``model``."""
    return {w: perplexity(width_logits_fn(model, w), tokens, window, max_windows=max_windows)
            for w in model.config.width_names}


def run(args: argparse.Namespace) -> dict:
    data = TokenData(args.data)
    test = data.tokens("test")
    hf_dir = export_width(load_checkpoint(args.teacher), "full", args.hf_dir)
    dense, _, source, _ = load_dense(hf_dir)
    window = dense.config.n_ctx
    batches = calibration_batches(data.tokens("train"), args.calibration_tokens, min(256, window), seed=0)
    series: dict[str, dict] = {}
    for criterion in CRITERIA:
        started = time.perf_counter()
        model, _ = elastify_model(dense, WIDTHS, criterion, batches)
        key = "a_original_order" if criterion == "original" else f"b_{criterion}"
        series[key] = {"criterion": criterion, "steps": 0, "ppl": width_ppl(model, test, window, args.eval_windows),
                       "seconds": time.perf_counter() - started}
        print(f"{key}: {series[key]['ppl']}", flush=True)

    finetune = load_train_config(args.finetune_config)
    scratch = load_train_config(args.scratch_config)
    if not (finetune.init_from / "manifest.json").is_file():
        elastify(hf_dir, finetune.init_from, args.data, widths=WIDTHS, criterion=DEFAULT_CRITERION,
                 calibration_tokens=args.calibration_tokens, name="teacher-shakespeare-elastic", evaluate=False)
    for key, cfg in (("c_finetuned", finetune), ("d_scratch", scratch)):
        if not (cfg.out / "manifest.json").is_file():
            train(cfg, resume=True, progress=False)
        ckpt = load_checkpoint(cfg.out)
        history = [json.loads(line) for line in (cfg.resolved_run_dir / "metrics.jsonl").read_text().splitlines()]
        series[key] = {
            "config": str(args.finetune_config if key == "c_finetuned" else args.scratch_config),
            "criterion": DEFAULT_CRITERION if key == "c_finetuned" else None,
            "steps": ckpt.training["steps"], "tokens": ckpt.training["tokens_seen"],
            "train_seconds": ckpt.training["train_seconds_this_run"],
            "ppl": width_ppl(ckpt.model, test, window, args.eval_windows),
            "val_ppl_during_training": [{"step": r["step"], **r["val_ppl"]} for r in history if "val_ppl" in r],
        }
        print(f"{key}: {series[key]['ppl']}", flush=True)
    teacher = load_checkpoint(args.teacher)
    return {
        "benchmark": "elastify", "teacher": str(args.teacher),
        "teacher_weights_sha256": sha256_file(Path(args.teacher) / "model.safetensors"),
        "hf_export": str(hf_dir), "source": source, "widths": WIDTHS,
        "teacher_test_ppl": (teacher.training.get("eval") or {}).get("widths", {}).get("full", {}).get("ppl"),
        "calibration_tokens": sum(b[:, :-1].numel() for b in batches),
        "eval": {"split": "test", "tokens": len(test) if args.eval_windows is None else args.eval_windows * window},
        "series": series,
    }


LABELS = {
    "a_original_order": "(a) original order",
    "b_activation": "(b) activation",
    "b_taylor": "(b) taylor",
    "b_weight": "(b) weight norm",
    "c_finetuned": "(c) activation + MatTA fine-tune",
    "d_scratch": "(d) MatTA from scratch, same compute",
}


def markdown(results: dict) -> str:
    names = list(results["widths"])
    lines = ["| model | steps | " + " | ".join(f"{n} ({results['widths'][n]})" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for key, s in results["series"].items():
        lines.append(f"| {LABELS.get(key, key)} | {s['steps']} | " + " | ".join(f"{s['ppl'][n]:.2f}" for n in names)
                     + " |")
    lines.append(f"\nTeacher (dense, FFN 1024): test ppl {results['teacher_test_ppl']:.2f}.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["widths"])
    ffn = [results["widths"][n] for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (key, s) in enumerate(results["series"].items()):
        ax.plot(ffn, [s["ppl"][n] for n in names], marker="o", color=f"C{i}", label=LABELS.get(key, key))
    if results["teacher_test_ppl"]:
        ax.axhline(results["teacher_test_ppl"], color="grey", linestyle=":", label="dense teacher")
    ax.set(xscale="log", yscale="log", xticks=ffn, xticklabels=[f"{n}\n{m}" for n, m in zip(names, ffn, strict=True)],
           xlabel="width (FFN units per layer)", ylabel="test perplexity (log)",
           title="elastified dense teacher: held-out ppl per width")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=Path("checkpoints/teacher"))
    parser.add_argument("--hf-dir", type=Path, default=Path("exports/teacher-hf"))
    parser.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    parser.add_argument("--finetune-config", type=Path, default=Path("configs/elastify.yaml"))
    parser.add_argument("--scratch-config", type=Path, default=Path("configs/elastify-scratch.yaml"))
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--eval-windows", type=int, help="test windows per width (default: the whole split)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "elastify")
    args = parser.parse_args()
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(markdown(results))


if __name__ == "__main__":
    main()
