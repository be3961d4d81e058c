"""Guardrails (pure): the config schema, evaluation on logged rows, rollback, and the monitor with a fake clock."""

from __future__ import annotations

import numpy as np
import pytest

from router.ab_log import Exposure, Outcome
from router.experiment import Assigner, parse_experiment
from router.guardrails import GuardrailMonitor, evaluate, rolled_back

ARMS = [{"name": "control", "weight": 50, "policy": {"kind": "fixed", "width": "ta"}},
        {"name": "treatment", "weight": 50, "policy": {"kind": "fixed", "width": "s"}}]


def config(*guardrails, **extra):
    return parse_experiment({"name": "exp", "salt": "s", "arms": ARMS, "guardrails": list(guardrails), **extra})


def rows(rng, units=60, requests=5, error=None, latency=None, success=None):
    """Per arm: `units` users of `requests` requests; error/success probabilities and latency means per arm."""
    error, success = error or {}, success or {}
    latency = latency or {}
    exposures, outcomes = [], []
    for arm in ("control", "treatment"):
        for u in range(units):
            for j in range(requests):
                rid = f"{arm}-{u}-{j}"
                failed = rng.random() < error.get(arm, 0.0)
                exposures.append(Exposure(rid, "exp", f"{arm}-user-{u}", "hash", arm, "p", "ta",
                                          503 if failed else 200, float(rng.exponential(latency.get(arm, 0.1))),
                                          8, 16, float(len(exposures))))
                if arm in success:
                    outcomes.append(Outcome("exp", rid, None, "success", float(rng.random() < success[arm]),
                                            float(len(exposures))))
    return exposures, outcomes


# --- config ----------------------------------------------------------------------------------------


def test_guardrails_parse_with_defaults_and_old_configs_keep_working():
    old = parse_experiment({"name": "exp", "salt": "s", "arms": ARMS})
    assert old.guardrails == [] and old.guardrail_check_s == 10.0
    cfg = config({"metric": "latency_s", "quantile": 0.99, "max": 2.0}, {"metric": "error_rate", "max": 0.02},
                 {"metric": "success", "max_drop": 0.1, "name": "success-drop"})
    assert [g.label for g in cfg.guardrails] == ["latency_s_p99_max", "error_rate_max", "success-drop"]
    assert (cfg.guardrails[0].alpha, cfg.guardrails[0].min_units) == (0.05, 30)


@pytest.mark.parametrize(("guardrail", "message"), [
    ({"metric": "error_rate"}, r"guardrails\.0: give exactly one of max, min, max_drop, max_rise; got none"),
    ({"metric": "error_rate", "max": 0.1, "min": 0.0}, r"guardrails\.0: .*got \['max', 'min'\]"),
    ({"metric": "latency_s", "quantile": 0.99, "min": 1.0}, r"guardrails\.0: quantile 0.99 needs `max`"),
    ({"metric": "latency_s", "quantile": 1.5, "max": 1.0}, r"guardrails\.0\.quantile"),
    ({"metric": "success", "max_drop": -0.1}, r"guardrails\.0\.max_drop"),
    ({"metric": "bad metric", "max": 1}, r"guardrails\.0\.metric"),
    ({"metric": "error_rate", "max": 0.1, "alpha": 0}, r"guardrails\.0\.alpha"),
    ({"metric": "error_rate", "max": 0.1, "surprise": 1}, r"guardrails\.0\.surprise"),
])
def test_invalid_guardrails_name_the_field(guardrail, message):
    with pytest.raises(ValueError, match=message):
        config(guardrail)


def test_duplicate_guardrails_and_all_zero_weights_are_refused_and_a_zero_weight_arm_gets_no_units():
    with pytest.raises(ValueError, match="guardrail names must be unique"):
        config({"metric": "error_rate", "max": 0.1}, {"metric": "error_rate", "max": 0.2})
    with pytest.raises(ValueError, match=r"at least one arm needs a weight > 0, got \[0.0, 0.0\]"):
        parse_experiment({"name": "exp", "salt": "s", "arms": [{**a, "weight": 0} for a in ARMS]})
    back = rolled_back(config(), ["treatment"])
    assert [a.weight for a in back.arms] == [50, 0]
    assert {Assigner(back).assign(f"u{i}").arm for i in range(2000)} == {"control"}
    with pytest.raises(ValueError, match="control arm 'control' cannot be rolled back"):
        rolled_back(config(), ["control"])
    with pytest.raises(ValueError, match=r"unknown arm\(s\) \['nope'\]"):
        rolled_back(config(), ["nope"])


# --- evaluation ------------------------------------------------------------------------------------


def test_a_treatment_that_fails_too_often_breaches_and_one_within_its_limits_does_not():
    exposures, outcomes = rows(np.random.default_rng(0), error={"control": 0.0, "treatment": 0.3})
    guard = config({"metric": "error_rate", "max": 0.05}, {"metric": "latency_s", "max": 5.0})
    checks = {c.guardrail: c for c in evaluate(guard, exposures, outcomes)}
    assert {c.arm for c in checks.values()} == {"treatment"}  # the control is never judged
    error = checks["error_rate_max"]
    assert error.breached and error.units == 60 and error.interval[0] > 0.05
    assert error.reason.startswith("breached: mean error_rate 0.") and "> limit 0.05" in error.reason
    assert not checks["latency_s_max"].breached and checks["latency_s_max"].reason.startswith("kept")


def test_quantile_limits_and_relative_drops():
    rng = np.random.default_rng(1)
    exposures, outcomes = rows(rng, units=80, latency={"control": 0.1, "treatment": 1.0},
                               success={"control": 0.6, "treatment": 0.3})
    guard = config({"metric": "latency_s", "quantile": 0.9, "max": 0.5},
                   {"metric": "success", "max_drop": 0.1}, {"metric": "success", "max_rise": 0.5, "name": "rise"})
    checks = {c.guardrail: c for c in evaluate(guard, exposures, outcomes)}
    p90 = checks["latency_s_p90_max"]  # exponential with mean 1 s: 61% of requests over 0.5 s, limit 10%
    assert p90.breached and p90.limit == pytest.approx(0.1) and p90.estimate == pytest.approx(0.61, abs=0.08)
    drop = checks["success_max_drop"]  # lift -50%, limit -10%
    assert drop.breached and drop.interval[1] < -0.1 and drop.estimate == pytest.approx(-0.5, abs=0.15)
    assert not checks["rise"].breached
    zero_control = [Outcome("exp", o.request_id, None, "success", 0.0 if o.request_id.startswith("control") else o.value,
                            o.created_unix) for o in outcomes]
    (undefined,) = evaluate(config({"metric": "success", "max_drop": 0.1}), exposures, zero_control)
    assert not undefined.breached and undefined.reason == "cannot judge: lift of success against the control is undefined"


def test_guardrails_wait_for_min_units_and_skip_arms_already_at_weight_zero():
    exposures, outcomes = rows(np.random.default_rng(2), units=10, error={"treatment": 1.0})
    guard = config({"metric": "error_rate", "max": 0.05})
    (waiting,) = evaluate(guard, exposures, outcomes)
    assert not waiting.breached and waiting.reason == "waiting: 10 units < min_units 30"
    (acting,) = evaluate(config({"metric": "error_rate", "max": 0.05, "min_units": 10}), exposures, outcomes)
    assert acting.breached
    assert evaluate(rolled_back(guard, ["treatment"]), exposures, outcomes) == []
    assert evaluate(guard, [], []) == []  # nothing logged yet


def test_monitor_reads_the_log_only_when_due_and_rolls_back_breaching_arms():
    now = [100.0]
    exposures, outcomes = rows(np.random.default_rng(3), error={"treatment": 0.5})
    guard = config({"metric": "error_rate", "max": 0.05}, guardrail_check_s=30)
    reads = []

    def load():
        reads.append(now[0])
        return exposures, outcomes

    monitor = GuardrailMonitor(clock=lambda: now[0])
    rollback = monitor.check(guard, load)
    assert reads == [100.0] and [a.weight for a in rollback.config.arms] == [50, 0]
    assert [(b.arm, b.guardrail) for b in rollback.breaches] == [("treatment", "error_rate_max")]
    now[0] = 129.0
    assert monitor.check(guard, load) is None and reads == [100.0]  # not due yet
    now[0] = 130.0
    assert monitor.check(rollback.config, load) is None and reads == [100.0, 130.0]  # rolled back: nothing left
    assert monitor.check(config(), load) is None and not monitor.due(config())  # no guardrails: never reads
