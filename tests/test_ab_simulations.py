"""A/A simulations: the per-unit analysis keeps its false-positive rate at alpha, the sequential one under peeking.

Thousands of simulated experiments per test, vectorised (``benchmarks/ab_simulations.py``, which
also draws the README's figure), with fixed seeds. A rate is "at alpha" when it lies in the 99%
binomial interval of 0.05 for that many experiments; the old per-row analysis, kept there as the
reference, must lie outside it, or the simulation would not be able to tell the two apart.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.ab_calibration import binomial_interval, guardrail_false_rollback_rate, peeking_fpr, unit_level_fpr
from router import sequential

EXPERIMENTS = 2000
LOW, HIGH = binomial_interval(EXPERIMENTS)  # (0.038, 0.063)


def test_aa_per_unit_analysis_has_the_nominal_false_positive_rate_and_per_row_does_not():
    rates = unit_level_fpr(np.random.default_rng(0), EXPERIMENTS, units_per_arm=100)
    assert LOW <= rates["per_unit_success"] <= HIGH, rates
    assert LOW <= rates["per_unit_latency_s"] <= HIGH, rates
    assert rates["per_row_success"] > HIGH, rates  # about 0.45: every request counted as independent


def test_peeking_inflates_the_fixed_horizon_test_but_not_the_sequential_one():
    rates = peeking_fpr(np.random.default_rng(1), EXPERIMENTS, units_per_arm=100, looks=12)
    assert rates["fixed_horizon_any_look"] > HIGH, rates  # stop at the first p < alpha: about 0.2
    assert rates["sequential_any_look"] <= 0.05, rates


def test_a_guardrail_checked_at_every_look_rarely_rolls_back_an_arm_that_keeps_its_limit():
    assert guardrail_false_rollback_rate(np.random.default_rng(2), EXPERIMENTS, units=100, looks=12) <= 0.05


@pytest.mark.parametrize("units", [3, 50, 1000, 10**6])
def test_always_valid_p_value_crosses_alpha_exactly_where_the_sequence_excludes_the_null(units):
    var, tuning = 0.01, 800
    half = float(sequential.half_width(var, units, 0.05, tuning))
    assert sequential.p_value(0.999 * half, 0.0, var, units, tuning) > 0.05
    assert sequential.p_value(1.001 * half, 0.0, var, units, tuning) < 0.05
    assert half > 1.96 * math.sqrt(var)  # always wider than the fixed-horizon interval


def test_confidence_sequence_is_tightest_near_the_tuning_size_and_parameters_are_checked():
    ratio = [float(sequential.half_width(1.0 / n, n, 0.05, 1000)) * math.sqrt(n) for n in (100, 1000, 10_000)]
    assert ratio[1] < ratio[0] and ratio[1] < ratio[2]
    assert sequential.p_value(0.0, 0.0, 0.0, 10) == 1.0 and sequential.p_value(0.1, 0.0, 0.0, 10) == 0.0
    with pytest.raises(ValueError, match="tuning_units must be > 0, got 0"):
        sequential.mixing_rho(0, 0.05)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got 1.5"):
        sequential.mixing_rho(100, 1.5)
