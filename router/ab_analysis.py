"""Analysis of an A/B experiment over width policies: ``matta ab analyze``.

Reads any number of A/B log shards (see :mod:`router.ab_log`), merges them, and per arm reports
units, exposures, latency percentiles, the mix of widths served, and the mean of every metric
with a 95% CI; per metric and non-control arm, the difference and relative lift against the
control (the first arm of the config) with 95% CIs and p-values; and a sample-ratio-mismatch
(SRM) check of the hash-assigned units against the config's proportions.

Statistical choices, stated once:

* **Unit of analysis: one value per row.** Every outcome row, and every served exposure for the
  built-in metrics ``latency_s`` and ``completion_tokens``, is one observation. Requests of one
  unit are not independent (a user who likes an answer likes the next one too), so when units
  send many requests the CIs are narrower and the p-values smaller than they should be; a
  per-unit analysis (the mean of each unit first) would be exact, at the cost of power.
* **Attribution.** An outcome with a ``request_id`` goes to the arm that served that request; an
  outcome given by ``unit`` only goes to the unit's arm. Units are sticky, but a weight change
  moves some units between arms: a unit's arm is the arm of its first hash-assigned exposure
  (by ``created_unix``, so shard clocks should agree), and such units are counted in
  ``units_in_several_arms``.
* **Tests.** Per-arm CI: Student t. Difference: Welch's t-test and its CI. Lift
  (``mean_arm / mean_control - 1``): delta-method CI. Metrics whose values are all 0 or 1 also
  get a pooled two-proportion z-test, which decides ``significant`` for them; Welch decides it
  for the others. CIs are always 95%; ``alpha`` only sets ``significant``.
* **SRM.** Chi-square goodness of fit of the units per arm against the config proportions,
  flagged at p < 0.001. Requests without a unit are assigned at random per request: they count
  in the metrics (their assignment is random too) but not in the SRM check, and are reported
  apart as ``random_exposures``.
* **One look.** The p-values assume the sample size was fixed in advance and looked at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import fields
from pathlib import Path
from warnings import catch_warnings, simplefilter

import numpy as np
from scipy import stats

from router.ab_log import Exposure, Outcome
from router.experiment import ExperimentConfig, load_experiment

BUILTIN_METRICS = ("latency_s", "completion_tokens")
SRM_P_THRESHOLD = 0.001
MIN_UNITS = 30  # below this, normal approximations of means and proportions are shaky
PEEKING_WARNING = ("p-values assume one look at a fixed sample; checking repeatedly and stopping at the first "
                   "p < alpha inflates false positives")
EXPOSURE_COLUMNS = [f.name for f in fields(Exposure)]
OUTCOME_COLUMNS = [f.name for f in fields(Outcome)]
Z95 = float(stats.norm.ppf(0.975))


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
    rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table}")
    return [dict(zip(columns, row, strict=True)) for row in rows]


# --- statistics ------------------------------------------------------------------------------------


def analyze(config: ExperimentConfig, exposures: Iterable[Mapping | Exposure], outcomes: Iterable[Mapping | Outcome],
            alpha: float = 0.05) -> dict:
    """Analyse one experiment's rows (dicts from :func:`load_shards`, or ``Exposure``/``Outcome``).

    Rows of other experiments are ignored. Returns a JSON-able dict: ``experiment``, ``alpha``, ``control``,
    ``arms`` (per arm: units, exposures, random_exposures, non_200_exposures, latency_p50_s,
    latency_p99_s, width_mix, metrics -> {n, mean, ci95}), ``srm``, ``comparisons`` (metric ->
    non-control arm -> lift, lift_ci95, diff, diff_ci95, p_welch, p_ztest, significant),
    ``units_in_several_arms``, ``unattributed_outcomes`` and ``warnings``. See the module
    docstring for the statistics and their assumptions.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arms = [a.name for a in config.arms]
    control = arms[0]
    warnings = [PEEKING_WARNING]

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
                        "each counts in the arm of its first exposure")
    units = Counter(unit_arm.values())

    values, unattributed = _outcome_values(config.name, outcomes, arms, {r["request_id"]: r["arm"] for r in rows},
                                           unit_arm, warnings)
    for metric in BUILTIN_METRICS:
        values[metric] = {a: [float(r[metric]) for r in rows
                              if r["arm"] == a and r["status"] == 200 and r[metric] is not None] for a in arms}

    result_arms = {}
    for arm in arms:
        arm_rows = [r for r in rows if r["arm"] == arm]
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
            "metrics": {m: _mean_ci(values[m][arm]) for m in values},
        }
        if units[arm] < MIN_UNITS:
            warnings.append(f"arm {arm!r} has {units[arm]} units (< {MIN_UNITS}): its CIs and p-values are unreliable")

    srm = _srm(config.proportions, {a: units[a] for a in arms})
    if srm["flag"]:
        warnings.append(f"sample ratio mismatch (p = {srm['p']:.2g} < {SRM_P_THRESHOLD}): units per arm "
                        f"{srm['observed_units']} do not match the proportions {srm['expected']}; assignment or "
                        "logging is broken, so the comparisons are not trustworthy")

    comparisons = {}
    for metric, by_arm in values.items():
        binary = all(v in (0.0, 1.0) for vs in by_arm.values() for v in vs)
        comparisons[metric] = {arm: _compare(by_arm[control], by_arm[arm], binary, alpha) for arm in arms[1:]}

    return {
        "experiment": config.name,
        "alpha": alpha,
        "control": control,
        "arms": result_arms,
        "srm": srm,
        "comparisons": comparisons,
        "units_in_several_arms": units_in_several_arms,
        "unattributed_outcomes": unattributed,
        "warnings": warnings,
    }


def _as_dict(row: Mapping | Exposure | Outcome) -> Mapping:
    return row if isinstance(row, Mapping) else vars(row)


def _outcome_values(experiment: str, outcomes: Iterable[Mapping | Outcome], arms: list[str], request_arm: dict[str, str],
                    unit_arm: dict[str, str], warnings: list[str]) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Outcome values per metric and arm (metrics sorted by name), and how many could not be attributed."""
    values: dict[str, dict[str, list[float]]] = {}
    unattributed = 0
    shadowed = Counter()
    for o in sorted((o for o in map(_as_dict, outcomes) if o["experiment"] == experiment), key=lambda o: o["created_unix"]):
        if o["metric"] in BUILTIN_METRICS:
            shadowed[o["metric"]] += 1
            continue
        arm = request_arm.get(o["request_id"]) or unit_arm.get(o["unit"])
        if arm is None:
            unattributed += 1
            continue
        values.setdefault(o["metric"], {a: [] for a in arms})[arm].append(float(o["value"]))
    if unattributed:
        warnings.append(f"{unattributed} outcomes match no exposure by request_id or unit (a shard missing?); ignored")
    if shadowed:
        warnings.append(f"outcomes named like built-in metrics are ignored: {dict(shadowed)}")
    return dict(sorted(values.items())), unattributed


def _num(x: float | None) -> float | None:
    """A JSON-able number: ``None`` for a missing or non-finite value."""
    return None if x is None or not math.isfinite(x) else float(x)


def _mean_ci(values: Sequence[float]) -> dict:
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    mean = float(np.mean(values))
    if n < 2:
        return {"n": n, "mean": mean, "ci95": None}
    half = stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": [_num(mean - half), _num(mean + half)]}


def _compare(control: Sequence[float], arm: Sequence[float], binary: bool, alpha: float) -> dict:
    """One arm against the control: difference, lift, their 95% CIs, p-values."""
    out = {"lift": None, "lift_ci95": None, "diff": None, "diff_ci95": None, "p_welch": None, "p_ztest": None,
           "significant": False}
    if len(control) < 2 or len(arm) < 2:
        return out
    c, a = np.asarray(control, dtype=float), np.asarray(arm, dtype=float)
    mean_c, mean_a = c.mean(), a.mean()
    var_c, var_a = c.var(ddof=1) / len(c), a.var(ddof=1) / len(a)  # squared standard errors of the means
    with catch_warnings():
        # An arm with identical values (all 1 in a small sample) is legitimate data, not lost precision.
        simplefilter("ignore", RuntimeWarning)
        welch = stats.ttest_ind(a, c, equal_var=False)
    ci = welch.confidence_interval(0.95)
    out.update(diff=_num(mean_a - mean_c), diff_ci95=[_num(ci.low), _num(ci.high)], p_welch=_num(welch.pvalue))
    if mean_c != 0:
        lift = mean_a / mean_c - 1
        se = math.sqrt(var_a / mean_c**2 + mean_a**2 * var_c / mean_c**4)
        out.update(lift=_num(lift), lift_ci95=[_num(lift - Z95 * se), _num(lift + Z95 * se)])
    if binary:
        pooled = (c.sum() + a.sum()) / (len(c) + len(a))
        se0 = math.sqrt(pooled * (1 - pooled) * (1 / len(c) + 1 / len(a)))
        out["p_ztest"] = 1.0 if se0 == 0 else _num(2 * stats.norm.sf(abs(mean_a - mean_c) / se0))
    p = out["p_ztest"] if binary else out["p_welch"]
    out["significant"] = p is not None and p < alpha
    return out


def _srm(expected: dict[str, float], observed: dict[str, int]) -> dict:
    total = sum(observed.values())
    chi2 = p = None
    if total and len(observed) > 1:
        test = stats.chisquare([observed[a] for a in expected], [total * expected[a] for a in expected])
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
    lines = [f"experiment {result['experiment']} (control: {result['control']}, alpha {result['alpha']})", "",
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
        lines += ["", f"{metric:<20}{'n':>8}  {'mean [95% CI]':<34}{'lift [95% CI]':<32}{'p':>9}"]
        for name, arm in result["arms"].items():
            s = arm["metrics"][metric]
            mean = f"{_fmt(s['mean'], '.4g')} {_interval(s['ci95'], '.4g')}"
            c = by_arm.get(name)
            if c is None:
                lift, p = "(control)", ""
            else:
                lift = f"{_fmt(c['lift'], '+.1%')} {_interval(c['lift_ci95'], '+.1%')}"
                p_value = c["p_ztest"] if c["p_ztest"] is not None else c["p_welch"]
                p = _fmt(p_value, ".3g") + (" *" if c["significant"] else "")
            lines.append(f"{name:<20}{s['n']:>8}  {mean:<34}{lift:<32}{p:>9}")
    lines += ["", "* p < alpha (two-proportion z-test for 0/1 metrics, Welch's t-test otherwise)", "", "warnings:"]
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
        ax.set(title=metric, ylabel="mean (95% CI)")
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


def run_analyze(args: argparse.Namespace) -> int:
    """``matta ab analyze``: print the report, write the JSON and the PNG when asked."""
    config = load_experiment(args.experiment)
    exposures, outcomes = load_shards(args.db)
    result = analyze(config, exposures, outcomes, alpha=args.alpha)
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
