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

``tests/test_ab_simulations.py`` asserts the same rates; this script writes the figures:

    python benchmarks/ab_simulations.py [--experiments 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from router import sequential
from router.ab_analysis import compare, interval_half_width, ratio_estimate

RESULTS = Path(__file__).parent / "results"
ALPHA = 0.05


def binomial_interval(experiments: int, rate: float = ALPHA, level: float = 0.99) -> tuple[float, float]:
    """The central ``level`` interval of the rate of ``Binomial(experiments, rate)`` (exact quantiles)."""
    low, high = stats.binom.ppf([(1 - level) / 2, (1 + level) / 2], experiments, rate)
    return float(low) / experiments, float(high) / experiments


def simulate_aa(rng: np.random.Generator, experiments: int, units_per_arm: int, looks: int = 1,
                mean_requests: float = 10.0) -> dict[str, np.ndarray]:
    """Per-unit aggregates of A/A experiments, shape ``(experiments, 2 arms, units, looks)``, cumulative over looks.

    Units arrive uniformly over the experiment and send their requests over the next 30% of it, so
    each look sees more units and more requests of the units already there. Each unit has a success
    probability of 0.1 or 0.9 (one ``success`` per request) and a latency scale (lognormal); a
    request's latency is Gamma(2, scale), so a unit's latency sum is Gamma(2 * requests, scale).
    Returns ``requests``, ``successes`` and ``latency_s`` (sums per unit up to each look).
    """
    shape = (experiments, 2, units_per_arm)
    requests = 1 + rng.poisson(mean_requests - 1, shape)
    success_p = rng.choice([0.1, 0.9], shape)
    latency_scale = rng.lognormal(-2.0, 0.5, shape)
    start = rng.random(shape) * 0.7
    look_times = np.linspace(0, 1, looks + 1)[1:]
    # Requests of a unit fall uniformly in [start, start + 0.3]: the fraction sent by each look.
    sent = np.clip((look_times - start[..., None]) / 0.3, 0, 1)
    new_fraction = np.diff(sent, prepend=0.0, axis=-1)
    new_requests = np.zeros((*shape, looks), dtype=np.int64)
    left, left_fraction = requests.copy(), np.ones(shape)
    for k in range(looks):  # a multinomial split of each unit's requests over the looks, as conditional binomials
        p = np.divide(new_fraction[..., k], left_fraction, out=np.zeros(shape), where=left_fraction > 1e-12)
        new_requests[..., k] = rng.binomial(left, np.clip(p, 0, 1))
        left -= new_requests[..., k]
        left_fraction -= new_fraction[..., k]
    new_requests[..., -1] += left  # rounding leftovers belong to the final look (fraction 1 by then)
    new_successes = rng.binomial(new_requests, success_p[..., None])
    new_latency = rng.gamma(2.0 * new_requests, latency_scale[..., None])
    return {"requests": np.cumsum(new_requests, axis=-1), "successes": np.cumsum(new_successes, axis=-1),
            "latency_s": np.cumsum(new_latency, axis=-1)}


def per_unit_significant(sums: np.ndarray, counts: np.ndarray, tuning_units: float | None = None) -> np.ndarray:
    """``p < alpha`` of the per-unit analysis for aggregates shaped ``(..., 2 arms, units)``."""
    control = ratio_estimate(sums[..., 0, :], counts[..., 0, :])
    arm = ratio_estimate(sums[..., 1, :], counts[..., 1, :])
    p = compare(control, arm, tuning_units)["p"]
    return np.nan_to_num(p, nan=1.0) < ALPHA


def per_row_significant(successes: np.ndarray, requests: np.ndarray) -> np.ndarray:
    """The old per-row analysis (reference): a pooled two-proportion z-test over requests, as if each were independent.

    Aggregates shaped ``(..., 2 arms, units)``; this is what decided ``significant`` for 0/1 metrics
    before issue 19.
    """
    s, n = successes.sum(axis=-1), requests.sum(axis=-1)
    pooled = s.sum(axis=-1) / n.sum(axis=-1)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n[..., 0] + 1 / n[..., 1]))
    z = np.abs(s[..., 1] / n[..., 1] - s[..., 0] / n[..., 0]) / se
    return 2 * stats.norm.sf(z) < ALPHA


def unit_level_fpr(rng: np.random.Generator, experiments: int = 2000, units_per_arm: int = 100) -> dict[str, float]:
    """False-positive rates of one look at the end of A/A experiments, per-unit and per-row."""
    sim = {k: v[..., -1] for k, v in simulate_aa(rng, experiments, units_per_arm).items()}
    return {
        "per_unit_success": float(per_unit_significant(sim["successes"], sim["requests"]).mean()),
        "per_unit_latency_s": float(per_unit_significant(sim["latency_s"], sim["requests"]).mean()),
        "per_row_success": float(per_row_significant(sim["successes"], sim["requests"]).mean()),
    }


def peeking_fpr(rng: np.random.Generator, experiments: int = 2000, units_per_arm: int = 100,
                looks: int = 12) -> dict[str, float]:
    """False-positive rates when A/A experiments are looked at ``looks`` times and stopped at the first p < alpha."""
    sim = simulate_aa(rng, experiments, units_per_arm, looks)
    moved = lambda a: np.moveaxis(a, -1, 1)  # (experiments, looks, arms, units)
    successes, requests = moved(sim["successes"]), moved(sim["requests"])
    fixed = per_unit_significant(successes, requests)
    seq = per_unit_significant(successes, requests, tuning_units=2 * units_per_arm)
    return {
        "fixed_horizon_last_look": float(fixed[:, -1].mean()),
        "fixed_horizon_any_look": float(fixed.any(axis=1).mean()),
        "sequential_last_look": float(seq[:, -1].mean()),
        "sequential_any_look": float(seq.any(axis=1).mean()),
    }


def guardrail_false_rollback_rate(rng: np.random.Generator, experiments: int = 2000, units: int = 100,
                                  looks: int = 12, alpha: float = ALPHA) -> float:
    """How often a ``max`` guardrail rolls back an arm that sits exactly at its limit, checked ``looks`` times.

    The arm's success rate per request is 0.5 (units at 0.1 or 0.9), the limit ``max: 0.5``: the
    worst case for a guardrail that must not act on an arm that keeps its limit. The check is the
    one of :mod:`router.guardrails`: the arm's confidence sequence wholly above the limit, from
    ``min_units`` (30) units on.
    """
    sim = simulate_aa(rng, experiments, units, looks)
    successes, requests = (np.moveaxis(sim[k][:, 1], -1, 1) for k in ("successes", "requests"))  # (exp, looks, units)
    estimate = ratio_estimate(successes, requests)
    low = estimate.mean - interval_half_width(estimate, sequential.DEFAULT_TUNING_UNITS, alpha)
    breached = (estimate.units >= 30) & (np.nan_to_num(low, nan=-np.inf) > 0.5)
    return float(breached.any(axis=1).mean())


def ci_width_ratios(rng: np.random.Generator, requests_per_unit: list[int], users: int = 40,
                    experiments: int = 500) -> dict[int, float]:
    """Mean per-row / per-unit 95% CI width of the difference, on issue 19's A/A example."""
    out = {}
    for m in requests_per_unit:
        p = rng.choice([0.1, 0.9], (experiments, 2, users // 2))
        successes = rng.binomial(m, p)
        requests = np.full_like(successes, m)
        c = compare(ratio_estimate(successes[:, 0], requests[:, 0]), ratio_estimate(successes[:, 1], requests[:, 1]))
        rate = successes.sum(-1) / requests.sum(-1)
        row_se = np.sqrt((rate * (1 - rate) / requests.sum(-1)).sum(-1))  # Wald, requests independent
        out[m] = float(np.nanmean(stats.norm.ppf(0.975) * row_se / c["diff_half"]))
    return out


def sequential_width_ratio(units: np.ndarray, tuning_units: float) -> np.ndarray:
    """Confidence-sequence / fixed-horizon (normal) 95% half-width at ``units`` units: the price of peeking."""
    return sequential.half_width(1.0, units, ALPHA, tuning_units) / stats.norm.ppf(0.975)


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
    fig.savefig(path, dpi=110)
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
