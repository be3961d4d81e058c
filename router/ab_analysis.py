"""Analysis of an A/B experiment over width policies: ``matta ab analyze``.

Reads any number of A/B log shards (see :mod:`router.ab_log`), merges them, and per arm reports
units, exposures, latency percentiles, the mix of widths served, and the mean of every metric
with a 95% CI; per metric and non-control arm, the difference and relative lift against the
control (the first arm of the config) with 95% CIs and p-values; and a sample-ratio-mismatch
(SRM) check of the hash-assigned units against the config's proportions.

Statistical choices, stated once:

* **Unit of analysis: the unit of randomisation.** Units (the config's ``unit``: a user, or a
  header value), not requests, are assigned to arms, and requests of one unit are correlated (a
  user who likes one answer likes the next), so the independent observations are units. Each
  unit is reduced to two numbers per metric, the sum of its values and their count, and a
  metric's mean per request is a *ratio metric*, ``sum over units / count over units``, whose
  variance comes from the delta method over units (Deng, Knoblich and Lu, "Applying the delta
  method in metric analytics", KDD 2018): ``n/(n-1) * sum_u (S_u - R N_u)^2 / (sum_u N_u)^2``.
  With one request per unit this is the ordinary variance of a mean; with equal requests per
  unit it equals the variance of the mean of per-unit means. Requests without a unit id (assigned
  at random per request) are each their own unit. Built-in metrics: ``latency_s`` and
  ``completion_tokens`` of served (200) requests, and ``error_rate``, the fraction of exposures
  that failed (any status but 200 and 499, a client that went away).
* **Attribution.** An outcome with a ``request_id`` goes to the arm (and unit) that served that
  request; an outcome given by ``unit`` only goes to the unit's arm. Units are sticky, but a
  weight change moves some units between arms: a unit's arm is the arm of its first hash-assigned
  exposure (by ``created_unix``, so shard clocks should agree), and such units are counted in
  ``units_in_several_arms``; their requests in each arm count as a unit of that arm.
* **Fixed-horizon tests (default).** Per-arm CI: Student t over the arm's units (``units - 1``
  degrees of freedom). Difference: Welch's t-test on the two ratio estimates, with
  Welch-Satterthwaite degrees of freedom from the units. Lift (``mean_arm / mean_control - 1``):
  delta-method standard error, same degrees of freedom. The same test serves 0/1 metrics (a
  proportion is a mean). Assumes the sample size was fixed in advance and the result is looked
  at once: see the peeking warning.
* **Sequential tests (``--sequential``).** Every interval is a 95% confidence sequence and every
  p-value an always-valid mixture-SPRT p-value (:mod:`router.sequential`) over the same
  per-unit estimates: valid however often the experiment is looked at, wider than the
  fixed-horizon ones.
* **SRM.** Chi-square goodness of fit of the units per arm against the config proportions,
  flagged at p < 0.001. Requests without a unit count in the metrics (their assignment is random
  too) but not in the SRM check, and are reported apart as ``random_exposures``.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from scipy import stats

from router import sequential
from router.ab_log import Exposure, Outcome
from router.experiment import ExperimentConfig, load_experiment

BUILTIN_METRICS = ("latency_s", "completion_tokens", "error_rate")
CLIENT_CLOSED = 499  # the client went away: its choice, not a failure of the arm
SRM_P_THRESHOLD = 0.001
MIN_UNITS = 30  # below this, normal approximations of means and proportions are shaky
PEEKING_WARNING = ("p-values assume one look at a fixed sample; checking repeatedly and stopping at the first "
                   "p < alpha inflates false positives (use --sequential to look at any time)")
EXPOSURE_COLUMNS = [f.name for f in fields(Exposure)]
OUTCOME_COLUMNS = [f.name for f in fields(Outcome)]
CI_LEVEL = 0.95


# --- reading shards --------------------------------------------------------------------------------


def load_shards(paths: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """Read and merge A/B log shards: ``(exposures, outcomes)`` as lists of dicts (column -> value).

    A path is a shard file or a directory, which means every ``*.sqlite`` in it; a shard named
    twice is read once. Files are opened read-only, so a live server's shard can be analysed.
    Raises ``ValueError`` for a missing path, an empty directory, or a file that is not a log.
    """
    exposures: list[dict] = []
    outcomes: list[dict] = []
    for path in _shard_files(paths):
        shard_exposures, shard_outcomes = _read_shard(path)
        exposures += shard_exposures
        outcomes += shard_outcomes
    return exposures, outcomes


def _shard_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.sqlite"))
            if not found:
                raise ValueError(f"{path}: no *.sqlite A/B log in this directory")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or directory")
    if not files:
        raise ValueError("no A/B log given")
    return list(dict.fromkeys(f.resolve() for f in files))


def _read_shard(path: Path) -> tuple[list[dict], list[dict]]:
    try:
        with closing(sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)) as conn:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = {"exposures", "outcomes"} - tables
            if missing:
                raise ValueError(f"{path}: not a matta A/B log (no table {', '.join(sorted(missing))})")
            return _select(conn, "exposures", EXPOSURE_COLUMNS), _select(conn, "outcomes", OUTCOME_COLUMNS)
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path}: cannot read it as a matta A/B log ({exc})") from exc


def _select(conn: sqlite3.Connection, table: str, columns: list[str]) -> list[dict]:
    """Every row of ``table`` as {column: value}; a column an older log lacks (``widths``) is None."""
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    chosen = [c for c in columns if c in present]
    rows = conn.execute(f"SELECT {', '.join(chosen)} FROM {table}")
    return [{**dict.fromkeys(columns), **dict(zip(chosen, row, strict=True))} for row in rows]


# --- statistics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatioEstimate:
    """A mean per request over units, ``sum / count``, and its delta-method variance.

    Floats, or numpy arrays of one shape when built from batched aggregates (the simulations).
    ``units`` counts the units with at least one value, ``n`` the values; ``var`` is NaN below 2 units.
    """

    mean: float | np.ndarray
    var: float | np.ndarray
    units: int | np.ndarray
    n: float | np.ndarray


def ratio_estimate(sums, counts) -> RatioEstimate:
    """The ratio metric of per-unit aggregates (sum and count of each unit's values, units on the last axis).

    Units with count 0 are absent (so padded arrays of experiments with different unit counts work).
    Variance: ``n/(n-1) * sum_u (S_u - R N_u)^2 / (sum_u N_u)^2`` (Deng et al. 2018), n the units.
    """
    sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    units = np.count_nonzero(counts, axis=-1)
    total = counts.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = sums.sum(axis=-1) / total
        residuals = sums - np.expand_dims(mean, -1) * counts
        var = units / (units - 1) * np.square(residuals).sum(axis=-1) / np.square(total)
    return RatioEstimate(mean, np.where(units > 1, var, np.nan), units, total)


def unit_estimate(values: Iterable[tuple[str, float]]) -> RatioEstimate:
    """The ratio estimate of ``(unit, value)`` pairs: values are summed and counted per unit first.

    Values are scaled by the largest magnitude before summing, so finite values near float's limit
    (two of 1.7e308 sum to ``inf``) still give a finite mean; only a variance too large for a float
    comes out ``inf`` (and its interval None)."""
    pairs = list(values)
    scale = max((abs(v) for _, v in pairs), default=0.0)
    scale = scale if math.isfinite(scale) and scale > 1.0 else 1.0
    sums: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    for unit, value in pairs:
        sums[unit] += value / scale
        counts[unit] += 1
    scaled = ratio_estimate(np.fromiter(sums.values(), float, len(sums)), np.fromiter(
        (counts[u] for u in sums), float, len(sums)))
    if scale == 1.0:
        return scaled
    with np.errstate(over="ignore"):
        return RatioEstimate(scaled.mean * scale, scaled.var * scale * scale, scaled.units, scaled.n)


def interval_half_width(estimate: RatioEstimate, tuning_units: float | None = None, alpha: float = 1 - CI_LEVEL):
    """Half-width of one arm's (1 - alpha) interval: Student t over units, or a confidence sequence."""
    if tuning_units is not None:
        return sequential.half_width(estimate.var, estimate.units, alpha, tuning_units)
    with np.errstate(invalid="ignore"):
        return stats.t.ppf(1 - alpha / 2, estimate.units - 1) * np.sqrt(estimate.var)


def compare(control: RatioEstimate, arm: RatioEstimate, tuning_units: float | None = None,
            alpha: float = 1 - CI_LEVEL) -> dict[str, np.ndarray]:
    """One arm against the control, elementwise: ``diff``, ``lift``, their (1 - alpha) interval half-widths, ``p``.

    ``tuning_units`` None: fixed horizon (Welch's t over units, Welch-Satterthwaite degrees of
    freedom; lift by the delta method). A number: sequential (confidence sequences and always-valid
    p-values over all units of both arms, tuned to be tightest at that many units).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        diff = arm.mean - control.mean
        var = arm.var + control.var
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lift = arm.mean / control.mean - 1
        lift_var = arm.var / control.mean**2 + arm.mean**2 * control.var / control.mean**4
        if tuning_units is None:
            df = var**2 / (arm.var**2 / (arm.units - 1) + control.var**2 / (control.units - 1))
            q = stats.t.ppf(1 - alpha / 2, df)
            half, lift_half = q * np.sqrt(var), q * np.sqrt(lift_var)
            p = 2 * stats.t.sf(np.abs(diff) / np.sqrt(var), df)
        else:
            units = arm.units + control.units
            half = sequential.half_width(var, units, alpha, tuning_units)
            lift_half = sequential.half_width(lift_var, units, alpha, tuning_units)
            p = sequential.p_value(diff, 0.0, var, units, tuning_units, alpha)
    # Both arms constant (every request failed, say): the difference is exact, not unknown.
    exact = var == 0
    return {"diff": diff, "diff_half": np.where(exact, 0.0, half), "lift": lift,
            "lift_half": np.where(exact, 0.0, lift_half), "p": np.where(exact, np.where(diff == 0, 1.0, 0.0), p)}


@dataclass
class Observations:
    """One experiment's logged rows, attributed to arms and units (see :func:`observations`)."""

    rows: list[dict]  # exposures of the config's arms, by time
    unit_arm: dict[str, str]  # hash-assigned unit -> the arm of its first exposure
    units_in_several_arms: int
    values: dict[str, dict[str, list[tuple[str, float]]]]  # metric -> arm -> (unit, value) pairs
    unattributed: int
    warnings: list[str] = field(default_factory=list)


def unit_of(row: Mapping) -> str:
    """The analysis unit of an exposure: its unit id, or (none given) the request itself."""
    return row["unit"] or f"request:{row['request_id']}"


def observations(config: ExperimentConfig, exposures: Iterable[Mapping | Exposure],
                 outcomes: Iterable[Mapping | Outcome]) -> Observations:
    """Select ``config``'s rows, attribute outcomes, and list every metric's ``(unit, value)`` pairs per arm.

    Built-in metrics come from the exposures (module docstring). Raises ``ValueError`` when the
    logs hold no exposure of the experiment.
    """
    arms = [a.name for a in config.arms]
    warnings: list[str] = []
    all_exposures = [_as_dict(r) for r in exposures]
    rows = sorted((r for r in all_exposures if r["experiment"] == config.name),
                  key=lambda r: (r["created_unix"], r["request_id"]))
    if not rows:
        found = sorted({r["experiment"] for r in all_exposures})
        raise ValueError(f"no exposures of experiment {config.name!r} in the logs; they hold {found}")
    stray = Counter(r["arm"] for r in rows if r["arm"] not in arms)
    if stray:
        warnings.append(f"{sum(stray.values())} exposures name arms that are not in the config, ignored: {dict(stray)}")
    rows = [r for r in rows if r["arm"] in arms]

    unit_arm: dict[str, str] = {}
    arms_of_unit: dict[str, set[str]] = {}
    for r in rows:
        if r["unit"] and r["assignment"] == "hash":
            unit_arm.setdefault(r["unit"], r["arm"])
            arms_of_unit.setdefault(r["unit"], set()).add(r["arm"])
    units_in_several_arms = sum(len(s) > 1 for s in arms_of_unit.values())
    if units_in_several_arms:
        warnings.append(f"{units_in_several_arms} units were exposed in several arms (a weight or salt change?); "
                        "unit-level outcomes count in the arm of the unit's first exposure")

    values, unattributed = _outcome_values(config.name, outcomes, arms, {r["request_id"]: r for r in rows},
                                           unit_arm, warnings)
    for metric in BUILTIN_METRICS:
        values[metric] = {a: [] for a in arms}
    for r in rows:
        unit = unit_of(r)
        if r["status"] != CLIENT_CLOSED:
            values["error_rate"][r["arm"]].append((unit, float(r["status"] != 200)))
        if r["status"] == 200:
            for metric in ("latency_s", "completion_tokens"):
                if r[metric] is not None:
                    values[metric][r["arm"]].append((unit, float(r[metric])))
    return Observations(rows, unit_arm, units_in_several_arms, values, unattributed, warnings)


def analyze(config: ExperimentConfig, exposures: Iterable[Mapping | Exposure], outcomes: Iterable[Mapping | Outcome],
            alpha: float = 0.05, sequential_test: bool = False,
            tuning_units: float = sequential.DEFAULT_TUNING_UNITS) -> dict:
    """Analyse one experiment's rows (dicts from :func:`load_shards`, or ``Exposure``/``Outcome``).

    Rows of other experiments are ignored. ``sequential_test`` makes every interval a confidence
    sequence and every p-value always valid, tuned to be tightest at ``tuning_units`` units.
    Returns a JSON-able dict: ``experiment``, ``alpha``, ``control``, ``unit_of_analysis``,
    ``inference`` (``fixed-horizon`` or ``sequential``), ``tuning_units``, ``arms`` (per arm:
    units, exposures, random_exposures, non_200_exposures, latency_p50_s, latency_p99_s,
    width_mix, metrics -> {n, units, mean, ci95}), ``srm``, ``comparisons`` (metric -> non-control
    arm -> lift, lift_ci95, diff, diff_ci95, p, significant), ``units_in_several_arms``,
    ``unattributed_outcomes`` and ``warnings``. See the module docstring for the statistics.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    tuning = tuning_units if sequential_test else None
    if tuning is not None and not tuning > 0:
        raise ValueError(f"tuning_units must be > 0, got {tuning_units}")
    arms = [a.name for a in config.arms]
    control = arms[0]
    obs = observations(config, exposures, outcomes)
    warnings = ([] if sequential_test else [PEEKING_WARNING]) + obs.warnings
    units = Counter(obs.unit_arm.values())
    estimates = {m: {a: unit_estimate(pairs) for a, pairs in by_arm.items()} for m, by_arm in obs.values.items()}

    result_arms = {}
    for arm in arms:
        arm_rows = [r for r in obs.rows if r["arm"] == arm]
        served = [r for r in arm_rows if r["status"] == 200]
        latencies = [r["latency_s"] for r in served if r["latency_s"] is not None]
        result_arms[arm] = {
            "units": units[arm],
            "exposures": len(arm_rows),
            "random_exposures": sum(r["assignment"] == "random" for r in arm_rows),
            "non_200_exposures": len(arm_rows) - len(served),
            "latency_p50_s": _num(np.percentile(latencies, 50)) if latencies else None,
            "latency_p99_s": _num(np.percentile(latencies, 99)) if latencies else None,
            "width_mix": {w: n / len(served) for w, n in Counter(r["width"] for r in served).most_common()},
            "metrics": {m: _summary(by_arm[arm], tuning) for m, by_arm in estimates.items()},
        }
        if units[arm] < MIN_UNITS:
            warnings.append(f"arm {arm!r} has {units[arm]} units (< {MIN_UNITS}): its CIs and p-values are unreliable")

    srm = _srm(config.proportions, {a: units[a] for a in arms})
    if srm["flag"]:
        warnings.append(f"sample ratio mismatch (p = {srm['p']:.2g} < {SRM_P_THRESHOLD}): units per arm "
                        f"{srm['observed_units']} do not match the proportions {srm['expected']}; assignment or "
                        "logging is broken, so the comparisons are not trustworthy")

    comparisons = {metric: {arm: _comparison(by_arm[control], by_arm[arm], tuning, alpha) for arm in arms[1:]}
                   for metric, by_arm in estimates.items()}
    return {
        "experiment": config.name,
        "alpha": alpha,
        "control": control,
        "unit_of_analysis": f"{config.unit} (the unit of randomisation; a request without one is its own unit)",
        "inference": "fixed-horizon" if tuning is None else "sequential",
        "tuning_units": tuning,
        "arms": result_arms,
        "srm": srm,
        "comparisons": comparisons,
        "units_in_several_arms": obs.units_in_several_arms,
        "unattributed_outcomes": obs.unattributed,
        "warnings": warnings,
    }


def _as_dict(row: Mapping | Exposure | Outcome) -> Mapping:
    return row if isinstance(row, Mapping) else vars(row)


def _outcome_values(experiment: str, outcomes: Iterable[Mapping | Outcome], arms: list[str], exposure: dict[str, dict],
                    unit_arm: dict[str, str], warnings: list[str]) -> tuple[dict[str, dict[str, list[tuple[str, float]]]], int]:
    """``(unit, value)`` pairs per metric and arm (metrics sorted by name), and how many could not be attributed."""
    values: dict[str, dict[str, list[tuple[str, float]]]] = {}
    unattributed = 0
    shadowed, not_numbers = Counter(), Counter()
    for o in sorted((o for o in map(_as_dict, outcomes) if o["experiment"] == experiment), key=lambda o: o["created_unix"]):
        if o["metric"] in BUILTIN_METRICS:
            shadowed[o["metric"]] += 1
            continue
        value = _finite(o["value"])
        if value is None:  # stored before values were checked at the door, or written by hand
            not_numbers[o["metric"]] += 1
            continue
        served = exposure.get(o["request_id"])
        if served is not None:
            arm, unit = served["arm"], unit_of(served)
        elif o["unit"] in unit_arm:
            arm, unit = unit_arm[o["unit"]], o["unit"]
        else:
            unattributed += 1
            continue
        values.setdefault(o["metric"], {a: [] for a in arms})[arm].append((unit, value))
    if not_numbers:
        warnings.append(f"outcome values that are not finite numbers are ignored: {dict(not_numbers)}")
    if unattributed:
        warnings.append(f"{unattributed} outcomes match no exposure by request_id or unit (a shard missing?); ignored")
    if shadowed:
        warnings.append(f"outcomes named like built-in metrics are ignored: {dict(shadowed)}")
    return dict(sorted(values.items())), unattributed


def _finite(value) -> float | None:
    """A stored value as a finite float, or None (NaN, infinities, text, NULL)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _num(x) -> float | None:
    """A JSON-able number: ``None`` for a missing or non-finite value."""
    return None if x is None or not math.isfinite(x) else float(x)


def _interval_of(center, half) -> list[float | None] | None:
    low, high = _num(center - half), _num(center + half)
    return None if low is None or high is None else [low, high]


def _summary(estimate: RatioEstimate, tuning_units: float | None) -> dict:
    out = {"n": int(estimate.n), "units": int(estimate.units), "mean": _num(estimate.mean), "ci95": None}
    if estimate.units >= 2:
        out["ci95"] = _interval_of(estimate.mean, interval_half_width(estimate, tuning_units))
    return out


def _comparison(control: RatioEstimate, arm: RatioEstimate, tuning_units: float | None, alpha: float) -> dict:
    out = {"lift": None, "lift_ci95": None, "diff": None, "diff_ci95": None, "p": None, "significant": False}
    if control.units < 2 or arm.units < 2:
        return out
    c = compare(control, arm, tuning_units)
    out.update(diff=_num(c["diff"]), diff_ci95=_interval_of(c["diff"], c["diff_half"]), p=_num(c["p"]))
    if control.mean != 0:
        out.update(lift=_num(c["lift"]), lift_ci95=_interval_of(c["lift"], c["lift_half"]))
    out["significant"] = out["p"] is not None and out["p"] < alpha
    return out


def _srm(expected: dict[str, float], observed: dict[str, int]) -> dict:
    # An arm of weight 0 (rolled back) expects no units; the test is over the arms that do.
    arms = [a for a in expected if expected[a] > 0]
    total = sum(observed[a] for a in arms)
    chi2 = p = None
    if total and len(arms) > 1:
        test = stats.chisquare([observed[a] for a in arms], [total * expected[a] for a in arms])
        chi2, p = _num(test.statistic), _num(test.pvalue)
    return {"chi2": chi2, "p": p, "flag": p is not None and p < SRM_P_THRESHOLD,
            "expected": expected, "observed_units": observed}


# --- output ----------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _interval(ci: list | None, spec: str) -> str:
    return "" if ci is None or None in ci else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def format_table(result: dict) -> str:
    """The result of :func:`analyze` as a plain-text report for a terminal."""
    inference = result["inference"] + (f" (confidence sequences tuned to {result['tuning_units']:g} units)"
                                        if result["tuning_units"] is not None else "")
    lines = [f"experiment {result['experiment']} (control: {result['control']}, alpha {result['alpha']})",
             f"unit of analysis: {result['unit_of_analysis']}", f"inference: {inference}", "",
             f"{'arm':<20}{'units':>8}{'exposures':>11}{'random':>8}{'non-200':>9}{'p50_s':>9}{'p99_s':>9}  width mix"]
    for name, arm in result["arms"].items():
        mix = " ".join(f"{w} {f:.0%}" for w, f in arm["width_mix"].items())
        lines.append(f"{name:<20}{arm['units']:>8}{arm['exposures']:>11}{arm['random_exposures']:>8}"
                     f"{arm['non_200_exposures']:>9}{_fmt(arm['latency_p50_s'], '.3f'):>9}"
                     f"{_fmt(arm['latency_p99_s'], '.3f'):>9}  {mix}")
    srm = result["srm"]
    verdict = "MISMATCH" if srm["flag"] else "ok"
    lines.append(f"SRM: chi2 {_fmt(srm['chi2'], '.3g')}, p {_fmt(srm['p'], '.3g')}: {verdict} "
                 f"(units {srm['observed_units']}, proportions { {a: round(f, 4) for a, f in srm['expected'].items()} })")
    for metric, by_arm in result["comparisons"].items():
        lines += ["", f"{metric:<20}{'units':>8}{'n':>8}  {'mean [95% CI]':<34}{'lift [95% CI]':<32}{'p':>9}"]
        for name, arm in result["arms"].items():
            s = arm["metrics"][metric]
            mean = f"{_fmt(s['mean'], '.4g')} {_interval(s['ci95'], '.4g')}"
            c = by_arm.get(name)
            if c is None:
                lift, p = "(control)", ""
            else:
                lift = f"{_fmt(c['lift'], '+.1%')} {_interval(c['lift_ci95'], '+.1%')}"
                p = _fmt(c["p"], ".3g") + (" *" if c["significant"] else "")
            lines.append(f"{name:<20}{s['units']:>8}{s['n']:>8}  {mean:<34}{lift:<32}{p:>9}")
    test = ("always-valid mixture-SPRT p-value" if result["tuning_units"] is not None
            else "Welch's t-test over per-unit aggregates")
    lines += ["", f"* p < alpha ({test}); means are per request, units are what varies", "", "warnings:"]
    lines += [f"  - {w}" for w in result["warnings"]]
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    """A PNG: per metric, the arm means with 95% CI error bars; and the width mix of each arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["arms"])
    metrics = list(result["comparisons"])
    panels = len(metrics) + 1
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        summaries = [result["arms"][a]["metrics"][metric] for a in arms]
        means = [s["mean"] if s["mean"] is not None else 0.0 for s in summaries]
        errors = [(m - s["ci95"][0], s["ci95"][1] - m) if s["ci95"] and None not in s["ci95"] else (0.0, 0.0)
                  for m, s in zip(means, summaries, strict=True)]
        ax.bar(arms, means, yerr=np.array(errors).T, capsize=4, color="tab:blue")
        ax.set(title=metric, ylabel="mean per request (95% CI over units)")
    ax = axes[len(metrics)]
    widths = list(dict.fromkeys(w for a in arms for w in result["arms"][a]["width_mix"]))
    bottom = np.zeros(len(arms))
    for width in widths:
        fractions = np.array([result["arms"][a]["width_mix"].get(width, 0.0) for a in arms])
        ax.bar(arms, fractions, bottom=bottom, label=width)
        bottom += fractions
    ax.set(title="width served", ylabel="fraction of served requests", ylim=(0, 1))
    if widths:
        ax.legend(fontsize="small")
    for unused in axes[panels:]:
        unused.axis("off")
    fig.suptitle(f"A/B experiment {result['experiment']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line ----------------------------------------------------------------------------------


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``matta ab analyze``."""
    parser.add_argument("--db", nargs="+", required=True, type=Path, metavar="PATH",
                        help="A/B log shards: files, or directories (every *.sqlite in them)")
    parser.add_argument("--experiment", required=True, type=Path, metavar="FILE", help="the experiment YAML")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the full result as JSON")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="write a PNG of metric means and width mix")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default: 0.05)")
    parser.add_argument("--sequential", action="store_true",
                        help="confidence sequences and always-valid p-values: valid however often you look")
    parser.add_argument("--tuning-units", type=float, default=sequential.DEFAULT_TUNING_UNITS, metavar="N",
                        help="with --sequential: units (both arms) at which the intervals are tightest, e.g. the "
                             f"planned size (default: {sequential.DEFAULT_TUNING_UNITS})")


def run_analyze(args: argparse.Namespace) -> int:
    """``matta ab analyze``: print the report, write the JSON and the PNG when asked."""
    config = load_experiment(args.experiment)
    exposures, outcomes = load_shards(args.db)
    result = analyze(config, exposures, outcomes, alpha=args.alpha, sequential_test=args.sequential,
                     tuning_units=args.tuning_units)
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
