"""Run the locust scenarios headless against a server and turn locust's CSV into a report (JSON + PNG).

    python -m benchmarks.load_test --host http://127.0.0.1:8000 --users 16 --time 60 --user-class SloUser
    python -m benchmarks.load_test --host http://127.0.0.1:8000 --user-class ABUser --out benchmarks/results/load_ab

Works against `matta serve`, `matta route` and the Ray Serve app alike (same API). The report
has requests/s and failures/s over time, latency percentiles over time, and a per-endpoint
table (requests, failures, median, p95, p99, requests/s).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness import load_test

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


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
