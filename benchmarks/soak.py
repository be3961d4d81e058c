"""Soak a real ``matta serve`` on loopback: mixed traffic for minutes, reloads, one core kill; is anything lost or leaking?

    python -m benchmarks.soak                          # 10 minutes, checkpoints/default, 6 clients
    python -m benchmarks.soak --duration-s 120 --out benchmarks/results/soak_short

Traffic (closed loop, ``--clients`` at once, each a user of the A/B experiment): plain completions,
streams, streams the client leaves after the first chunk, plain requests the client gives up on, and
feedback for answered requests. Every ``--reload-every-s`` the experiment file is rewritten (the arms'
weights swap) and the server gets SIGHUP; at ``--kill-core-at-s`` the engine-core process is SIGKILLed
(``--on-core-death restart``: 503s until the new core is ready). Sampled every few seconds: RSS and
open file descriptors of the API process and of the core.

The summary (``--out``.json, and a PNG of memory and descriptors over time) checks what the server
promises (docs/reliability.md): no 5xx but the 503s of the core's restart window; every exposure a
client saw acknowledged (an answer with ``x-matta-arm``, a stream to ``[DONE]``) and every feedback
answered 200 is a row in the SQLite log; RSS and descriptors flat from the end of the warm-up to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

from benchmarks.harness import REPO, Server, descendants, save_png

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SAMPLE_EVERY_S = 5.0
PROMPTS = ["ROMEO.\n", "To be, or not to be", "Now is the winter of our discontent", "Friends, Romans, countrymen",
           "JULIET.\nO Romeo, Romeo", "All the world's a stage"]
KINDS = {"complete": 0.35, "stream": 0.3, "leave_stream": 0.1, "give_up": 0.05, "feedback": 0.2}


def experiment(weights: tuple[int, int]) -> dict:
    return {"name": "soak", "salt": "soak-1", "unit": "user", "traffic": 1.0,
            "arms": [{"name": "control", "weight": weights[0], "policy": {"kind": "fixed", "width": "ta"}},
                     {"name": "treatment", "weight": weights[1], "policy": {"kind": "fixed", "width": "s"}}]}


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def core_pid(api_pid: int) -> int | None:
    for pid in descendants(api_pid):
        try:
            if b"serving.engine.core_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


class Soak:
    def __init__(self, url: str, api_pid: int, args) -> None:
        self.url, self.api_pid, self.args = url, api_pid, args
        self.statuses: Counter[str] = Counter()
        self.exposures: set[str] = set()  # request ids whose exposure a client saw acknowledged
        self.feedback: set[str] = set()  # request ids whose feedback was answered 200
        self.answered: list[str] = []  # request ids feedback can be given for
        self.errors: list[str] = []  # unexpected answers (5xx outside the restart window, bad bodies)
        self.samples: list[dict] = []
        self.kill: dict = {}
        self.reloads = 0
        self.started = time.monotonic()
        self.restart_window: tuple[float, float] | None = None  # (kill, first 200 /health after it)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def note(self, kind: str, status: int, detail: str = "") -> None:
        self.statuses[f"{kind} {status}"] += 1
        if status >= 500 and not (status == 503 and self.in_restart_window()):
            self.errors.append(f"{self.elapsed():.1f}s {kind} {status} {detail[:200]}")

    def in_restart_window(self) -> bool:
        if not self.kill:
            return False
        end = self.kill.get("recovered_at_s")
        return end is None or self.elapsed() <= end + 1.0

    async def client(self, index: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(index)
        kinds, weights = zip(*KINDS.items(), strict=True)
        while self.elapsed() < self.args.duration_s:
            kind = rng.choices(kinds, weights)[0]
            user = f"user-{index}-{rng.randrange(40)}"
            body = {"model": self.args.model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randrange(4, 33),
                    "temperature": rng.choice([0, 0.8]), "user": user}
            try:
                if kind == "feedback":
                    await self.give_feedback(http, rng)
                elif kind == "complete":
                    r = await http.post(f"{self.url}/v1/completions", json=body)
                    self.note(kind, r.status_code, r.text)
                    self.acknowledged(r)
                elif kind == "give_up":
                    try:
                        r = await http.post(f"{self.url}/v1/completions", json={**body, "max_tokens": 200},
                                            timeout=0.05 + rng.random() * 0.3)
                        self.note(kind, r.status_code, r.text)
                        self.acknowledged(r)
                    except httpx.TimeoutException:
                        self.statuses["give_up left"] += 1
                else:
                    await self.stream(http, {**body, "stream": True}, leave=kind == "leave_stream")
            except httpx.TransportError as exc:
                self.note(kind, 599, f"transport error: {exc!r}")

    def acknowledged(self, r: httpx.Response) -> None:
        request_id = r.headers.get("x-request-id")
        if request_id and r.headers.get("x-matta-arm"):
            self.exposures.add(request_id)
            if r.status_code == 200:
                self.answered.append(request_id)

    async def stream(self, http: httpx.AsyncClient, body: dict, leave: bool) -> None:
        kind = "leave_stream" if leave else "stream"
        async with http.stream("POST", f"{self.url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                self.note(kind, r.status_code, (await r.aread()).decode(errors="replace"))
                self.acknowledged(r)
                return
            done = False
            async for line in r.aiter_lines():
                if leave and line.startswith("data: {"):
                    self.statuses[f"{kind} left"] += 1
                    return  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    done = True
            self.note(kind, 200 if done else 598, "" if done else "stream ended without [DONE]")
            if done:
                self.acknowledged(r)

    async def give_feedback(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        if not self.answered:
            return
        request_id = self.answered.pop(rng.randrange(len(self.answered)))
        r = await http.post(f"{self.url}/v1/feedback", json={"request_id": request_id, "metric": "success",
                                                             "value": rng.choice([0, 1])})
        self.note("feedback", r.status_code, r.text)
        if r.status_code == 200:
            self.feedback.add(request_id)

    async def sampler(self) -> None:
        while self.elapsed() < self.args.duration_s:
            core = core_pid(self.api_pid)
            self.samples.append({"t_s": round(self.elapsed(), 1), "api_rss_kib": rss_kib(self.api_pid),
                                 "api_fds": open_fds(self.api_pid), "core_pid": core,
                                 "core_rss_kib": rss_kib(core) if core else None,
                                 "core_fds": open_fds(core) if core else None})
            await asyncio.sleep(SAMPLE_EVERY_S)

    async def reloader(self, path: Path) -> None:
        weights = (50, 50)
        while True:
            await asyncio.sleep(self.args.reload_every_s)
            if self.elapsed() >= self.args.duration_s:
                return
            weights = weights[::-1] if weights != (50, 50) else (60, 40)
            path.write_text(yaml.safe_dump(experiment(weights)))
            os.kill(self.api_pid, signal.SIGHUP)
            self.reloads += 1

    async def killer(self, http: httpx.AsyncClient) -> None:
        await asyncio.sleep(self.args.kill_core_at_s)
        pid = core_pid(self.api_pid)
        if pid is None:
            self.kill = {"error": "no core process found"}
            return
        os.kill(pid, signal.SIGKILL)
        self.kill = {"pid": pid, "at_s": round(self.elapsed(), 2)}
        noticed = False  # /health answers 200 until the server has seen the death (~0.1 s)
        while self.elapsed() < self.args.duration_s + 60:
            try:
                status = (await http.get(f"{self.url}/health", timeout=5)).status_code
                if status == 503 and not noticed:
                    noticed = True
                    self.kill["noticed_after_s"] = round(self.elapsed() - self.kill["at_s"], 2)
                if status == 200 and noticed:
                    self.kill["recovered_at_s"] = round(self.elapsed(), 2)
                    self.kill["recovery_s"] = round(self.kill["recovered_at_s"] - self.kill["at_s"], 2)
                    self.kill["new_pid"] = core_pid(self.api_pid)
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)

    async def run(self, experiment_path: Path) -> None:
        limits = httpx.Limits(max_connections=self.args.clients * 2)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            tasks = [asyncio.create_task(self.client(i, http)) for i in range(self.args.clients)]
            side = [asyncio.create_task(self.sampler()), asyncio.create_task(self.reloader(experiment_path)),
                    asyncio.create_task(self.killer(http))]
            await asyncio.gather(*tasks)
            await asyncio.gather(side[0], side[2])
            side[1].cancel()


def logged_rows(db: Path) -> tuple[set[str], set[str]]:
    """Request ids of the exposures and of the request-id outcomes in the server's SQLite log."""
    conn = sqlite3.connect(db)
    try:
        exposures = {row[0] for row in conn.execute("SELECT request_id FROM exposures")}
        outcomes = {row[0] for row in conn.execute("SELECT request_id FROM outcomes WHERE request_id IS NOT NULL")}
    finally:
        conn.close()
    return exposures, outcomes


def growth(samples: list[dict], key: str, warmup_s: float) -> dict:
    values = [(s["t_s"], s[key]) for s in samples if s[key] is not None and s["t_s"] >= warmup_s]
    if len(values) < 2:
        return {}
    return {"start": values[0][1], "end": values[-1][1], "max": max(v for _, v in values),
            "growth": values[-1][1] - values[0][1]}


def plot(samples: list[dict], kill: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] for s in samples]
    fig, (mem, fds) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key, label in (("api_rss_kib", "API process"), ("core_rss_kib", "engine core")):
        mem.plot(t, [None if s[key] is None else s[key] / 1024 for s in samples], label=label)
    for key, label in (("api_fds", "API process"), ("core_fds", "engine core")):
        fds.plot(t, [s[key] for s in samples], label=label)
    for ax in (mem, fds):
        if "at_s" in kill:
            ax.axvline(kill["at_s"], color="red", linestyle=":", label="core SIGKILLed")
        ax.legend()
    mem.set_ylabel("RSS (MiB)")
    fds.set_ylabel("open fds")
    fds.set_xlabel("seconds")
    mem.set_title("matta serve soak: memory and descriptors")
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints/default")
    p.add_argument("--model", default="matta-shakespeare", help="the checkpoint's model id")
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--reload-every-s", type=float, default=60.0)
    p.add_argument("--kill-core-at-s", type=float, help="default: half-way")
    p.add_argument("--warmup-s", type=float, default=60.0, help="RSS and fds are compared from here to the end")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "soak")
    p.add_argument("--work", type=Path, default=REPO / "runs/soak")
    args = p.parse_args(argv)
    if args.kill_core_at_s is None:
        args.kill_core_at_s = args.duration_s / 2
    args.warmup_s = min(args.warmup_s, args.kill_core_at_s)
    args.work.mkdir(parents=True, exist_ok=True)
    experiment_path, db = args.work / "experiment.yaml", args.work / "soak.sqlite"
    for stale in args.work.glob("soak.sqlite*"):
        stale.unlink()
    experiment_path.write_text(yaml.safe_dump(experiment((50, 50))))
    server = Server(args.checkpoint, args.threads, 8, args.work / "server.log",
                    extra_args=("--experiment", str(experiment_path), "--ab-db", str(db),
                                "--on-core-death", "restart"))
    url = server.start()
    soak = Soak(url, server.proc.pid, args)
    try:
        asyncio.run(soak.run(experiment_path))
    finally:
        exit_code = server.stop()
    exposures, outcomes = logged_rows(db)
    lost_exposures = sorted(soak.exposures - exposures)
    lost_feedback = sorted(soak.feedback - outcomes)
    api_samples = soak.samples
    refused_reloads = (args.work / "server.log").read_text(errors="replace").count("experiment reload refused")
    core_after = [s for s in soak.samples if s["core_pid"] == soak.kill.get("new_pid")]
    summary = {
        "duration_s": args.duration_s, "clients": args.clients, "checkpoint": str(args.checkpoint),
        "requests": sum(soak.statuses.values()), "statuses": dict(sorted(soak.statuses.items())),
        "unexpected": soak.errors[:50], "unexpected_count": len(soak.errors),
        "reloads": soak.reloads, "reloads_refused": refused_reloads, "core_kill": soak.kill, "server_exit_code": exit_code,
        "exposures_acknowledged": len(soak.exposures), "exposure_rows": len(exposures),
        "exposures_lost": lost_exposures[:50], "feedback_acknowledged": len(soak.feedback),
        "feedback_rows": len(outcomes), "feedback_lost": lost_feedback[:50],
        "api_rss_kib": growth(api_samples, "api_rss_kib", args.warmup_s),
        "api_fds": growth(api_samples, "api_fds", args.warmup_s),
        "core_rss_kib_after_restart": growth(core_after, "core_rss_kib", soak.kill.get("recovered_at_s", 0) + 30),
        "core_fds_after_restart": growth(core_after, "core_fds", soak.kill.get("recovered_at_s", 0) + 30),
        "samples": soak.samples,
    }
    summary["ok"] = (not soak.errors and not lost_exposures and not lost_feedback and exit_code == 0
                     and "recovery_s" in soak.kill and not refused_reloads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(soak.samples, soak.kill, args.out.with_suffix(".png"))
    shown = {k: v for k, v in summary.items() if k != "samples"}
    print(json.dumps(shown, indent=1))
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
