"""Real locust, headless, against `matta serve` (with an A/B experiment) and `matta route`."""

from __future__ import annotations

import os

import pytest
import yaml

from benchmarks.harness import ServerThread, load_test
from serving.api.route import build_route_app
from serving.app import build_app
from serving.settings import RouteSettings, ServeSettings
from tests.helpers import CONFIG, rows

pytestmark = pytest.mark.slow  # two short locust runs


def locust_env(checkpoint) -> dict:
    return {**os.environ, "MATTA_MODEL": "tiny", "MATTA_CHECKPOINT": str(checkpoint), "MATTA_MAX_TOKENS": "4"}


def test_every_user_class_runs_against_matta_serve_and_feedback_reaches_the_ab_log(checkpoint_512, tmp_path):
    _, path = checkpoint_512
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump(CONFIG))
    db = tmp_path / "ab.sqlite"
    settings = ServeSettings(checkpoint=path, device="cpu", policy="fixed:ta", experiment=experiment, ab_db=db,
                             chat_template="chatml")  # the tiny GPT-2 has none; ChatUser needs one
    with ServerThread(build_app(settings)) as server:
        report = load_test(server.url, users=6, spawn_rate=6, seconds=8, user_classes=[], out=tmp_path / "report",
                           env=locust_env(path))
    endpoints = report["endpoints"]
    for name in ("POST /v1/completions [ab]", "POST /v1/feedback", "POST /v1/completions [slo tight]",
                 "POST /v1/completions [pinned s]", "POST /v1/chat/completions [chat]"):
        assert endpoints[name]["requests"] > 0, (name, endpoints)
    assert endpoints["Aggregated"]["failures"] == 0, endpoints
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outcomes = rows(db, "outcomes")
    assert len(outcomes) >= endpoints["POST /v1/feedback"]["requests"]  # locust stops counting at its deadline
    assert {o["metric"] for o in outcomes} == {"success"} and {o["value"] for o in outcomes} <= {0.0, 1.0}


def test_slo_and_pinned_users_run_against_matta_route(checkpoint_512, tmp_path):
    _, path = checkpoint_512
    backend = ServerThread(build_app(ServeSettings(checkpoint=path, device="cpu")))
    with backend:
        config = RouteSettings.model_validate({"model": "tiny", "policy": "slo", "slo_ms": 2000, "backends": [
            {"width": w, "url": backend.url, "model": f"tiny:{w}"} for w in ("s", "m", "l", "ta")]})
        with ServerThread(build_route_app(config)) as proxy:
            report = load_test(proxy.url, users=4, spawn_rate=4, seconds=6, user_classes=["SloUser", "PinnedUser"],
                               out=tmp_path / "route", env=locust_env(path))
    endpoints = report["endpoints"]
    assert endpoints["Aggregated"]["requests"] > 0 and endpoints["Aggregated"]["failures"] == 0, endpoints
    assert any(name.startswith("POST /v1/completions [pinned") for name in endpoints)
