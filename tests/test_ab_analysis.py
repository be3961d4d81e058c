"""A/B analysis: shard merging, calibration (A/A), power (planted effects), SRM, attribution, outputs."""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from router.ab_analysis import (
    PEEKING_WARNING,
    add_analyze_arguments,
    analyze,
    format_table,
    load_shards,
    run_analyze,
)
from router.ab_log import ABLog, Exposure, Outcome
from router.experiment import ExperimentConfig, parse_experiment

REPO = Path(__file__).resolve().parents[1]


def experiment(control_weight: float = 50, treatment_weight: float = 50) -> ExperimentConfig:
    return parse_experiment({"name": "exp", "salt": "s", "arms": [
        {"name": "control", "weight": control_weight, "policy": {"kind": "fixed", "width": "ta"}},
        {"name": "treatment", "weight": treatment_weight, "policy": {"kind": "slo", "min_width": "m"}},
    ]})


def simulate(rng: np.random.Generator, units: dict[str, int], success: dict[str, float],
             rating_mean: dict[str, float] | None = None) -> tuple[list[Exposure], list[Outcome]]:
    """One request per unit; a 0/1 `success` outcome per request, and a normal `rating` when asked."""
    exposures, outcomes = [], []
    t = 0.0
    for arm, n in units.items():
        won = rng.random(n) < success[arm]
        latency = rng.lognormal(-1.5, 0.5, n)
        tokens = rng.integers(1, 33, n)
        widths = rng.choice(["m", "ta"], n) if arm == "treatment" else ["ta"] * n
        ratings = rng.normal(rating_mean[arm], 2.0, n) if rating_mean else None
        for i in range(n):
            t += 1
            rid = f"{arm}-{i}"
            exposures.append(Exposure(rid, "exp", f"unit-{arm}-{i}", "hash", arm, "p", str(widths[i]), 200,
                                      float(latency[i]), 8, int(tokens[i]), t))
            outcomes.append(Outcome("exp", rid, None, "success", float(won[i]), t + 0.5))
            if ratings is not None:
                outcomes.append(Outcome("exp", rid, None, "rating", float(ratings[i]), t + 0.5))
    return exposures, outcomes


def write_shard(path: Path, rows: list[Exposure | Outcome]) -> Path:
    log = ABLog(path)
    log.write_sync(rows)
    log.close()
    return path


# --- reading shards --------------------------------------------------------------------------------


def test_split_shards_analyse_like_one_shard_and_directories_work(tmp_path):
    exposures, outcomes = simulate(np.random.default_rng(0), {"control": 80, "treatment": 70},
                                   {"control": 0.3, "treatment": 0.4})
    half = len(exposures) // 2
    whole = write_shard(tmp_path / "whole" / "all.sqlite", exposures + outcomes)
    # Outcomes live in the other shard than the exposures they score: the join must cross shards.
    first = write_shard(tmp_path / "split" / "a.sqlite", exposures[:half] + outcomes[half:])
    second = write_shard(tmp_path / "split" / "b.sqlite", exposures[half:] + outcomes[:half])

    expected = analyze(experiment(), exposures, outcomes)
    assert analyze(experiment(), *load_shards([whole])) == expected
    assert analyze(experiment(), *load_shards([second, first])) == expected
    assert analyze(experiment(), *load_shards([tmp_path / "split"])) == expected
    assert analyze(experiment(), *load_shards([first, tmp_path / "split"])) == expected  # a shard named twice counts once


def test_bad_paths_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_shards([tmp_path / "missing.sqlite"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.sqlite"):
        load_shards([tmp_path / "empty"])
    conn = sqlite3.connect(tmp_path / "other.sqlite")
    conn.execute("CREATE TABLE readings (x REAL)")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="other.sqlite: not a matta A/B log"):
        load_shards([tmp_path / "other.sqlite"])
    (tmp_path / "notes.sqlite").write_text("not a database at all, just some text " * 10)
    with pytest.raises(ValueError, match="notes.sqlite: cannot read it as a matta A/B log"):
        load_shards([tmp_path / "notes.sqlite"])
    exposures, outcomes = simulate(np.random.default_rng(0), {"control": 3}, {"control": 0.5})
    other = parse_experiment({**experiment().model_dump(), "name": "other"})
    with pytest.raises(ValueError, match=r"no exposures of experiment 'other'.*\['exp'\]"):
        analyze(other, exposures, outcomes)


# --- statistics ------------------------------------------------------------------------------------


def test_aa_false_positive_rate_matches_alpha():
    seeds = 200
    significant = {"success": 0, "latency_s": 0}
    for seed in range(seeds):
        exposures, outcomes = simulate(np.random.default_rng(seed), {"control": 300, "treatment": 300},
                                       {"control": 0.3, "treatment": 0.3})
        result = analyze(experiment(), exposures, outcomes, alpha=0.05)
        for metric in significant:
            significant[metric] += result["comparisons"][metric]["treatment"]["significant"]
    # Binomial(200, 0.05): mean 10, sd 3.1; [4, 18] is about -2 to +2.6 sd.
    for metric, count in significant.items():
        assert 0.02 <= count / seeds <= 0.09, (metric, count)


def test_planted_effect_is_detected_for_binary_and_continuous_metrics():
    exposures, outcomes = simulate(np.random.default_rng(1), {"control": 1000, "treatment": 1000},
                                   {"control": 0.40, "treatment": 0.50}, rating_mean={"control": 4.0, "treatment": 5.0})
    result = analyze(experiment(), exposures, outcomes)

    success = result["comparisons"]["success"]["treatment"]
    assert success["significant"] and success["p"] < 0.05
    assert success["lift_ci95"][0] > 0 and success["diff_ci95"][0] > 0
    assert success["lift_ci95"][0] < 0.25 < success["lift_ci95"][1]
    assert success["lift"] == pytest.approx(0.25, abs=0.125)  # two standard errors (delta method, about 0.06 here)

    rating = result["comparisons"]["rating"]["treatment"]
    assert rating["significant"] and rating["p"] < 0.001
    assert rating["lift_ci95"][0] < 0.25 < rating["lift_ci95"][1]
    assert rating["lift"] == pytest.approx(0.25, abs=0.05)  # two standard errors (about 0.025 here)
    control_rating = result["arms"]["control"]["metrics"]["rating"]
    assert control_rating["n"] == control_rating["units"] == 1000
    assert control_rating["ci95"][0] < 4.0 < control_rating["ci95"][1]

    sequential = analyze(experiment(), exposures, outcomes, sequential_test=True, tuning_units=2000)
    assert sequential["inference"] == "sequential" and PEEKING_WARNING not in sequential["warnings"]
    for metric in ("success", "rating"):
        fixed_ci, seq_ci = (r["comparisons"][metric]["treatment"]["diff_ci95"] for r in (result, sequential))
        assert seq_ci[0] < fixed_ci[0] < fixed_ci[1] < seq_ci[1]  # valid at any look, hence wider
        assert sequential["comparisons"][metric]["treatment"]["p"] > result["comparisons"][metric]["treatment"]["p"]


def test_issue_19_example_is_analysed_per_user():
    """40 users x 15 requests, success probability 0.1 or 0.9 per user: the CI of the difference is the
    CI of per-user means (Welch), not the 0.3x narrower per-request one the issue found."""
    rng = np.random.default_rng(19)
    exposures, outcomes, user_means = [], [], {"control": [], "treatment": []}
    for u in range(40):
        arm, p = ("control", "treatment")[u % 2], rng.choice([0.1, 0.9])
        won = rng.random(15) < p
        user_means[arm].append(won.mean())
        for j in range(15):
            rid = f"r{u}-{j}"
            exposures.append(Exposure(rid, "exp", f"user-{u}", "hash", arm, "p", "ta", 200, 0.1, 8, 16, u * 15 + j))
            outcomes.append(Outcome("exp", rid, None, "success", float(won[j]), u * 15 + j + 0.5))
    result = analyze(experiment(), exposures, outcomes)
    assert result["unit_of_analysis"].startswith("user")
    success = result["comparisons"]["success"]["treatment"]
    per_user = stats.ttest_ind(user_means["treatment"], user_means["control"], equal_var=False)
    ci = per_user.confidence_interval(0.95)
    assert success["diff_ci95"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert success["p"] == pytest.approx(per_user.pvalue, rel=1e-9)
    assert result["arms"]["control"]["metrics"]["success"] == {
        "n": 300, "units": 20, "mean": pytest.approx(np.mean(user_means["control"])),
        "ci95": pytest.approx(list(stats.t.interval(0.95, 19, np.mean(user_means["control"]),
                                                    stats.sem(user_means["control"]))))}


def test_requests_without_a_unit_are_their_own_units_and_ratio_metrics_weight_requests():
    def exposure(rid, unit, arm, latency, assignment="hash"):
        return Exposure(rid, "exp", unit, assignment, arm, "p", "ta", 200, latency, 8, 16, float(len(rid)))

    # control: unit a sends 3 requests at 1 s, unit b one at 3 s; treatment: two anonymous requests.
    exposures = [exposure("a1", "a", "control", 1.0), exposure("a2", "a", "control", 1.0),
                 exposure("a3", "a", "control", 1.0), exposure("b1", "b", "control", 3.0),
                 exposure("x1", None, "treatment", 1.0, "random"), exposure("x2", None, "treatment", 2.0, "random")]
    result = analyze(experiment(), exposures, [])
    control, treatment = (result["arms"][a]["metrics"]["latency_s"] for a in ("control", "treatment"))
    assert (control["n"], control["units"], control["mean"]) == (4, 2, 1.5)  # (1+1+1+3)/4 per request, 2 units
    assert (treatment["n"], treatment["units"], treatment["mean"]) == (2, 2, 1.5)
    # Delta method by hand: R = 1.5, residuals S_u - R N_u = 3 - 4.5 and 3 - 1.5, n/(n-1) = 2, (sum N)^2 = 16.
    expected_var = 2 * ((3 - 4.5) ** 2 + (3 - 1.5) ** 2) / 16
    half = stats.t.ppf(0.975, 1) * expected_var**0.5
    assert control["ci95"] == pytest.approx([1.5 - half, 1.5 + half])


@pytest.mark.parametrize(("weights", "units", "flag"), [
    ((50, 50), {"control": 600, "treatment": 400}, True),
    ((50, 50), {"control": 500, "treatment": 500}, False),
    ((60, 40), {"control": 600, "treatment": 400}, False),
])
def test_sample_ratio_mismatch(weights, units, flag):
    exposures, outcomes = simulate(np.random.default_rng(2), units, {"control": 0.3, "treatment": 0.3})
    result = analyze(experiment(*weights), exposures, outcomes)
    assert result["srm"]["flag"] is flag
    assert result["srm"]["observed_units"] == units
    assert result["srm"]["expected"] == {"control": weights[0] / 100, "treatment": weights[1] / 100}
    assert any("sample ratio mismatch" in w for w in result["warnings"]) is flag


def test_unit_outcomes_follow_the_units_first_arm_and_random_exposures_count_apart():
    def exposure(rid, unit, arm, t, assignment="hash"):
        return Exposure(rid, "exp", unit, assignment, arm, "p", "ta", 200, 0.1, 8, 16, t)

    exposures = [
        exposure("r1", "u1", "control", 1),
        exposure("r2", "u2", "treatment", 2),
        exposure("r4", "u3", "treatment", 4),  # u3 moved arms (a weight change); its first exposure was control
        exposure("r3", "u3", "control", 3),
        exposure("r5", None, "treatment", 5, assignment="random"),
    ]
    outcomes = [
        Outcome("exp", None, "u1", "thumbs", 1.0, 10),
        Outcome("exp", None, "u2", "thumbs", 0.0, 11),
        Outcome("exp", None, "u3", "thumbs", 1.0, 12),  # by unit: u3's first arm, control
        Outcome("exp", "r4", "u3", "thumbs", 0.0, 13),  # by request: the arm that served it, treatment
        Outcome("exp", "r5", None, "thumbs", 1.0, 14),
        Outcome("exp", None, "ghost", "thumbs", 1.0, 15),  # no such unit
        Outcome("other", None, "u1", "thumbs", 0.0, 16),  # another experiment
    ]
    result = analyze(experiment(), exposures, outcomes)
    control, treatment = result["arms"]["control"], result["arms"]["treatment"]
    assert (control["units"], control["exposures"], control["random_exposures"]) == (2, 2, 0)
    assert (treatment["units"], treatment["exposures"], treatment["random_exposures"]) == (1, 3, 1)
    assert result["srm"]["observed_units"] == {"control": 2, "treatment": 1}
    assert result["units_in_several_arms"] == 1
    assert result["unattributed_outcomes"] == 1
    assert control["metrics"]["thumbs"] == {"n": 2, "units": 2, "mean": 1.0, "ci95": [1.0, 1.0]}
    assert treatment["metrics"]["thumbs"]["n"] == treatment["metrics"]["thumbs"]["units"] == 3  # u2, u3, r5's request
    assert treatment["metrics"]["thumbs"]["mean"] == pytest.approx(1 / 3)
    assert sum("units (< 30)" in w for w in result["warnings"]) == 2


# --- outputs ---------------------------------------------------------------------------------------


def test_result_shape_is_json():
    exposures, outcomes = simulate(np.random.default_rng(3), {"control": 40, "treatment": 40},
                                   {"control": 0.3, "treatment": 0.5})
    result = json.loads(json.dumps(analyze(experiment(), exposures, outcomes), allow_nan=False))
    assert {"experiment", "arms", "srm", "comparisons", "warnings", "units_in_several_arms"} <= set(result)
    assert result["experiment"] == "exp" and list(result["arms"]) == ["control", "treatment"]
    arm = result["arms"]["treatment"]
    assert {"units", "exposures", "random_exposures", "latency_p50_s", "latency_p99_s", "width_mix", "metrics"} <= set(arm)
    assert set(arm["metrics"]) == {"success", "latency_s", "completion_tokens", "error_rate"}
    assert set(arm["metrics"]["success"]) == {"n", "units", "mean", "ci95"}
    assert sum(arm["width_mix"].values()) == pytest.approx(1.0) and set(arm["width_mix"]) == {"m", "ta"}
    assert set(result["srm"]) == {"chi2", "p", "flag", "expected", "observed_units"}
    assert set(result["comparisons"]) == {"success", "latency_s", "completion_tokens", "error_rate"}
    assert set(result["comparisons"]["success"]) == {"treatment"}  # the control is the first arm
    comparison = result["comparisons"]["success"]["treatment"]
    assert set(comparison) == {"lift", "lift_ci95", "diff", "diff_ci95", "p", "significant"}
    assert result["warnings"][0] == PEEKING_WARNING
    assert (result["inference"], result["tuning_units"]) == ("fixed-horizon", None)
    assert "unit of randomisation" in result["unit_of_analysis"]


def test_run_analyze_prints_a_table_and_writes_json_and_png(tmp_path, capsys):
    exposures, outcomes = simulate(np.random.default_rng(4), {"control": 50, "treatment": 50},
                                   {"control": 0.3, "treatment": 0.5}, rating_mean={"control": 3.0, "treatment": 3.5})
    shard = write_shard(tmp_path / "ab" / "exp.host.1.sqlite", exposures + outcomes)
    config_path = tmp_path / "exp.yaml"
    config_path.write_text(json.dumps(experiment().model_dump()))  # JSON is YAML
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    args = parser.parse_args(["--db", str(shard.parent), "--experiment", str(config_path),
                              "--json", str(tmp_path / "out" / "result.json"), "--plot", str(tmp_path / "out" / "ab.png")])
    assert args.alpha == 0.05 and not args.sequential

    assert run_analyze(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert format_table(result) in printed
    for word in ("control", "treatment", "success", "rating", "latency_s", "SRM", "lift", "unit of analysis: user",
                 "inference: fixed-horizon", PEEKING_WARNING):
        assert word in printed
    assert (tmp_path / "out" / "ab.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    assert run_analyze(parser.parse_args(["--db", str(shard), "--experiment", str(config_path), "--sequential",
                                          "--tuning-units", "500"])) == 0
    printed = capsys.readouterr().out
    assert "inference: sequential (confidence sequences tuned to 500 units)" in printed
    assert PEEKING_WARNING not in printed


def test_analysis_does_not_import_torch():
    code = "import sys, router.ab_analysis; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.parametrize("sequential_test", [False, True])
def test_any_stored_outcome_value_gives_a_finite_json_result(tmp_path, capsys, sequential_test):
    """Two feedbacks of 1.7e308 used to make a mean `inf`, and `--json` exit 1; values that are not
    finite numbers (written before the front end checked them) are ignored with a warning."""
    exposures, outcomes = simulate(np.random.default_rng(5), {"control": 40, "treatment": 40},
                                   {"control": 0.3, "treatment": 0.5})
    extreme = [Outcome("exp", f"{arm}-{i}", None, "revenue", 1.7e308, 1e6) for arm in ("control", "treatment")
               for i in range(3)]
    extreme += [Outcome("exp", f"control-{i}", None, "revenue", -1.7e308, 1e6) for i in range(3, 5)]
    junk = [Outcome("exp", "control-9", None, "success", value, 1e6) for value in (float("inf"), float("-inf"),
                                                                                    float("nan"))]
    result = analyze(experiment(), exposures, outcomes + extreme + junk, sequential_test=sequential_test)
    result = json.loads(json.dumps(result, allow_nan=False))
    revenue = result["arms"]["treatment"]["metrics"]["revenue"]
    assert revenue["n"] == 3 and revenue["mean"] == pytest.approx(1.7e308)
    assert result["arms"]["control"]["metrics"]["revenue"]["mean"] == pytest.approx(1.7e308 / 5)
    assert result["arms"]["control"]["metrics"]["success"]["n"] == 40  # the three junk values left out
    assert any("not finite numbers" in w for w in result["warnings"])

    shard = write_shard(tmp_path / "exp.sqlite", exposures + outcomes + extreme + junk[:2])  # SQLite has no NaN
    config_path = tmp_path / "exp.yaml"
    config_path.write_text(json.dumps(experiment().model_dump()))
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    args = ["--db", str(shard), "--experiment", str(config_path), "--json", str(tmp_path / "result.json")]
    assert run_analyze(parser.parse_args(args + ["--sequential"] * sequential_test)) == 0
    assert json.loads((tmp_path / "result.json").read_text())["arms"]["treatment"]["metrics"]["revenue"]["n"] == 3
