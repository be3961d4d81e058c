"""Are the A/B analysis's error rates what it claims? A/A simulations of ``router.ab_analysis``.

Thousands of simulated A/A experiments (both arms the same), vectorised with numpy, analysed with
the same functions ``matta ab analyze`` uses:

1. **Unit of analysis.** Units (users) send several requests with correlated outcomes: each unit
   has its own success probability (0.1 or 0.9, as in issue 19's report) and latency scale, and
   a random number of requests (1 + Poisson(9)). The per-unit analysis (ratio metrics, delta
   method) should flag 5% of A/A experiments at alpha 0.05; the old per-row analysis (every
   request an observation: a two-proportion z-test, kept here as the reference) flags many more.
2. **Peeking.** The same experiments looked at after every batch of exposures (12 looks while
   units arrive and send requests), stopping at the first ``p < alpha``: the fixed-horizon test
   exceeds alpha, the sequential one (confidence sequences) stays at or below it.
3. **Guardrails.** An arm exactly at a ``max`` limit, checked at every look: how often it is
   wrongly rolled back (at most alpha).
4. **CI width.** Per-row / per-unit 95% CI width on issue 19's example (40 users, p 0.1 or 0.9,
   1 to 30 requests each), and sequential / fixed-horizon width as units accrue.

``tests/test_ab_simulations.py`` asserts the same rates (both use ``benchmarks/ab_calibration.py``);
this script writes the figures:

    python -m benchmarks.ab_simulations [--experiments 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.ab_calibration import (
    ALPHA,
    binomial_interval,
    ci_width_ratios,
    guardrail_false_rollback_rate,
    peeking_fpr,
    sequential_width_ratio,
    unit_level_fpr,
)
from benchmarks.harness import save_png

RESULTS = Path(__file__).parent / "results"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    low, high = result["binomial_99_interval"]
    for ax, (title, rates) in zip(axes[:2], [("A/A, one look", result["unit_level"]),
                                             ("A/A, 12 looks, stop at first p < alpha", result["peeking"])],
                                  strict=True):
        names = list(rates)
        ax.barh(names, [rates[n] for n in names], color=["tab:red" if rates[n] > high else "tab:green" for n in names])
        ax.axvspan(low, high, color="grey", alpha=0.3)
        ax.axvline(ALPHA, color="black", lw=1)
        ax.set(title=title, xlabel="false-positive rate at alpha 0.05\n(grey: 99% binomial interval of 5%)")
    ratios = result["ci_width_ratio_per_row_over_per_unit"]
    axes[2].plot([int(m) for m in ratios], list(ratios.values()), "o-")
    axes[2].axhline(1, color="black", lw=1)
    axes[2].set(title="issue 19 example: 40 users, p 0.1 or 0.9", xlabel="requests per user",
                ylabel="per-row / per-unit CI width", ylim=(0, 1.1))
    seq = result["sequential_width_ratio"]
    axes[3].semilogx(seq["units_over_tuning"], seq["ratio"])
    axes[3].set(title="price of peeking", xlabel="units / tuning_units", ylabel="sequential / fixed CI width")
    fig.suptitle(f"A/B analysis calibration ({result['experiments']} simulated A/A experiments per bar)")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiments", type=int, default=2000, help="simulated A/A experiments per rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "ab_simulations.json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    units_over_tuning = np.geomspace(0.01, 10, 60)
    result = {
        "experiments": args.experiments,
        "alpha": ALPHA,
        "binomial_99_interval": binomial_interval(args.experiments),
        "unit_level": unit_level_fpr(rng, args.experiments),
        "peeking": peeking_fpr(rng, args.experiments),
        "guardrail_false_rollback_at_the_limit": guardrail_false_rollback_rate(rng, args.experiments),
        "ci_width_ratio_per_row_over_per_unit": ci_width_ratios(rng, [1, 2, 5, 10, 15, 30]),
        "sequential_width_ratio": {"units_over_tuning": units_over_tuning.tolist(),
                                   "ratio": sequential_width_ratio(1000 * units_over_tuning, 1000).tolist()},
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "sequential_width_ratio"}, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
