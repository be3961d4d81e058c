"""deploy/monitoring/: promtool checks and rule unit tests, a real Prometheus scraping a real ``matta serve``,
and the dashboard's and alerts' PromQL against the metric names a live server exports.

Needs Debian's ``prometheus`` package (``/usr/bin/prometheus``, ``/usr/bin/promtool``); without it the tests
that run those binaries skip and say so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from benchmarks.harness import free_port, terminate
from router.latency import LatencyModel, WidthCost
from tests.helpers import REPO

MONITORING = REPO / "deploy" / "monitoring"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")

# One arm, so every request with a `user` is in the experiment and its policy (slo, shed) decides.
EXPERIMENT = """\
name: monitoring
salt: "1"
unit: user
arms:
  - {name: only, weight: 1, policy: {kind: slo, shed: true}}
"""
SERVER_POLICY = "slo:shed=true"
METRIC_NAME = re.compile(r"(?<![\w:])matta_\w+")  # `job:matta_...:rate5m` recording rules are not exported names
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}


def send_traffic(url: str) -> dict[str, int]:
    """Three requests met (one streamed), one shed (its SLO is 10 us), one feedback: every `matta_`
    family gets a series.

    Returns the expected ``matta_requests_total`` by status.
    """
    with httpx.Client(base_url=url, timeout=60) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        ids = []
        for user in ("u1", "u2"):
            r = client.post("/v1/completions", json={"model": model, "prompt": "To be, or not to be", "max_tokens": 4,
                                                     "latency_slo_ms": 60_000, "user": user})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        r = client.post("/v1/completions", json={"model": model, "prompt": "To be", "max_tokens": 64,
                                                 "latency_slo_ms": 0.01, "user": "u3"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "slo_unattainable", r.text
        # Streamed, so the per-token metrics (inter-token latency) get series: a plain answer's tokens
        # after its first come in one output.
        with client.stream("POST", "/v1/completions", json={"model": model, "prompt": "To be", "max_tokens": 4,
                                                             "latency_slo_ms": 60_000, "stream": True}) as r:
            assert r.status_code == 200 and [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
        r = client.post("/v1/feedback", json={"request_id": ids[0], "metric": "success", "value": 1})
        assert r.status_code == 200, r.text
    return {"200": 3, "429": 1}


def write_profile(widths: list[str], path: Path) -> Path:
    """A fixed latency profile (~1 ms per step), so a server with an slo policy need not measure one at start-up."""
    return LatencyModel({w: WidthCost(0.001, 0.0001, 0.0, 0.001, 0.00001) for w in widths}).save(path)


def exported_names(metrics_text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (``_total``, ``_bucket``, ... included)."""
    return {re.split(r"[{\s]", line, maxsplit=1)[0] for line in metrics_text.splitlines()
            if line and not line.startswith("#")}


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for rule in group["rules"]]


# --- promtool ----------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_accepts_the_prometheus_config_and_its_rules_file():
    result = promtool("check", "config", "deploy/monitoring/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", "deploy/monitoring/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alerts_fire_and_stay_quiet_as_the_rule_unit_tests_expect():
    result = promtool("test", "rules", "deploy/monitoring/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_for_duration_a_severity_and_annotations():
    alerts = [rule for rule in alert_rules() if "alert" in rule]
    assert {a["alert"] for a in alerts} >= {"MattaSLOBudgetBurnFast", "MattaSLOBudgetBurnSlow", "MattaSheddingRequests",
                                            "MattaQueueSaturated", "MattaTargetDown"}
    for alert in alerts:
        assert alert.get("for"), alert["alert"]
        assert alert["labels"]["severity"] in {"page", "ticket", "warning", "critical"}, alert["alert"]
        assert {"summary", "description"} <= set(alert["annotations"]), alert["alert"]


# --- names against a live server ---------------------------------------------------------------


def test_the_dashboard_and_the_alerts_use_only_metric_names_a_live_server_exports(checkpoint_512, tmp_path):
    from benchmarks.harness import ServerThread
    from serving.app import build_app
    from serving.settings import ServeSettings

    model, path = checkpoint_512
    (tmp_path / "experiment.yaml").write_text(EXPERIMENT)
    app = build_app(ServeSettings(checkpoint=path, policy=SERVER_POLICY, max_batch=8, device="cpu",
                                   profile=write_profile(model.config.width_names, tmp_path / "profile.json"),
                                   experiment=tmp_path / "experiment.yaml", ab_db=tmp_path / "ab.sqlite"))
    with ServerThread(app) as server:
        send_traffic(server.url)
        exported = exported_names(httpx.get(server.url + "/metrics", timeout=30).text)

    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in board["templating"]["list"])
    queries = dashboard_queries() + [(f"variable {v['name']}", v["definition"]) for v in board["templating"]["list"]
                                     if v["type"] == "query"]
    queries += [(rule.get("alert") or rule["record"], rule["expr"]) for rule in alert_rules()]
    not_exported = {rule["record"] for rule in alert_rules() if "record" in rule} | {"up"}  # made by Prometheus
    for where, expr in queries:
        names = set(METRIC_NAME.findall(expr))
        assert names or set(re.findall(r"[A-Za-z_:][\w:]*", expr)) & not_exported, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: {sorted(names - exported)} not exported by the server"
    used = {name for _, expr in queries for name in METRIC_NAME.findall(expr)}
    for family in ("matta_request_e2e_latency_seconds_bucket", "matta_requests_total", "matta_slo_attainment_ratio",
                   "matta_slo_requests_total", "matta_effective_quality", "matta_ab_exposures_total",
                   "matta_ab_outcomes_total", "matta_requests_waiting", "matta_requests_running",
                   "matta_queue_capacity_requests", "matta_shed_requests_total", "matta_router_prediction_ratio_bucket"):
        assert family in used, f"{family} is on no panel and in no rule"


# --- a real Prometheus ---------------------------------------------------------------------------


class Prometheus:
    """``prometheus`` as a subprocess on a free port, with its TSDB under ``workdir``."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.cmd = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}"]
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> str:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus did not become ready; log:\n{self.log_path.read_text()[-3000:]}")

    def query(self, promql: str) -> list[dict]:
        """An instant query's result vector; a PromQL error fails with Prometheus' message."""
        body = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10).json()
        assert body["status"] == "success", f"{promql!r}: {body.get('error')}"
        return body["data"]["result"]

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (Prometheus flushes and exits 0), then kill if it hangs; returns the exit code."""
        return None if self.proc is None else terminate(self.proc, timeout_s)


def scrape_config(server_port: int, path: Path) -> Path:
    """The shipped prometheus.yml, scraping only this server, every second, with the shipped rules."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / name) for name in config["rule_files"]]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "matta-serve"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server_port}"]}]
    config["scrape_configs"] = [job]
    path.write_text(yaml.safe_dump(config))
    return path


def poll(check, timeout_s: float = 30.0, interval_s: float = 0.5):
    """``check()`` until it returns something truthy; its last value (falsy) on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


@pytest.mark.slow
@needs_prometheus
def test_a_real_prometheus_scrapes_a_live_server_and_loads_the_alerts(checkpoint_512, tmp_path):
    from benchmarks.harness import Server

    model, path = checkpoint_512
    (tmp_path / "experiment.yaml").write_text(EXPERIMENT)
    profile = write_profile(model.config.width_names, tmp_path / "profile.json")
    server = Server(path, threads=1, max_batch=8, log_path=tmp_path / "serve.log",
                    extra_args=("--policy", SERVER_POLICY, "--profile", str(profile), "--experiment",
                                str(tmp_path / "experiment.yaml"), "--ab-db", str(tmp_path / "ab.sqlite")))
    url = server.start()
    prometheus = None
    try:
        expected = send_traffic(url)
        port = urlsplit(url).port
        prometheus = Prometheus(scrape_config(port, tmp_path / "prometheus.yml"), tmp_path)
        prometheus.start()

        def requests_by_status() -> dict[str, float]:
            return {s["metric"]["status"]: float(s["value"][1]) for s in prometheus.query("matta_requests_total")}

        assert poll(lambda: requests_by_status() == expected), f"scraped {requests_by_status()}, sent {expected}"
        (series, *_) = prometheus.query("matta_requests_total")
        assert series["metric"]["job"] == "matta-serve" and series["metric"]["instance"] == f"127.0.0.1:{port}"
        assert prometheus.query('up{job="matta-serve"}')[0]["value"][1] == "1"

        # Every rule is loaded and has been evaluated without error (health "ok", not "err"/"unknown").
        names = {rule.get("alert") or rule["record"] for rule in alert_rules()}

        def rule_health() -> dict[str, str]:
            groups = httpx.get(prometheus.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
            return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}

        assert poll(lambda: rule_health().keys() == names and set(rule_health().values()) == {"ok"}), rule_health()
        alerting = {r["name"] for g in httpx.get(prometheus.url + "/api/v1/rules", params={"type": "alert"},
                                                   timeout=10).json()["data"]["groups"] for r in g["rules"]}
        assert alerting == {rule["alert"] for rule in alert_rules() if "alert" in rule}
        assert prometheus.query("ALERTS") == [], "no alert should be pending on a healthy server"

        # Each dashboard query is valid PromQL and finds series once two scrapes are in (rates need two samples).
        def query_all(promql: str) -> list[dict]:
            for variable, value in GRAFANA_VARIABLES.items():
                promql = promql.replace(variable, value)
            return prometheus.query(promql)

        queries = dashboard_queries()
        assert poll(lambda: all(query_all(expr) for _, expr in queries)), \
            [title for title, expr in queries if not query_all(expr)]
        assert prometheus.stop() == 0, prometheus.log_path.read_text()[-3000:]
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()
