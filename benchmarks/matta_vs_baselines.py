"""MatTA against its baselines in one harness: same teacher, data, steps and tokens.

Runs, for each seed (the seed sets initialisation *and* data order):
  matta         the recipe (TA + nested Student + sampled middle widths, TA->Student distillation)
  matta_beta0   control: the same with the TA->Student term off (beta = 0)
  matta_nomid   control: no intermediate widths sampled into the loss
  kd            Student-sized model distilled from the teacher directly, same steps/tokens
  kd_compute    control: kd given the compute of a matta step (steps x measured cost ratio)
  student       Student-sized model on ground truth only
then evaluates held-out perplexity and whole-word cloze accuracy (test split) of the Student
width, and of every width for matta. Also measures the step-cost ratio of a matta step to a
dense TA step.

Every finished run is recorded in the results JSON with the sha256 of the teacher's weights and
its step count, and a later invocation with the same teacher skips it: the benchmark takes hours
on 2 cores, so it can be run a few variants or seeds at a time (and an interrupted run resumes
from its state under --work). Runs made with another teacher are dropped from the results.

    python -m benchmarks.matta_vs_baselines --steps 1400 --seeds 0 1 2
    python -m benchmarks.matta_vs_baselines --seeds 0 --variants student kd   # part of it
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from benchmarks.harness import save_png
from matta.checkpoint import load_checkpoint, sha256_file
from matta.model import NestedGPT
from training.config import TrainConfig
from training.data import TokenData
from training.trainer import BatchSampler, RecipeLoss, Teacher, build_optimizer, evaluate_widths, train

RESULTS = Path(__file__).parent / "results"
PAPER_DISTILL_WEIGHT = 1.0  # beta of the TA->Student term in the `matta` variant
VARIANTS = ("matta", "matta_beta0", "matta_nomid", "kd", "kd_compute", "student")


def base_config(default_yaml: Path) -> dict:
    cfg = yaml.safe_load(default_yaml.read_text())
    cfg.pop("description", None)
    return cfg


def variant_config(base: dict, variant: str, seed: int, steps: int, work: Path, teacher: Path) -> dict:
    cfg = json.loads(json.dumps(base))
    student_name = next(iter(cfg["model"]["widths"]))
    student_ffn = cfg["model"]["widths"][student_name]
    cfg.update(seed=seed, steps=steps, out=str(work / f"{variant}-seed{seed}" / "checkpoint"),
               run_dir=str(work / f"{variant}-seed{seed}"), eval_every=0, save_every=max(100, steps // 4),
               final_eval=False)
    cfg["teacher"] = {"path": str(teacher)}
    if variant == "matta":  # the paper's recipe, whatever the shipped default (which measured beta = 0 better)
        cfg["loss"] = {**cfg["loss"], "distill_weight": PAPER_DISTILL_WEIGHT}
    elif variant == "matta_beta0":
        cfg["loss"] = {**cfg["loss"], "distill_weight": 0.0}
    elif variant == "matta_nomid":
        cfg["loss"] = {**cfg["loss"], "middle_widths": 0}
    elif variant in ("kd", "kd_compute", "student"):
        cfg["recipe"] = "kd" if variant.startswith("kd") else "student"
        cfg["model"] = {**cfg["model"], "widths": {student_name: student_ffn}}
        if variant == "student":
            cfg.pop("teacher")
    return cfg


def measure_step_costs(base: dict, teacher_path: Path, data: TokenData, repeats: int = 8) -> dict:
    """Median seconds per optimiser step, eager and under torch.compile (what `compile: true` runs).

    Setups: matta (one middle width), matta without middle widths, dense TA on ground truth, KD
    at TA size (the TA trained alone on the same teacher labels) and KD at Student size. Steps of
    all setups are interleaved so drift in machine speed hits them alike.
    """
    tokenizer = data.tokenizer()
    eager_teacher = Teacher.load(TrainConfig.model_validate({**base, "teacher": {"path": str(teacher_path)}}).teacher,
                                 tokenizer, torch.device("cpu"))
    compiled_teacher = Teacher(torch.compile(eager_teacher.logits_fn), eager_teacher.description)
    ta_name, ta_ffn = list(base["model"]["widths"].items())[-1]
    s_name, s_ffn = next(iter(base["model"]["widths"].items()))
    setups = {
        "matta": {**base, "teacher": {"path": str(teacher_path)}},
        "matta_nomid": {**base, "teacher": {"path": str(teacher_path)}, "loss": {**base["loss"], "middle_widths": 0}},
        "dense_ta": {**base, "recipe": "student", "model": {**base["model"], "widths": {ta_name: ta_ffn}}},
        "kd_ta": {**base, "recipe": "kd", "teacher": {"path": str(teacher_path)},
                  "model": {**base["model"], "widths": {ta_name: ta_ffn}}},
        "kd_student": {**base, "recipe": "kd", "teacher": {"path": str(teacher_path)},
                       "model": {**base["model"], "widths": {s_name: s_ffn}}},
    }
    steppers = {}
    for mode in ("eager", "compiled"):
        for name, raw in setups.items():
            raw = {k: v for k, v in raw.items() if not (k == "teacher" and raw["recipe"] in ("student", "teacher"))}
            cfg = TrainConfig.model_validate(raw)
            torch.manual_seed(0)
            model = NestedGPT(cfg.model.build(tokenizer.vocab_size, tokenizer.eos_id))
            module, opt = RecipeLoss(model, cfg), build_optimizer(model, cfg)
            if mode == "compiled":
                module = torch.compile(module)
            teacher = compiled_teacher if mode == "compiled" else eager_teacher
            sampler = BatchSampler(data.tokens("train"), cfg.seq_len, cfg.batch_size, 0)
            middle = [model.config.widths[n] for n in model.config.width_names[1:-1]][: cfg.loss.middle_widths]
            uses_teacher = cfg.recipe in ("kd", "matta")

            def step(module=module, opt=opt, sampler=sampler, middle=middle, uses_teacher=uses_teacher,
                     recipe=cfg.recipe, teacher=teacher):
                x, y = sampler.next()
                t_logits = teacher(x) if uses_teacher else None
                loss, _ = module(x, y, t_logits, torch.tensor(1.0), middle if recipe == "matta" else [])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            step()  # warm-up (and compilation)
            step()
            steppers[f"{mode}:{name}"] = step
    times = {name: [] for name in steppers}
    for r in range(repeats):
        for name in list(steppers)[r % len(steppers):] + list(steppers)[: r % len(steppers)]:
            start = time.perf_counter()
            steppers[name]()
            times[name].append(time.perf_counter() - start)
    result = {}
    for mode in ("eager", "compiled"):
        med = {name: statistics.median(times[f"{mode}:{name}"]) for name in setups}
        result[mode] = {"median_step_seconds": med,
                        "matta_over_dense_ta": med["matta"] / med["dense_ta"],
                        "matta_over_kd_ta": med["matta"] / med["kd_ta"],
                        "matta_nomid_over_kd_ta": med["matta_nomid"] / med["kd_ta"],
                        "matta_over_kd_student": med["matta"] / med["kd_student"]}
    result["compile_speedup_matta"] = result["eager"]["median_step_seconds"]["matta"] / result["compiled"][
        "median_step_seconds"]["matta"]
    return result


def summarise(runs: dict, student_name: str) -> dict:
    """Per variant: Student ppl/cloze over seeds (and every width's mean ppl where the run has
    several); then each MatTA variant against each baseline and control."""
    by_variant: dict[str, list[dict]] = {}
    for key, r in runs.items():
        by_variant.setdefault(key.rsplit("-seed", 1)[0], []).append(r)
    summary = {}
    for variant, rs in by_variant.items():
        width = student_name
        ppl = [r["eval"]["widths"][width]["ppl"] for r in rs]
        acc = [r["eval"]["widths"][width]["cloze_acc"] for r in rs]
        summary[variant] = {"seeds": len(rs), "student_ppl_mean": statistics.mean(ppl),
                            "student_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                            "student_ppl": ppl, "student_cloze_mean": statistics.mean(acc), "student_cloze": acc}
        widths = list(rs[0]["eval"]["widths"])  # narrowest first
        if len(widths) > 1:
            summary[variant]["widths_ppl_mean"] = {
                w: statistics.mean(r["eval"]["widths"][w]["ppl"] for r in rs) for w in widths}
            summary[variant]["ppl_falls_with_width_every_seed"] = all(
                all(narrow["ppl"] > wide["ppl"] for narrow, wide in itertools.pairwise(r["eval"]["widths"].values()))
                for r in rs)
    # "matta" is the paper's recipe (beta 1); "matta_beta0" is what the shipped default runs.
    comparisons = {"matta": ("kd", "kd_compute", "student", "matta_beta0", "matta_nomid"),
                   "matta_beta0": ("kd", "kd_compute", "student")}
    for recipe, bases in comparisons.items():
        if recipe not in summary:
            continue
        m = summary[recipe]
        for base in bases:
            if base in summary:
                b = summary[base]
                spread = max(m["student_ppl_std"], b["student_ppl_std"])
                diff = b["student_ppl_mean"] - m["student_ppl_mean"]
                enough_seeds = min(m["seeds"], b["seeds"]) >= 2  # one seed has no spread to exceed
                summary[f"{recipe}_vs_{base}"] = {
                    "relative_ppl_improvement": diff / b["student_ppl_mean"],
                    "exceeds_seed_spread": (abs(diff) > 2 * spread) if enough_seeds else None,
                    "every_seed_better": all(x < min(b["student_ppl"]) for x in m["student_ppl"]),
                }
    return summary


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {k: v for k, v in results["summary"].items() if "student_ppl" in v}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(summary)
    axes[0].bar(names, [summary[n]["student_ppl_mean"] for n in names],
                yerr=[summary[n]["student_ppl_std"] for n in names], capsize=4, color="tab:blue")
    for i, n in enumerate(names):
        axes[0].scatter([i] * len(summary[n]["student_ppl"]), summary[n]["student_ppl"], color="black", s=10, zorder=3)
    lo = min(min(summary[n]["student_ppl"]) for n in names)
    hi = max(max(summary[n]["student_ppl"]) for n in names)
    axes[0].set_ylim(lo - (hi - lo) * 0.6 - 1, hi + (hi - lo) * 0.3 + 1)
    axes[0].set(title="Student width: test perplexity (mean, std, seeds)", ylabel="perplexity")
    axes[0].tick_params(axis="x", rotation=20)
    colours = {"matta": "tab:blue", "matta_beta0": "tab:orange", "matta_nomid": "tab:green"}
    for variant, colour in colours.items():
        runs = [r for r in results["runs"].values() if r["variant"] == variant]
        for i, r in enumerate(runs):
            ws = [(w["flops_per_token"], w["ppl"]) for n, w in r["eval"]["widths"].items() if not n.startswith("mix:")]
            axes[1].plot([f for f, _ in ws], [p for _, p in ws], marker="o", alpha=0.7, color=colour,
                         label=variant if i == 0 else None)
    axes[1].legend()
    axes[1].set(title="MatTA variants: every width (one line per seed)", xlabel="FLOPs / token",
                ylabel="test perplexity")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    parser.add_argument("--teacher", type=Path, default=Path("checkpoints/teacher"))
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--cloze-items", type=int, default=3000)
    parser.add_argument("--work", type=Path, default=Path("runs/matta_vs_baselines"))
    parser.add_argument("--out", type=Path, default=RESULTS / "matta_vs_baselines")
    args = parser.parse_args()
    base = base_config(args.config)
    if not (args.teacher / "manifest.json").exists():
        raise SystemExit(f"no teacher at {args.teacher}; train one with `matta train {args.config}` first")
    data = TokenData(base["data"])
    tokenizer = data.tokenizer()
    teacher_sha = sha256_file(args.teacher / "model.safetensors")
    previous = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else {}
    same_teacher = previous.get("teacher_sha256") == teacher_sha
    if previous and not same_teacher:
        print(f"{args.out.with_suffix('.json')}: made with another teacher; its runs are dropped", flush=True)
    cost_path = args.work / "step_costs.json"
    if same_teacher and "step_costs" in previous:
        costs = previous["step_costs"]
    elif cost_path.exists():
        costs = json.loads(cost_path.read_text())
    else:
        costs = measure_step_costs(base, args.teacher, data)
        args.work.mkdir(parents=True, exist_ok=True)
        cost_path.write_text(json.dumps(costs, indent=2))
    print(f"step costs: {json.dumps(costs)}", flush=True)
    # Runs use the config's compile setting, so kd_compute gets the step ratio of that mode.
    mode = "compiled" if base.get("compile") else "eager"
    kd_compute_steps = round(args.steps * costs[mode]["matta_over_kd_student"])
    runs = dict(previous.get("runs", {})) if same_teacher else {}

    def save() -> dict:
        student_name = next(iter(base["model"]["widths"]))
        ordered = dict(sorted(runs.items(), key=lambda kv: (VARIANTS.index(kv[1]["variant"]), kv[1]["seed"])))
        results = {"config": str(args.config), "teacher": str(args.teacher), "teacher_sha256": teacher_sha,
                   "steps": args.steps, "kd_compute_steps": kd_compute_steps,
                   "seeds": sorted({r["seed"] for r in ordered.values()}), "step_costs": costs,
                   "runs": ordered, "summary": summarise(ordered, student_name)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        plot(results, args.out.with_suffix(".png"))
        return results

    for seed in args.seeds:
        for variant in args.variants:
            steps = kd_compute_steps if variant == "kd_compute" else args.steps
            key = f"{variant}-seed{seed}"
            if runs.get(key, {}).get("steps") == steps:
                print(f"{key:22s} recorded", flush=True)
                continue
            cfg = TrainConfig.model_validate(variant_config(base, variant, seed, steps, args.work, args.teacher))
            if not (cfg.out / "manifest.json").exists():
                train(cfg, resume=True, progress=False)
            ckpt = load_checkpoint(cfg.out)
            runs[key] = {"variant": variant, "seed": seed, "steps": steps, "tokens": ckpt.training["tokens_seen"],
                         "train_seconds": ckpt.training.get("train_seconds_this_run"),
                         "eval": evaluate_widths(ckpt.model, data, tokenizer, args.cloze_items, mix_n_match=False)}
            s = runs[key]["eval"]["widths"]
            print(f"{key:22s} " + "  ".join(f"{w}: ppl {r['ppl']:.2f} cloze {r['cloze_acc']:.3f}" for w, r in s.items()),
                  flush=True)
            save()  # after every run, so a stopped benchmark keeps what it finished
    results = save()
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
