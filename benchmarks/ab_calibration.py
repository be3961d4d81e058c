"""A/A simulations of the A/B analysis (``router.ab_analysis``), shared by the figures
(``python -m benchmarks.ab_simulations``) and the calibration tests (``tests/test_ab_simulations.py``).

Thousands of simulated experiments, vectorised with numpy, analysed with the functions ``matta ab
analyze`` uses; the old per-row analysis (every request an observation: a two-proportion z-test)
is kept here as the reference it replaced.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from router import sequential
from router.ab_analysis import compare, interval_half_width, ratio_estimate

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
