"""Per-arm deployments: a width experiment on ``matta route`` over one pinned ``matta serve`` per arm
measures each arm's own latency, and logs its exposures as durably as ``matta serve`` does.

A small version of ``python -m benchmarks.ab_latency`` (which also runs the in-process setup) on
the tiny checkpoint: real processes on port 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
import yaml

from benchmarks.ab_latency import EXPERIMENT, closed_loop, make_plan, per_arm, summarize, warm_up
from benchmarks.harness import make_prompts
from matta.checkpoint import load_checkpoint
from tests.helpers import rows

pytestmark = pytest.mark.slow  # three server processes and a few hundred requests (~30 s on 2 cores)

MODEL = "tiny"
MAX_TOKENS = 32


def test_route_over_per_arm_backends_reports_each_arms_latency_and_logs_every_exposure(checkpoint_512, tmp_path):
    """The TA backend decodes one sequence at a time (``--max-batch 1``) and the Student backend
    batches 16: with 8 users in flight the TA arm queues, so it is measurably slower whatever the
    tiny model's per-step costs. The experiment must see that (lift CI below 0), every answer must
    carry and log its arm's width, and after SIGKILL of the route under load every acknowledged
    answer must have its exposure in the log."""
    _, path = checkpoint_512
    prompts, _ = make_prompts(load_checkpoint(path), ["s", "ta"], 8, MAX_TOKENS, candidates=16)
    plan = make_plan(prompts, users=64, requests_per_user=3, seed=0)
    exp_path, db = tmp_path / "experiment.yaml", tmp_path / "ab.sqlite"
    exp_path.write_text(yaml.safe_dump(EXPERIMENT, sort_keys=False))
    acknowledged: list[str] = []
    with per_arm(path, MODEL, exp_path, db, tmp_path, threads=1, max_batch={"s": 16, "ta": 1}) as route:
        warm_up(route.url, MODEL, prompts[0], MAX_TOKENS)
        results = asyncio.run(closed_loop(route.url, MODEL, plan, concurrency=8, max_tokens=MAX_TOKENS))

        async def load_then_kill() -> None:  # as the matta serve SIGKILL test does
            async def client(j: int) -> None:
                async with httpx.AsyncClient(timeout=30) as http:
                    for k in range(1000):
                        try:
                            r = await http.post(f"{route.url}/v1/completions", json={
                                "model": MODEL, "prompt": prompts[k % len(prompts)], "max_tokens": 4,
                                "user": f"late-{j}-{k}"})
                        except httpx.HTTPError:
                            return  # the route is gone
                        if r.status_code == 200:
                            acknowledged.append(r.json()["id"])

            clients = [asyncio.create_task(client(j)) for j in range(8)]
            deadline = time.monotonic() + 30
            while len(acknowledged) < 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            os.kill(route.proc.pid, signal.SIGKILL)
            await asyncio.gather(*clients)

        asyncio.run(load_then_kill())
        route.proc.wait(10)
        assert route.proc.returncode == -signal.SIGKILL

    assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200][:3]
    summary = summarize(db, results)
    # Each arm's requests went to its own backend: the width in every answer and exposure is the arm's.
    assert {(r["arm"], r["width"]) for r in results} == {("control", "ta"), ("treatment", "s")}
    assert summary["answers_without_exposure"] == 0 and summary["answers_whose_exposure_differs"] == 0
    assert summary["exposure_width_by_arm"] == {"control": ["ta"], "treatment": ["s"]}
    control, treatment = summary["arms"]["control"], summary["arms"]["treatment"]
    assert control["units"] >= 20 and treatment["units"] >= 20, summary["arms"]
    # The slower TA backend shows: the Student arm's latency lift is negative with its CI below 0.
    lift, (low, high) = summary["latency_lift"], summary["latency_lift_ci95"]
    assert lift < 0 and high < 0 and summary["latency_p"] < 0.05, (lift, low, high, summary["latency_p"])
    # Durable like matta serve: exposures reach SQLite before the answer, so a SIGKILL loses none.
    logged = {r["request_id"] for r in rows(db)}
    missing = [i for i in acknowledged if i not in logged]
    assert len(acknowledged) >= 20 and not missing, f"{len(missing)} of {len(acknowledged)} acknowledged exposures lost"
