"""Latency that differs when it should: one width experiment, in-process arms vs one engine per arm.

The same experiment (control ``fixed:ta``, treatment ``fixed:s``, unit = user) and the same client
load (a seeded list of users, each with its prompts, played by a closed loop of ``--concurrency``
clients; greedy, so every request decodes the same tokens in both runs) go

(a) to one ``matta serve --experiment``: both arms share every step of one engine (a step decodes
    ``s`` and ``ta`` rows together), so each arm's latency is the mix's, and
(b) to ``matta route --experiment`` over two ``matta serve`` backends pinned ``fixed:ta`` and
    ``fixed:s``: each arm has its own engine, as a dedicated deployment of each policy would.

Both A/B logs are analysed by :mod:`router.ab_analysis` (what ``matta ab analyze`` prints): per arm
``latency_s`` mean (95% CI over users), p50 and p99, and the treatment's lift with its CI and p.

    python -m benchmarks.ab_latency        # writes benchmarks/results/ab_latency.json and .png

``tests/test_ab_deployments.py`` runs a small version (:func:`run_setup`) on a tiny checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from benchmarks.harness import BENCHMARKS, REPO, Route, Server, make_prompts, save_png
from matta.checkpoint import load_checkpoint
from router.ab_analysis import analyze, load_shards
from router.experiment import parse_experiment

EXPERIMENT = {
    "name": "ab-latency", "salt": "2026-11", "unit": "user", "traffic": 1.0,
    "arms": [{"name": "control", "weight": 50, "policy": {"kind": "fixed", "width": "ta"}},
             {"name": "treatment", "weight": 50, "policy": {"kind": "fixed", "width": "s"}}],
}
WIDTHS = ("s", "ta")  # the route's backends, narrowest first
SETUPS = {"in_process": "one matta serve (arms share every engine step)",
          "per_arm": "matta route over one pinned matta serve per arm (each arm its own engine)"}

Plan = list[tuple[str, list[list[int]]]]  # (user, that user's prompts in order)


def make_plan(prompts: list[list[int]], users: int, requests_per_user: int, seed: int) -> Plan:
    """A seeded list of users, each with ``requests_per_user`` prompts drawn from ``prompts``."""
    rng = random.Random(seed)
    return [(f"user-{i:04d}", [prompts[rng.randrange(len(prompts))] for _ in range(requests_per_user)])
            for i in range(users)]


async def closed_loop(url: str, model: str, plan: Plan, concurrency: int, max_tokens: int,
                      timeout_s: float = 300.0) -> list[dict]:
    """``concurrency`` clients, each taking the next user of ``plan`` and sending that user's requests
    one after another (greedy, ``max_tokens`` each); per request: user, status, request id, arm,
    width and the latency the client saw."""
    users = iter(plan)  # shared by the clients: each user is played by one client
    results: list[dict] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for user, prompts in users:
            for prompt in prompts:
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "user": user}
                sent = time.monotonic()
                try:
                    r = await client.post(f"{url}/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    results.append({"user": user, "status": 0, "error": type(exc).__name__,
                                    "client_latency_s": time.monotonic() - sent})
                    continue
                results.append({"user": user, "status": r.status_code, "request_id": r.headers.get("x-request-id"),
                                "arm": r.headers.get("x-matta-arm"), "width": r.headers.get("x-matta-width"),
                                "client_latency_s": time.monotonic() - sent})

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*[client_loop(client) for _ in range(concurrency)])
    return results


def warm_up(url: str, model: str, prompt: list[int], max_tokens: int, requests: int = 3) -> None:
    """A few requests per width, pinned (``<model>:<width>``), so they are no exposures of the experiment."""
    for width in WIDTHS:
        for _ in range(requests):
            r = httpx.post(f"{url}/v1/completions", json={"model": f"{model}:{width}", "prompt": prompt,
                                                          "max_tokens": max_tokens, "temperature": 0}, timeout=120)
            r.raise_for_status()


@contextmanager
def in_process(checkpoint: Path, experiment: Path, db: Path, logs: Path, threads: int,
               max_batch: int) -> Iterator[Server]:
    """(a) One ``matta serve --experiment``: both arms in one engine."""
    server = Server(checkpoint, threads, max_batch, logs / "serve.log",
                    ("--experiment", str(experiment), "--ab-db", str(db)))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def per_arm(checkpoint: Path, model: str, experiment: Path, db: Path, logs: Path, threads: int,
            max_batch: dict[str, int]) -> Iterator[Route]:
    """(b) ``matta route --experiment`` over one ``matta serve --policy fixed:<width>`` per arm."""
    backends = {w: Server(checkpoint, threads, max_batch[w], logs / f"backend-{w}.log", ("--policy", f"fixed:{w}"))
                for w in WIDTHS}
    route = None
    try:
        with ThreadPoolExecutor(len(backends)) as pool:  # start both at once: they load in parallel
            urls = dict(zip(backends, pool.map(Server.start, backends.values()), strict=True))
        config = logs / "route.yaml"
        config.write_text(yaml.safe_dump({"model": model, "backends": [
            {"width": w, "url": urls[w], "model": f"{model}:{w}"} for w in WIDTHS]}, sort_keys=False))
        route = Route(config, logs / "route.log", ("--experiment", str(experiment), "--ab-db", str(db)))
        route.start()
        yield route
    finally:
        if route is not None:
            route.stop()
        with ThreadPoolExecutor(len(backends)) as pool:
            list(pool.map(Server.stop, backends.values()))


def summarize(db: Path, results: list[dict], experiment: dict = EXPERIMENT) -> dict:
    """The A/B log analysed as ``matta ab analyze`` does, reduced to latency, plus checks of the log
    against what the clients were answered."""
    config = parse_experiment(experiment)
    exposures, outcomes = load_shards([db])
    result = analyze(config, exposures, outcomes)
    control, treatment = (a.name for a in config.arms)
    width_of = {a.name: a.policy.width for a in config.arms}
    logged = {e["request_id"]: e for e in exposures}
    answered = [r for r in results if r["status"] == 200]
    arms = {}
    for name, arm in result["arms"].items():
        latency = arm["metrics"]["latency_s"]
        values = sorted(e["latency_s"] for e in exposures if e["arm"] == name and e["status"] == 200)
        arms[name] = {"policy": f"fixed:{width_of[name]}", "units": arm["units"], "exposures": arm["exposures"],
                      "non_200_exposures": arm["non_200_exposures"], "width_mix": arm["width_mix"],
                      "latency_mean_s": latency["mean"], "latency_mean_ci95": latency["ci95"],
                      "latency_p50_s": arm["latency_p50_s"], "latency_p99_s": arm["latency_p99_s"],
                      "completion_tokens_mean": arm["metrics"]["completion_tokens"]["mean"],
                      "latency_s": [round(v, 4) for v in values]}
    c = result["comparisons"]["latency_s"][treatment]
    ci = c["lift_ci95"]
    return {
        "arms": arms,
        "latency_lift": c["lift"], "latency_lift_ci95": ci, "latency_p": c["p"],
        "ratio_treatment_over_control": arms[treatment]["latency_mean_s"] / arms[control]["latency_mean_s"],
        "ci_excludes_0": ci is not None and (ci[0] > 0 or ci[1] < 0),
        "srm_p": result["srm"]["p"],
        "requests": len(results), "answered_200": len(answered),
        "statuses": dict(Counter(str(r["status"]) for r in results)),
        "answers_without_exposure": sum(r["request_id"] not in logged for r in answered),
        "answers_whose_exposure_differs": sum(
            r["request_id"] in logged and (logged[r["request_id"]]["arm"], logged[r["request_id"]]["width"])
            != (r["arm"], r["width"]) for r in answered),
        "exposure_width_by_arm": {a: sorted({e["width"] for e in exposures if e["arm"] == a}) for a in arms},
        "analysis_warnings": result["warnings"],
    }


def run_setup(kind: str, checkpoint: Path, model: str, plan: Plan, workdir: Path, *, concurrency: int,
              max_tokens: int, threads: int, max_batch: int, ta_max_batch: int | None = None,
              experiment: dict = EXPERIMENT) -> dict:
    """Run ``plan`` against setup ``kind`` (``in_process`` or ``per_arm``) and summarize its A/B log.

    ``ta_max_batch`` (per_arm only) gives the TA backend its own ``--max-batch`` (the test makes it
    slower that way)."""
    workdir.mkdir(parents=True, exist_ok=True)
    exp_path, db = workdir / "experiment.yaml", workdir / "ab.sqlite"
    exp_path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    if kind == "in_process":
        setup = in_process(checkpoint, exp_path, db, workdir, threads, max_batch)
    elif kind == "per_arm":
        setup = per_arm(checkpoint, model, exp_path, db, workdir, threads,
                        {"s": max_batch, "ta": ta_max_batch or max_batch})
    else:
        raise ValueError(f"unknown setup {kind!r}; one of {list(SETUPS)}")
    with setup as server:
        warm_up(server.url, model, plan[0][1][0], max_tokens)
        started = time.monotonic()
        results = asyncio.run(closed_loop(server.url, model, plan, concurrency, max_tokens))
        elapsed = time.monotonic() - started
    summary = summarize(db, results, experiment)
    summary.update(setup=SETUPS[kind], seconds=elapsed, requests_per_s=len(results) / elapsed)
    return summary


def plot(report: dict, path: Path) -> None:
    """Per-arm latency distributions (violins, mean marked), the two setups side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, (kind, title) in zip(axes, (("in_process", "in-process arms: one matta serve"),
                                        ("per_arm", "per-arm engines: matta route over 2 backends")), strict=True):
        s = report["setups"][kind]
        names = list(s["arms"])
        data = [s["arms"][a]["latency_s"] for a in names]
        ax.violinplot(data, showmedians=True, showextrema=False)
        means = [s["arms"][a]["latency_mean_s"] for a in names]
        ax.scatter(range(1, len(names) + 1), means, marker="D", color="black", zorder=3, label="mean")
        for i, a in enumerate(names, start=1):
            p99 = s["arms"][a]["latency_p99_s"]
            ax.plot([i - 0.2, i + 0.2], [p99, p99], color="tab:red", lw=1.5, label="p99" if i == 1 else None)
        ax.set_xticks(range(1, len(names) + 1),
                      [f"{a}\n{s['arms'][a]['policy']}\n{s['arms'][a]['exposures']} requests" for a in names])
        ci = s["latency_lift_ci95"]
        ax.set_title(f"{title}\ns/ta latency {s['ratio_treatment_over_control']:.2f}x, lift "
                     f"{s['latency_lift']:+.1%} [{ci[0]:+.1%}, {ci[1]:+.1%}], p {s['latency_p']:.2g}", fontsize=9.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("latency_s per request (A/B log)")
    axes[0].legend(fontsize="small")
    st = report["settings"]
    fig.suptitle(f"fixed:ta (control) vs fixed:s (treatment), same load: {st['users']} users x "
                 f"{st['requests_per_user']} requests, {st['concurrency']} concurrent, {st['max_tokens']} tokens")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "default")
    parser.add_argument("--users", type=int, default=320)
    parser.add_argument("--requests-per-user", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (users played at once)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every matta serve")
    parser.add_argument("--max-batch", type=int, default=32, help="--max-batch of every matta serve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results" / "ab_latency")
    args = parser.parse_args(argv)

    ckpt = load_checkpoint(args.checkpoint)
    prompts, prompt_info = make_prompts(ckpt, list(WIDTHS), args.prompt_tokens, args.max_tokens)
    model = ckpt.config.name
    del ckpt
    plan = make_plan(prompts, args.users, args.requests_per_user, args.seed)
    report = {
        "benchmark": "ab_latency",
        "question": "does a fixed:ta vs fixed:s experiment report the latency difference a dedicated deployment of "
                    "each policy would have?",
        "experiment": EXPERIMENT,
        "settings": {"checkpoint": str(args.checkpoint.resolve().relative_to(REPO)) if args.checkpoint.resolve()
                     .is_relative_to(REPO) else str(args.checkpoint), "users": args.users,
                     "requests_per_user": args.requests_per_user, "concurrency": args.concurrency,
                     "client": "closed loop: each client plays the next user of the seeded list, its requests one "
                               "after another (httpx, greedy, user field set)",
                     "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "threads": args.threads,
                     "max_batch": args.max_batch, "seed": args.seed, "prompts": prompt_info},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "note": "every server process (in-process: one matta serve; per-arm: matta route and two "
                            "matta serve backends, each with its own engine process) shares the same 2 cores with "
                            "the load generator (and whatever else runs on the machine). Per-arm runs two engines "
                            f"of {args.threads} torch thread(s) each, in-process one: compare the s/ta ratio within "
                            "a setup, not absolute latency across setups."},
        "setups": {},
    }
    with tempfile.TemporaryDirectory(prefix="ab_latency-") as tmp:
        for kind in SETUPS:
            print(f"running {kind}: {SETUPS[kind]} ...", flush=True)
            report["setups"][kind] = s = run_setup(
                kind, args.checkpoint, model, plan, Path(tmp) / kind, concurrency=args.concurrency,
                max_tokens=args.max_tokens, threads=args.threads, max_batch=args.max_batch)
            arms = s["arms"]
            print(f"  {s['answered_200']}/{s['requests']} answered in {s['seconds']:.1f} s; "
                  + "; ".join(f"{a} ({v['policy']}) mean {v['latency_mean_s']:.3f} s p50 {v['latency_p50_s']:.3f} "
                              f"p99 {v['latency_p99_s']:.3f}" for a, v in arms.items())
                  + f"; s/ta {s['ratio_treatment_over_control']:.3f}, lift {s['latency_lift']:+.1%} "
                    f"{[round(x, 4) for x in s['latency_lift_ci95']]}, p {s['latency_p']:.3g}", flush=True)
    report["conclusion"] = {kind: {"ratio_treatment_over_control": s["ratio_treatment_over_control"],
                                   "latency_lift": s["latency_lift"], "latency_lift_ci95": s["latency_lift_ci95"],
                                   "p": s["latency_p"], "ci_excludes_0": s["ci_excludes_0"]}
                            for kind, s in report["setups"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
