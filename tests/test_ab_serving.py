"""A/B experiments in the server: sticky assignment, the durable log, feedback, hot reload, SIGKILL."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import httpx
import pytest
import yaml

from benchmarks.harness import Server, ServerThread
from router.experiment import BUCKETS, Assigner, LiveExperiment, load_experiment, parse_experiment
from router.policy import PolicyContext
from serving.app import build_app
from serving.settings import ServeSettings
from tests.helpers import CONFIG, rows, write_config

WIDTHS = ["s", "m", "l", "ta"]


# --- assignment (pure) ---------------------------------------------------------------------------


def test_split_proportions_are_within_binomial_tolerance():
    config = parse_experiment({**CONFIG, "arms": [{**CONFIG["arms"][0], "weight": 3},
                                                  {**CONFIG["arms"][1], "weight": 1}]})
    assigner = Assigner(config)
    n = 20_000
    control = sum(assigner.assign(f"user-{i}").arm == "control" for i in range(n))
    expected, sd = 0.75 * n, (n * 0.75 * 0.25) ** 0.5
    assert abs(control - expected) < 4 * sd, (control, expected)


def test_assignment_is_sticky_and_a_weight_change_moves_only_the_units_between_boundaries():
    config = parse_experiment(CONFIG)
    first = {u: Assigner(config).assign(u).arm for u in (f"u{i}" for i in range(5000))}
    again = {u: Assigner(parse_experiment(CONFIG)).assign(u).arm for u in first}  # a "restart"
    assert first == again
    shifted = parse_experiment({**CONFIG, "arms": [{**CONFIG["arms"][0], "weight": 60},
                                                   {**CONFIG["arms"][1], "weight": 40}]})
    moved = [u for u in first if Assigner(shifted).assign(u).arm != first[u]]
    assert all(first[u] == "treatment" for u in moved)  # 50/50 -> 60/40 only moves treatment -> control
    assert 0.07 < len(moved) / len(first) < 0.13  # ~10% of units: buckets 5000-5999
    assert Assigner(config).arm_of_bucket(BUCKETS - 1) == "treatment"


def test_units_outside_the_traffic_fraction_and_requests_without_unit():
    config = parse_experiment({**CONFIG, "traffic": 0.2})
    assigner = Assigner(config, rng=random.Random(0))
    inside = sum(assigner.assign(f"u{i}").arm is not None for i in range(5000))
    assert 0.17 < inside / 5000 < 0.23
    anonymous = [assigner.assign(None) for _ in range(2000)]
    assert {a.assignment for a in anonymous} == {"random"}
    assert 0.16 < sum(a.arm is not None for a in anonymous) / 2000 < 0.24


@pytest.mark.parametrize("change, message", [
    ({"arms": []}, "arms"),
    ({"unit": "cookie"}, "unit must be 'user' or 'header:<name>'"),
    ({"arms": [{"name": "a", "weight": 0, "policy": {"kind": "fixed", "width": "s"}}]}, "weight"),
    ({"arms": [{"name": "a", "weight": 1, "policy": {"kind": "fixed"}}]}, "needs `width`"),
    ({"arms": [{"name": "a", "weight": 1, "policy": {"kind": "fixed", "width": "s"}},
               {"name": "a", "weight": 1, "policy": {"kind": "slo"}}]}, "unique"),
    ({"traffic": 1.5}, "traffic"),
])
def test_invalid_experiment_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        parse_experiment({**CONFIG, **change})


def test_live_experiment_refuses_widths_the_checkpoint_lacks_and_keeps_the_old_config():
    live = LiveExperiment(parse_experiment(CONFIG), WIDTHS, PolicyContext())
    bad = parse_experiment({**CONFIG, "arms": [{"name": "x", "weight": 1, "policy": {"kind": "fixed", "width": "xl"}}]})
    with pytest.raises(ValueError, match="unknown width 'xl'"):
        live.reload(bad)
    assert [a.name for a in live.config.arms] == ["control", "treatment"]


# --- through HTTP ------------------------------------------------------------------------------


@pytest.fixture
def ab_server(checkpoint_512, tmp_path):
    _, path = checkpoint_512
    db = tmp_path / "ab.sqlite"
    settings = ServeSettings(checkpoint=path, device="cpu", experiment=write_config(tmp_path / "exp.yaml"),
                              ab_db=db, admin_key="sesame")
    with ServerThread(build_app(settings)) as server:
        yield server, db


def complete(url, user=None, **extra):
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 3, "temperature": 0, **extra}
    if user is not None:
        body["user"] = user
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_arms_choose_the_width_and_every_answer_is_logged_with_its_id(ab_server):
    server, db = ab_server
    seen = {}
    for i in range(30):
        r = complete(server.url, user=f"user-{i}")
        assert r.status_code == 200
        assert r.headers["x-request-id"] == r.json()["id"]
        arm, width = r.headers["x-matta-arm"], r.headers["x-matta-width"]
        assert width == {"control": "ta", "treatment": "s"}[arm]
        seen[r.json()["id"]] = (f"user-{i}", arm, width)
    assert complete(server.url, user="user-3").headers["x-matta-arm"] == seen_arm(seen, "user-3")
    pinned = complete(server.url, user="user-0", width="m")
    assert pinned.headers["x-matta-width"] == "m" and "x-matta-arm" not in pinned.headers
    anonymous = complete(server.url)
    assert anonymous.headers["x-matta-arm"] in ("control", "treatment")
    logged = {r["request_id"]: r for r in rows(db)}
    for request_id, (user, arm, width) in seen.items():
        row = logged[request_id]
        assert (row["unit"], row["arm"], row["width"], row["status"], row["assignment"]) == (user, arm, width, 200, "hash")
        assert row["completion_tokens"] >= 1 and row["latency_s"] > 0
    assert logged[anonymous.json()["id"]]["assignment"] == "random"
    assert pinned.json()["id"] not in logged
    stream = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "To be", "max_tokens": 3,
                                                              "stream": True, "user": "user-7"})
    assert stream.headers["x-request-id"] in {r["request_id"] for r in rows(db)}
    text = httpx.get(f"{server.url}/metrics").text
    assert 'matta_ab_exposures_total{arm="control"' in text


def seen_arm(seen, user):
    return next(arm for u, arm, _ in seen.values() if u == user)


def test_feedback_by_request_or_unit_is_recorded_and_bad_feedback_is_refused(ab_server):
    server, db = ab_server
    r = complete(server.url, user="alice")
    ok = httpx.post(f"{server.url}/v1/feedback", json={"request_id": r.json()["id"], "metric": "thumbs_up", "value": 1})
    assert ok.status_code == 200 and ok.json()["status"] == "recorded"
    by_unit = httpx.post(f"{server.url}/v1/feedback", json={"unit": "alice", "metric": "minutes", "value": 2.5})
    assert by_unit.status_code == 200
    recorded = rows(db, "outcomes")
    assert [(o["request_id"], o["unit"], o["metric"], o["value"]) for o in recorded] == [
        (r.json()["id"], None, "thumbs_up", 1.0), (None, "alice", "minutes", 2.5)]
    for body, status in [({"request_id": "cmpl-nope", "metric": "m", "value": 1}, 404),
                         ({"metric": "m", "value": 1}, 400),
                         ({"request_id": "x", "unit": "y", "metric": "m", "value": 1}, 400),
                         ({"unit": "alice", "metric": "bad metric!", "value": 1}, 400),
                         ({"unit": "alice", "metric": "m", "value": "NaN"}, 400)]:
        bad = httpx.post(f"{server.url}/v1/feedback", json=body)
        assert bad.status_code == status and "error" in bad.json(), body
    assert len(rows(db, "outcomes")) == 2


def test_hot_reload_through_the_admin_api_and_an_invalid_config_keeps_the_old_one(ab_server):
    server, _ = ab_server
    url = f"{server.url}/admin/experiment"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    auth = {"authorization": "Bearer sesame"}
    assert [a["name"] for a in httpx.get(url, headers=auth).json()["arms"]] == ["control", "treatment"]
    invalid = {**CONFIG, "arms": [{"name": "big", "weight": 1, "policy": {"kind": "fixed", "width": "xl"}}]}
    refused = httpx.post(url, content=yaml.safe_dump(invalid), headers=auth)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_experiment"
    assert httpx.post(url, content="arms: [", headers=auth).status_code == 400
    assert complete(server.url, user="bob").headers["x-matta-arm"] in ("control", "treatment")
    only_m = {**CONFIG, "arms": [{"name": "all-m", "weight": 1, "policy": {"kind": "fixed", "width": "m"}}]}
    accepted = httpx.post(url, content=yaml.safe_dump(only_m), headers=auth)
    assert accepted.status_code == 200 and accepted.json()["arms"][0]["policy"] == "fixed:m"
    r = complete(server.url, user="bob")
    assert (r.headers["x-matta-arm"], r.headers["x-matta-width"]) == ("all-m", "m")


def _alias_bomb(levels: int, fan_out: int) -> str:
    """YAML whose arms expand to fan_out**levels entries through aliases, in a few hundred bytes."""
    lines = [f"l0: &l0 [{', '.join(['{name: x}'] * fan_out)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan_out)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: bomb\nsalt: s\narms: *l{levels - 1}\n"


@pytest.mark.parametrize("body, code", [
    ("[" * 20_000 + "]" * 20_000, "config_too_large"),  # JSON nested 20,000 deep: was a RecursionError, a 500
    ("{a: " * 12_000 + "1" + "}" * 12_000, "config_too_large"),  # YAML flow mappings, 12,000 deep
    ("a:\n" + "".join("  " * i + "- \n" for i in range(1, 40)), "config_too_large"),  # block style, 40 deep
    (_alias_bomb(6, 10), "config_too_large"),  # 10^6 arms through aliases, from 300 bytes
    ("name: x\nsalt: s\narms: &a [*a]\n", "config_too_large"),  # an alias inside itself: endless
    ("name: x\nsalt: s\narms:\n" + "  - {name: a, weight: -1, policy: {kind: fixed}}\n" * 600,
     "invalid_experiment"),  # 600 invalid arms: 1800 problems, one bounded message
])
def test_reload_bodies_too_deep_too_large_or_with_endless_errors_are_a_bounded_400(ab_server, body, code, caplog):
    server, _ = ab_server
    url = f"{server.url}/admin/experiment"
    auth = {"authorization": "Bearer sesame"}
    started = time.monotonic()
    r = httpx.post(url, content=body, headers=auth, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text[:500]
    assert len(r.content) < 3000, len(r.content)
    assert time.monotonic() - started < 5
    assert max(len(record.getMessage()) for record in caplog.records if record.name == "serving.api.ab_routes") < 1000
    assert [a["name"] for a in httpx.get(url, headers=auth).json()["arms"]] == ["control", "treatment"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_feedback_values_must_be_finite_and_within_their_metrics_range(ab_server):
    server, db = ab_server
    feedback = f"{server.url}/v1/feedback"
    for value in (1.7e308, -1.7e308, 1e13):  # beyond the default range (+-max_feedback_abs, 1e12)
        r = httpx.post(feedback, json={"unit": "alice", "metric": "revenue", "value": value})
        assert r.status_code == 400 and r.json()["error"]["code"] == "value_out_of_range", value
        assert r.json()["error"]["param"] == "value"
    for text in ('1e999', 'Infinity', 'NaN'):  # not finite: refused by the schema
        r = httpx.post(feedback, content=f'{{"unit": "alice", "metric": "revenue", "value": {text}}}',
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, text
    assert httpx.post(feedback, json={"unit": "alice", "metric": "revenue", "value": 1e12}).status_code == 200
    ranged = {**CONFIG, "metrics": {"thumbs_up": {"min": 0, "max": 1}}}
    auth = {"authorization": "Bearer sesame"}
    assert httpx.post(f"{server.url}/admin/experiment", content=yaml.safe_dump(ranged), headers=auth).status_code == 200
    assert httpx.post(feedback, json={"unit": "alice", "metric": "thumbs_up", "value": 1}).status_code == 200
    for value in (2, -0.5):
        r = httpx.post(feedback, json={"unit": "alice", "metric": "thumbs_up", "value": value})
        assert r.status_code == 400 and "experiment config" in r.json()["error"]["message"], value
    bad_range = {**CONFIG, "metrics": {"thumbs_up": {"min": 1, "max": 0}}}
    r = httpx.post(f"{server.url}/admin/experiment", content=yaml.safe_dump(bad_range), headers=auth)
    assert r.status_code == 400 and "metrics.thumbs_up" in r.json()["error"]["message"]
    assert [(o["metric"], o["value"]) for o in rows(db, "outcomes")] == [("revenue", 1e12), ("thumbs_up", 1.0)]


def test_a_unit_header_sent_twice_is_a_400_not_whichever_copy_a_check_reads(ab_server):
    server, db = ab_server
    by_header = {**CONFIG, "unit": "header:x-user"}
    auth = {"authorization": "Bearer sesame"}
    assert httpx.post(f"{server.url}/admin/experiment", content=yaml.safe_dump(by_header), headers=auth).status_code \
        == 200
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 2}
    one = httpx.post(f"{server.url}/v1/completions", json=body, headers={"x-user": "alice"})
    assert one.status_code == 200 and one.headers["x-matta-arm"] in ("control", "treatment")
    two = httpx.post(f"{server.url}/v1/completions", json=body, headers=[("x-user", "alice"), ("x-user", "bob")])
    assert two.status_code == 400 and two.json()["error"]["code"] == "duplicate_header"
    assert {r["unit"] for r in rows(db)} == {"alice"}


def test_without_an_admin_key_the_admin_api_is_disabled(checkpoint_512, tmp_path, monkeypatch):
    monkeypatch.delenv("MATTA_ADMIN_KEY", raising=False)
    _, path = checkpoint_512
    settings = ServeSettings(checkpoint=path, device="cpu", experiment=write_config(tmp_path / "exp.yaml"),
                              ab_db=tmp_path / "ab.sqlite")
    with ServerThread(build_app(settings)) as server:
        r = httpx.post(f"{server.url}/admin/experiment", content="{}", headers={"authorization": "Bearer x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        for route in ("/admin/experiment/guardrails", "/admin/experiment/analysis"):
            r = httpx.get(f"{server.url}{route}", headers={"authorization": "Bearer x"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled", route


def test_a_breaching_treatment_arm_is_rolled_back_live_with_a_metric_and_a_logged_reason(
        checkpoint_512, tmp_path, monkeypatch, caplog):
    """A latency limit the treatment cannot meet (median under 1 microsecond): after min_units units the
    server sets its weight to 0 through the reload path; new units all get the control."""
    import serving.api.ab_guardrails

    monkeypatch.setattr(serving.api.ab_guardrails, "POLL_S", 0.05)
    _, path = checkpoint_512
    guarded = {**CONFIG, "guardrail_check_s": 0.2, "guardrails": [
        {"metric": "latency_s", "quantile": 0.5, "max": 1e-6, "min_units": 5},
        {"metric": "error_rate", "max": 0.5, "min_units": 5}]}
    settings = ServeSettings(checkpoint=path, device="cpu", experiment=write_config(tmp_path / "exp.yaml", guarded),
                             ab_db=tmp_path / "ab.sqlite", admin_key="sesame")
    auth = {"authorization": "Bearer sesame"}
    with caplog.at_level("WARNING", logger="serving.api.ab_guardrails"), ServerThread(build_app(settings)) as server:
        text = httpx.get(f"{server.url}/metrics").text
        assert 'matta_ab_arm_weight{arm="treatment",experiment="width-test"} 50.0' in text
        empty = httpx.get(f"{server.url}/admin/experiment/analysis", headers=auth)
        assert empty.status_code == 404 and empty.json()["error"]["code"] == "no_exposures"
        arms = [complete(server.url, user=f"g{i}").headers["x-matta-arm"] for i in range(24)]
        assert arms.count("treatment") >= 5, arms
        deadline = time.monotonic() + 20
        while httpx.get(f"{server.url}/admin/experiment", headers=auth).json()["arms"][1]["weight"] != 0:
            assert time.monotonic() < deadline, "the guardrail did not roll the treatment back"
            time.sleep(0.1)
        assert {complete(server.url, user=f"new-{i}").headers["x-matta-arm"] for i in range(10)} == {"control"}
        text = httpx.get(f"{server.url}/metrics").text
        assert ('matta_ab_guardrail_breaches_total{arm="treatment",experiment="width-test",'
                'guardrail="latency_s_p50_max"} 1.0') in text
        assert 'matta_ab_arm_weight{arm="treatment",experiment="width-test"} 0.0' in text
        assert 'guardrail="error_rate_max"' not in text  # kept: nothing failed
        status = httpx.get(f"{server.url}/admin/experiment/guardrails", headers=auth).json()
        (rollback,) = status["rollbacks"]
        assert (rollback["arm"], rollback["guardrail"], rollback["breached"]) == ("treatment", "latency_s_p50_max", True)
        assert rollback["reason"].startswith("breached: share of requests with latency_s > 1e-06")
        live = httpx.get(f"{server.url}/admin/experiment/analysis", headers=auth).json()
        assert live["inference"] == "sequential" and live["arms"]["treatment"]["units"] >= 5
        assert httpx.get(f"{server.url}/admin/experiment/analysis").status_code == 401
        bad = httpx.get(f"{server.url}/admin/experiment/analysis?alpha=0", headers=auth)
        assert bad.status_code == 400 and "alpha" in bad.text
    (record,) = [r for r in caplog.records if "guardrail" in r.getMessage()]
    assert "guardrail latency_s_p50_max breached by arm 'treatment' of experiment width-test, weight set to 0: " \
           "breached: share of requests" in record.getMessage()


@pytest.mark.slow
def test_an_experiment_with_an_slo_arm_starts_like_the_slo_policy(checkpoint_512, tmp_path):
    """No --profile: the server measures one at start-up, as `--policy slo` does, and the slo arm serves."""
    _, path = checkpoint_512
    config = {**CONFIG, "arms": [CONFIG["arms"][0], {"name": "treatment", "weight": 50,
                                                      "policy": {"kind": "slo", "slo_ms": 60_000}}]}
    settings = ServeSettings(checkpoint=path, device="cpu", experiment=write_config(tmp_path / "exp.yaml", config),
                             ab_db=tmp_path / "ab.sqlite")
    app = build_app(settings)
    assert app.state.engine.latency is not None  # the measured profile the scheduler prices the slo arm with
    with ServerThread(app) as server:
        arms = {}
        for user in (f"user-{i}" for i in range(40)):
            r = complete(server.url, user=user)
            assert r.status_code == 200
            arms[r.headers["x-matta-arm"]] = r
        assert set(arms) == {"control", "treatment"}
        assert "x-matta-predicted-ms" in arms["treatment"].headers  # chosen by the slo policy


@pytest.mark.slow
def test_sigkill_during_load_loses_no_acknowledged_exposure_and_sighup_reloads(checkpoint_512, tmp_path):
    """A real `matta serve` process under concurrent load, killed with SIGKILL: every response
    a client received has its exposure in the log. SIGHUP with a bad file keeps the old config."""
    _, path = checkpoint_512
    db, exp = tmp_path / "ab.sqlite", write_config(tmp_path / "exp.yaml")
    server = Server(path, threads=1, max_batch=8, log_path=tmp_path / "server.log",
                    extra_args=("--experiment", str(exp), "--ab-db", str(db)))
    url = server.start()
    try:
        assert complete(url, user="carol").headers["x-matta-arm"] in ("control", "treatment")
        exp.write_text("name: [unclosed")
        os.kill(server.proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert complete(url, user="carol").status_code == 200  # still serving the old experiment
        write_config(exp, {**CONFIG, "arms": [{"name": "only", "weight": 1, "policy": {"kind": "fixed", "width": "l"}}]})
        os.kill(server.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while complete(url, user="carol").headers.get("x-matta-arm") != "only":
            assert time.monotonic() < deadline, "SIGHUP did not reload the experiment"
            time.sleep(0.1)
        acknowledged: list[str] = []

        async def client(j: int, stop_at: float) -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                k = 0
                while time.monotonic() < stop_at:
                    try:
                        r = await http.post(f"{url}/v1/completions", json={
                            "model": "tiny", "prompt": "To be", "max_tokens": 4, "user": f"u{j}-{k}"})
                    except httpx.HTTPError:
                        return  # the server is gone
                    if r.status_code == 200:
                        acknowledged.append(r.json()["id"])
                    k += 1

        async def load_then_kill() -> None:
            stop_at = time.monotonic() + 30
            clients = [asyncio.create_task(client(j, stop_at)) for j in range(8)]
            while len(acknowledged) < 60:
                await asyncio.sleep(0.05)
            os.kill(server.proc.pid, signal.SIGKILL)
            await asyncio.gather(*clients)

        asyncio.run(load_then_kill())
        server.proc.wait(10)
        assert server.proc.returncode == -signal.SIGKILL
    finally:
        server.stop()
    logged = {r["request_id"] for r in rows(db)}
    missing = [i for i in acknowledged if i not in logged]
    assert len(acknowledged) >= 60 and not missing, f"{len(missing)} of {len(acknowledged)} acknowledged exposures lost"


def test_load_experiment_reports_missing_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="no such experiment file"):
        load_experiment(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_experiment(tmp_path / "bad.yaml")


def _writer(path: str, tag: str, n: int) -> None:
    from router.ab_log import ABLog, Exposure

    log = ABLog(path)
    for i in range(n):  # one commit per row: the worst case for lock contention
        log.write_sync([Exposure(f"{tag}-{i}", "width-test", f"{tag}-u{i}", "hash", "control", "fixed:ta", "ta",
                                 200, 0.1, 3, 3, time.time())])
    log.close()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["one shard per writer", "one shared file"])
def test_concurrent_writer_processes_lose_nothing_and_shards_merge(tmp_path, layout):
    import multiprocessing

    from router.ab_analysis import load_shards

    ctx = multiprocessing.get_context("spawn")
    paths = [tmp_path / (f"w{j}.sqlite" if layout.startswith("one shard") else "shared.sqlite") for j in range(3)]
    procs = [ctx.Process(target=_writer, args=(str(p), f"w{j}", 150)) for j, p in enumerate(paths)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    exposures, _ = load_shards([tmp_path])
    assert sorted(e["request_id"] for e in exposures) == sorted(f"w{j}-{i}" for j in range(3) for i in range(150))


def test_shipped_example_experiments_fit_the_default_checkpoint():
    from pathlib import Path

    from matta.checkpoint import load_checkpoint

    repo = Path(__file__).resolve().parents[1]
    widths = load_checkpoint(repo / "checkpoints" / "default").config.width_names
    paths = sorted((repo / "configs" / "experiments").glob("*.yaml"))
    assert paths
    for path in paths:
        load_experiment(path).check_widths(widths)
