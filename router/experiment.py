"""A/B experiments over width policies: the config file and sticky assignment of units to arms.

Config (YAML, validated; errors name the field)::

    name: width-policy-test
    salt: "2026-11"
    unit: user              # the OpenAI `user` field, or `header:<name>` for a request header
    traffic: 1.0            # fraction of units in the experiment (the rest: the server's policy)
    arms:                   # weights are proportions, they need not sum to 100
      - {name: control,   weight: 50, policy: {kind: fixed, width: ta}}
      - {name: treatment, weight: 50, policy: {kind: slo, min_width: m}}
    guardrails:             # optional: a treatment arm that breaches one is rolled back (weight 0)
      - {metric: latency_s, quantile: 0.99, max: 2.0}   # the arm's p99 latency stays under 2 s
      - {metric: error_rate, max: 0.02}                 # at most 2% of its requests fail
      - {metric: success, max_drop: 0.10}               # its success rate at most 10% below the control's
    guardrail_check_s: 10   # how often a server evaluates them (default 10)
    metrics:                # optional: the values /v1/feedback accepts per outcome metric (a 400 outside);
      success: {min: 0, max: 1}   # a metric not listed: finite, |value| <= the server's --max-feedback-abs

Guardrails are evaluated by :mod:`router.guardrails` (semantics and statistics there); every
limit is on one arm, each of ``max``, ``min``, ``max_drop`` and ``max_rise`` alone.

Assignment is deterministic: MurmurHash3 (``mmh3``, 32-bit, unsigned) of ``"<salt>:<unit>"`` picks
one of 10,000 buckets, and the arms own consecutive bucket ranges in config order, sized by
weight. The same unit lands in the same arm for as long as ``salt``, the arm order and the
weights stay the same, on every replica and across restarts. Changing a weight moves the range
boundaries *after* the changed arm: only units whose bucket falls between an old and a new
boundary change arm (e.g. 50/50 -> 60/40 moves the 10% of units in buckets 5000-5999 from the
second arm to the first). Changing the salt reshuffles everyone. ``traffic`` uses an independent
hash (``"<salt>:traffic:<unit>"``), so raising it only adds units. Requests without a unit id
are assigned at random (not sticky) and recorded with ``assignment = "random"``, so the analysis
can count them apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from matta.configfile import read_yaml, validate
from router.policies import make_policy
from router.sequential import DEFAULT_TUNING_UNITS

BUCKETS = 10_000


class ArmPolicy(BaseModel):
    """The width policy of an arm; the same kinds as ``matta serve --policy``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["fixed", "slo"]
    width: str | None = Field(None, description="fixed: the width served")
    slo_ms: float | None = Field(None, gt=0, description="slo: default target for requests that give none")
    min_width: str | None = None
    shed: bool | None = None

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ArmPolicy:
        if self.kind == "fixed" and self.width is None:
            raise ValueError("a fixed policy needs `width`")
        if self.kind == "fixed" and (self.slo_ms is not None or self.min_width is not None or self.shed is not None):
            raise ValueError("slo_ms, min_width and shed belong to kind: slo")
        if self.kind == "slo" and self.width is not None:
            raise ValueError("`width` belongs to kind: fixed (use min_width for a floor)")
        return self

    def spec(self) -> str:
        """The policy spec string understood by :func:`router.policies.make_policy`."""
        if self.kind == "fixed":
            return f"fixed:{self.width}"
        options = [f"{k}={v}" for k, v in (("slo_ms", self.slo_ms), ("min_width", self.min_width),
                                           ("shed", None if self.shed is None else str(self.shed).lower()))
                   if v is not None]
        return "slo" + (":" + ",".join(options) if options else "")


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    weight: float = Field(ge=0, description="0 keeps the arm in the config but sends it no units (a rollback)")
    policy: ArmPolicy


class MetricRange(BaseModel):
    """The values ``/v1/feedback`` accepts for one outcome metric (both ends included)."""

    model_config = ConfigDict(extra="forbid")

    min: float | None = Field(None, allow_inf_nan=False, description="smallest value accepted")
    max: float | None = Field(None, allow_inf_nan=False, description="largest value accepted")

    @model_validator(mode="after")
    def _ordered(self) -> MetricRange:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


LIMITS = ("max", "min", "max_drop", "max_rise")


class Guardrail(BaseModel):
    """A limit one treatment arm must keep; breaching it, with the sequential test's confidence, rolls the arm back."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$",
                        description="latency_s, completion_tokens, error_rate, or an outcome metric of /v1/feedback")
    name: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="default: from the limit")
    quantile: float | None = Field(None, gt=0, lt=1, description="with max: a limit on this quantile, not the mean")
    max: float | None = Field(None, description="the arm's mean (or quantile) must stay at or below this")
    min: float | None = Field(None, description="the arm's mean must stay at or above this")
    max_drop: float | None = Field(None, gt=0, description="the arm's mean at most this fraction below the control's")
    max_rise: float | None = Field(None, gt=0, description="the arm's mean at most this fraction above the control's")
    alpha: float = Field(0.05, gt=0, lt=1, description="chance of a false rollback, however often it is checked")
    min_units: int = Field(30, ge=2, description="units the arm (and the control) need before the limit can act")
    tuning_units: float = Field(DEFAULT_TUNING_UNITS, gt=0, description="units at which the confidence sequence is tightest")

    @model_validator(mode="after")
    def _one_limit(self) -> Guardrail:
        given = [k for k in LIMITS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(LIMITS)}; got {given or 'none'}")
        if self.quantile is not None and given != ["max"]:
            raise ValueError(f"quantile {self.quantile} needs `max` (a p99 limit is `quantile: 0.99, max: <value>`)")
        return self

    @property
    def label(self) -> str:
        """The guardrail's name in logs and metrics: ``name``, or e.g. ``latency_s_p99_max``."""
        if self.name is not None:
            return self.name
        limit = next(k for k in LIMITS if getattr(self, k) is not None)
        return self.metric + (f"_p{100 * self.quantile:g}" if self.quantile is not None else "") + f"_{limit}"


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    salt: str = Field(min_length=1)
    unit: str = Field("user", description="'user' (the request's user field) or 'header:<name>'")
    traffic: float = Field(1.0, gt=0, le=1)
    arms: list[Arm] = Field(min_length=1)
    guardrails: list[Guardrail] = Field(default_factory=list)
    guardrail_check_s: float = Field(10.0, gt=0, description="seconds between a server's guardrail evaluations")
    metrics: dict[str, MetricRange] = Field(default_factory=dict, description="outcome metric -> the values "
                                            "/v1/feedback accepts (others: the server's --max-feedback-abs)")

    @field_validator("unit")
    @classmethod
    def _unit(cls, unit: str) -> str:
        if unit != "user" and not (unit.startswith("header:") and len(unit) > len("header:")):
            raise ValueError(f"unit must be 'user' or 'header:<name>', got {unit!r}")
        return unit.lower() if unit.startswith("header:") else unit

    @model_validator(mode="after")
    def _unique_arms(self) -> ExperimentConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        if not any(a.weight > 0 for a in self.arms):
            raise ValueError(f"at least one arm needs a weight > 0, got {[a.weight for a in self.arms]}")
        labels = [g.label for g in self.guardrails]
        if len(set(labels)) != len(labels):
            raise ValueError(f"guardrail names must be unique (set `name`), got {labels}")
        return self

    def check_widths(self, widths: list[str]) -> None:
        """Every width an arm names must exist in the served checkpoint."""
        for arm in self.arms:
            for field in ("width", "min_width"):
                value = getattr(arm.policy, field)
                if value is not None and value not in widths:
                    raise ValueError(f"arm {arm.name!r}: unknown {field} {value!r}; known: {widths}")

    @property
    def proportions(self) -> dict[str, float]:
        total = sum(a.weight for a in self.arms)
        return {a.name: a.weight / total for a in self.arms}


def parse_experiment(data: object, source: str = "experiment") -> ExperimentConfig:
    """Validate a parsed YAML/JSON mapping; errors name the field."""
    return validate(ExperimentConfig, data, source)


def load_experiment(path: str | Path) -> ExperimentConfig:
    return parse_experiment(read_yaml(path, "experiment file"), str(path))


def bucket(salt: str, key: str) -> int:
    """The unit's bucket in [0, BUCKETS): MurmurHash3 32-bit (unsigned) of ``"<salt>:<key>"``."""
    import mmh3

    return mmh3.hash(f"{salt}:{key}", signed=False) % BUCKETS


@dataclass(frozen=True)
class Assignment:
    arm: str | None  # None: the unit is outside the experiment's traffic
    assignment: Literal["hash", "random"]


class Assigner:
    """Maps units to arms for one config (immutable; a reload builds a new one)."""

    def __init__(self, config: ExperimentConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        total = sum(a.weight for a in config.arms)
        self._bounds: list[tuple[int, str]] = []
        cumulative = 0.0
        for arm in config.arms:
            cumulative += arm.weight
            self._bounds.append((round(BUCKETS * cumulative / total), arm.name))

    def arm_of_bucket(self, b: int) -> str:
        for upper, name in self._bounds:
            if b < upper:
                return name
        return self._bounds[-1][1]

    def assign(self, unit: str | None) -> Assignment:
        cfg = self.config
        if unit is None or unit == "":
            if self._rng.random() >= cfg.traffic:
                return Assignment(None, "random")
            return Assignment(self.arm_of_bucket(self._rng.randrange(BUCKETS)), "random")
        if cfg.traffic < 1 and bucket(cfg.salt, f"traffic:{unit}") >= round(BUCKETS * cfg.traffic):
            return Assignment(None, "hash")
        return Assignment(self.arm_of_bucket(bucket(cfg.salt, unit)), "hash")


@dataclass(frozen=True)
class _Live:
    config: ExperimentConfig
    assigner: Assigner
    policies: dict  # arm name -> WidthPolicy


class LiveExperiment:
    """The experiment a server runs now: assignment plus one width policy per arm.

    :meth:`reload` validates a new config completely (schema, widths, policies) before swapping
    it in with one reference assignment, so a bad config never replaces a good one and requests
    in flight keep the arm they were given.
    """

    def __init__(self, config: ExperimentConfig, widths: list[str], context, source: Path | None = None) -> None:
        self.widths = list(widths)
        self.context = context
        self.source = source
        self._live = self._build(config)

    def _build(self, config: ExperimentConfig) -> _Live:
        config.check_widths(self.widths)
        policies = {arm.name: make_policy(arm.policy.spec(), self.widths, self.context) for arm in config.arms}
        return _Live(config, Assigner(config), policies)

    @property
    def config(self) -> ExperimentConfig:
        return self._live.config

    def reload(self, config: ExperimentConfig) -> None:
        """Swap in ``config``; raises ValueError (and keeps the current one) if it is not servable."""
        self._live = self._build(config)

    def reload_from_source(self) -> None:
        if self.source is None:
            raise ValueError("this experiment was not loaded from a file")
        self.reload(load_experiment(self.source))

    def assign(self, unit: str | None) -> tuple[str, object, str, ExperimentConfig] | None:
        """(arm, its policy, assignment kind, config) for ``unit``, or None outside the experiment's traffic."""
        live = self._live
        a = live.assigner.assign(unit)
        if a.arm is None:
            return None
        return a.arm, live.policies[a.arm], a.assignment, live.config
