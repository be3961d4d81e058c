"""A short run of the soak (benchmarks/soak.py; the 10-minute figures are in docs/reliability.md): mixed
traffic, SIGHUP reloads and a core kill against a real ``matta serve``, and nothing lost or leaking."""

from __future__ import annotations

import json

import pytest

from benchmarks import soak

pytestmark = pytest.mark.slow  # ~50 s: a real server under load for 40 s


def test_a_short_soak_loses_nothing_and_recovers_from_a_core_kill(tmp_path):
    code = soak.main(["--duration-s", "40", "--clients", "4", "--reload-every-s", "10", "--warmup-s", "10",
                      "--out", str(tmp_path / "soak"), "--work", str(tmp_path / "work")])
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert code == 0 and summary["ok"], {k: v for k, v in summary.items() if k != "samples"}
    assert summary["reloads"] >= 3 and summary["core_kill"]["recovery_s"] < 30
    assert summary["exposures_acknowledged"] > 100 and not summary["exposures_lost"] and not summary["feedback_lost"]
    assert summary["api_fds"]["growth"] <= 4
