"""Run the locust scenarios headless against a server and turn locust's CSV into a report (JSON + PNG).

    python benchmarks/load_test.py --host http://127.0.0.1:8000 --users 16 --time 60 --user-class SloUser
    python benchmarks/load_test.py --host http://127.0.0.1:8000 --user-class ABUser --out benchmarks/results/load_ab

Works against `matta serve`, `matta route` and the Ray Serve app alike (same API). The report
has requests/s and failures/s over time, latency percentiles over time, and a per-endpoint
table (requests, failures, median, p95, p99, requests/s).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run_locust(host: str, users: int, spawn_rate: float, seconds: int, user_classes: list[str], prefix: Path,
               env: dict | None = None) -> None:
    """locust --headless with CSV output at ``prefix``; raises if locust fails to run."""
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), *user_classes, "--headless",
           "-u", str(users), "-r", str(spawn_rate), "-t", f"{seconds}s", "-H", host, "--csv", str(prefix),
           "--csv-full-history", "--only-summary", "--stop-timeout", "10", "--loglevel", "WARNING"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 120)
    # locust exits 1 when any request failed; that is a result, not a crash. Other codes are crashes.
    if done.returncode not in (0, 1) or not Path(f"{prefix}_stats.csv").exists():
        raise RuntimeError(f"locust failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _float(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_stats(prefix: Path) -> dict:
    """Per-endpoint totals and the aggregated time series from locust's CSV files."""
    endpoints = {}
    with open(f"{prefix}_stats.csv") as f:
        for row in csv.DictReader(f):
            endpoints[f"{row['Type']} {row['Name']}".strip()] = {
                "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                "median_ms": _float(row["Median Response Time"]), "p95_ms": _float(row["95%"]),
                "p99_ms": _float(row["99%"]), "requests_per_s": _float(row["Requests/s"]),
                "failures_per_s": _float(row["Failures/s"])}
    history = []
    with open(f"{prefix}_stats_history.csv") as f:
        for row in csv.DictReader(f):
            if row["Name"] != "Aggregated":
                continue
            history.append({"t": int(row["Timestamp"]), "users": int(row["User Count"]),
                            "requests_per_s": _float(row["Requests/s"]), "failures_per_s": _float(row["Failures/s"]),
                            "p50_ms": _float(row["50%"]), "p95_ms": _float(row["95%"]), "p99_ms": _float(row["99%"])})
    if history:
        t0 = history[0]["t"]
        for h in history:
            h["t"] -= t0
    return {"endpoints": endpoints, "history": history}


def plot(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = report["history"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    t = [h["t"] for h in history]
    axes[0].plot(t, [h["requests_per_s"] or 0 for h in history], label="requests/s")
    axes[0].plot(t, [h["failures_per_s"] or 0 for h in history], label="failures/s", color="tab:red")
    axes[0].set(xlabel="seconds", title="throughput")
    axes[0].legend()
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        axes[1].plot(t, [h[key] for h in history], label=key.removesuffix("_ms"))
    axes[1].set(xlabel="seconds", ylabel="ms", title="latency (all endpoints)")
    axes[1].legend()
    axes[2].axis("off")
    rows = [[name.replace("POST ", "").replace("GET ", ""), e["requests"], e["failures"], e["median_ms"], e["p99_ms"],
             f"{e['requests_per_s']:.1f}"] for name, e in report["endpoints"].items()]
    table = axes[2].table(cellText=rows, colLabels=["endpoint", "reqs", "fails", "p50 ms", "p99 ms", "req/s"],
                          loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_test(host: str, users: int, spawn_rate: float, seconds: int, user_classes: list[str], out: Path,
              env: dict | None = None) -> dict:
    """Run locust, write ``out``.json and ``out``.png, return the report."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "locust"
        run_locust(host, users, spawn_rate, seconds, user_classes, prefix, env)
        report = read_stats(prefix)
    report["settings"] = {"host": host, "users": users, "spawn_rate": spawn_rate, "seconds": seconds,
                          "user_classes": user_classes}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"), f"locust {' '.join(user_classes) or 'all users'}: {users} users, {host}")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True, help="base URL of matta serve / matta route / the Ray app")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--spawn-rate", type=float, default=8)
    p.add_argument("--time", type=int, default=60, help="seconds")
    p.add_argument("--user-class", action="append", default=[], help="ABUser, SloUser, PinnedUser (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS / "load_test")
    args = p.parse_args(argv)
    report = load_test(args.host, args.users, args.spawn_rate, args.time, args.user_class, args.out)
    for name, e in report["endpoints"].items():
        print(f"{name:45s} {e['requests']:7d} reqs {e['failures']:5d} fails  p50 {e['median_ms']} ms  "
              f"p99 {e['p99_ms']} ms  {e['requests_per_s']:.1f} req/s")
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
