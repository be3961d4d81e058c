"""Guardrails that act: evaluate an experiment's limits on its logged rows, and roll back the arms that breach.

A guardrail (config: :class:`router.experiment.Guardrail`) is a limit on one treatment arm. Every
non-control arm with a weight above 0 is checked against every guardrail, on the same per-unit
estimates as ``matta ab analyze`` (:mod:`router.ab_analysis`), with the sequential test's
confidence sequences (:mod:`router.sequential`), because a server checks again and again:

* ``max`` / ``min``: the arm's mean per request (a ratio metric over units) breaches when its
  (1 - alpha) confidence sequence lies wholly above ``max`` (below ``min``).
* ``quantile: q, max: x``: "the arm's q-quantile is at most x" means "at most a fraction 1 - q
  of its requests exceed x"; the exceedance rate, a 0/1 metric per request, is estimated per
  unit like any other, and breaches when its sequence lies wholly above ``1 - q``.
* ``max_drop`` / ``max_rise``: against the control, the arm's lift (``mean / control mean - 1``)
  breaches when its sequence lies wholly below ``-max_drop`` (above ``max_rise``).

Because the sequences hold at every look at once, checking every few seconds and rolling back at
the first breach wrongly rolls back an arm that keeps its limit with probability at most
``alpha`` (per guardrail and arm; asymptotically, so only from ``min_units`` units on). The
control is never rolled back: it is what the others are measured against. A rollback sets the
arm's weight to 0 (:func:`rolled_back`): its units move to the other arms by the usual range
arithmetic of :class:`router.experiment.Assigner`, and the arm stays in the config so its rows
still analyse.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from router.ab_analysis import RatioEstimate, compare, interval_half_width, observations, unit_estimate
from router.experiment import ExperimentConfig, Guardrail


@dataclass(frozen=True)
class GuardrailCheck:
    """One guardrail on one arm at one evaluation."""

    arm: str
    guardrail: str  # its label
    units: int
    estimate: float | None  # the arm's mean, exceedance rate, or lift
    interval: tuple[float, float] | None  # its (1 - alpha) confidence sequence
    limit: float  # on the same scale as the estimate
    breached: bool
    reason: str  # one line for logs and the admin API


def evaluate(config: ExperimentConfig, exposures: Iterable[Mapping], outcomes: Iterable[Mapping]) -> list[GuardrailCheck]:
    """Every guardrail of ``config`` on every treatment arm with a weight above 0, on the logged rows.

    Rows of other experiments are ignored. An experiment with no exposures yet has nothing to check.
    """
    arms = [a for a in config.arms[1:] if a.weight > 0]
    if not config.guardrails or not arms:
        return []
    try:
        obs = observations(config, exposures, outcomes)
    except ValueError:  # no exposure of this experiment logged yet
        return []
    control = config.arms[0].name
    checks = []
    for guardrail in config.guardrails:
        by_arm = obs.values.get(guardrail.metric, {})
        pairs = {a.name: by_arm.get(a.name, []) for a in config.arms}
        if guardrail.quantile is not None:
            pairs = {a: [(u, float(v > guardrail.max)) for u, v in p] for a, p in pairs.items()}
        estimates = {a: unit_estimate(p) for a, p in pairs.items()}
        checks += [_check(guardrail, arm.name, estimates[arm.name], estimates[control]) for arm in arms]
    return checks


def _check(g: Guardrail, arm: str, estimate: RatioEstimate, control: RatioEstimate) -> GuardrailCheck:
    relative = g.max_drop is not None or g.max_rise is not None
    units = int(estimate.units)
    if g.quantile is not None:
        limit, what = 1 - g.quantile, f"share of requests with {g.metric} > {g.max:g} (p{100 * g.quantile:g} <= {g.max:g})"
    elif relative:
        limit = -g.max_drop if g.max_drop is not None else g.max_rise
        what = f"lift of {g.metric} against the control"
    else:
        limit, what = (g.max if g.max is not None else g.min), f"mean {g.metric}"
    upper = g.max is not None or g.max_rise is not None  # the limit is a ceiling
    enough = min(units, int(control.units)) if relative else units
    if enough < g.min_units:
        return GuardrailCheck(arm, g.label, units, None, None, limit, False,
                              f"waiting: {enough} units < min_units {g.min_units}")
    if relative:
        c = compare(control, estimate, g.tuning_units, g.alpha)
        center, half = float(c["lift"]), float(c["lift_half"])
    else:
        center, half = float(estimate.mean), float(interval_half_width(estimate, g.tuning_units, g.alpha))
    if not (math.isfinite(center) and math.isfinite(half)):  # e.g. a lift against a control mean of 0
        return GuardrailCheck(arm, g.label, units, None, None, limit, False, f"cannot judge: {what} is undefined")
    low, high = center - half, center + half
    breached = low > limit if upper else high < limit
    verdict = "breached" if breached else "kept"
    reason = (f"{verdict}: {what} {center:.4g}, {1 - g.alpha:.0%} confidence sequence [{low:.4g}, {high:.4g}] "
              f"{'>' if upper else '<'} limit {limit:.4g}" if breached else
              f"{verdict}: {what} {center:.4g} [{low:.4g}, {high:.4g}], limit {limit:.4g}")
    return GuardrailCheck(arm, g.label, units, center, (low, high), limit, breached, reason)


def rolled_back(config: ExperimentConfig, arms: Iterable[str]) -> ExperimentConfig:
    """``config`` with the weight of ``arms`` set to 0 (validated like any new config)."""
    arms = set(arms)
    unknown = arms - {a.name for a in config.arms}
    if unknown:
        raise ValueError(f"cannot roll back unknown arm(s) {sorted(unknown)}; arms: {[a.name for a in config.arms]}")
    if config.arms[0].name in arms:
        raise ValueError(f"the control arm {config.arms[0].name!r} cannot be rolled back")
    data = config.model_dump()
    for arm in data["arms"]:
        if arm["name"] in arms:
            arm["weight"] = 0.0
    return ExperimentConfig.model_validate(data)


@dataclass(frozen=True)
class Rollback:
    """What a monitor decided: the config to reload, and the breaches that made it."""

    config: ExperimentConfig
    breaches: list[GuardrailCheck]


class GuardrailMonitor:
    """Evaluates an experiment's guardrails at most every ``guardrail_check_s`` (by ``clock``) and decides rollbacks.

    The server calls :meth:`check` often; it reads the log (``load_rows``) only when a check is due.
    ``last_checks`` holds the latest evaluation, for the admin API.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last_checks: list[GuardrailCheck] = []
        self.checked_at: float | None = None

    def due(self, config: ExperimentConfig) -> bool:
        """Whether ``config`` has guardrails and the last check is at least ``guardrail_check_s`` old."""
        return bool(config.guardrails) and (self.checked_at is None
                                            or self.clock() - self.checked_at >= config.guardrail_check_s)

    def check(self, config: ExperimentConfig,
              load_rows: Callable[[], tuple[Iterable[Mapping], Iterable[Mapping]]]) -> Rollback | None:
        """Evaluate ``config``'s guardrails if due; a :class:`Rollback` when a treatment arm breached one."""
        if not self.due(config):
            return None
        self.checked_at = self.clock()
        self.last_checks = evaluate(config, *load_rows())
        breaches = [c for c in self.last_checks if c.breached]
        if not breaches:
            return None
        return Rollback(rolled_back(config, {b.arm for b in breaches}), breaches)
