"""matta on Ray Serve: local Ray (2 CPUs, no dashboard), 2 replicas, completions over HTTP, clean shutdown."""

from __future__ import annotations

import httpx
import openai
import pytest

from benchmarks.harness import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow  # Ray start + 2 replicas loading the model: ~30-60 s


@pytest.fixture(scope="module")
def ray_app(checkpoint_512):
    from deploy.ray.app import build

    model, path = checkpoint_512
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"checkpoint": str(path), "threads": 1, "num_replicas": 2, "max_batch": 8,
                         "health_check_period_s": 1}),
                  name="matta", route_prefix="/")
        yield f"http://127.0.0.1:{port}", model
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_same_api_as_matta_serve(ray_app, tokenizer):
    url, model = ray_app
    status = serve.status().applications["matta"]
    replicas = status.deployments["MattaDeployment"].replica_states
    assert replicas.get("RUNNING") == 2, replicas
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    for width in ("s", "ta"):
        raw = client.completions.with_raw_response.create(model=f"tiny:{width}", prompt="To be or not", max_tokens=10,
                                                          temperature=0)
        assert raw.headers["x-matta-width"] == width
        tokens = model.generate_greedy(tokenizer.encode("To be or not"), 10, width=width)
        assert raw.parse().choices[0].text == tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny:s", prompt="To be or not", max_tokens=10, temperature=0, stream=True))
    assert streamed == client.completions.create(model="tiny:s", prompt="To be or not", max_tokens=10,
                                                 temperature=0).choices[0].text
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny:s", "tiny:m", "tiny:l", "tiny:ta"]
    bad = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert "matta_requests_total" in httpx.get(f"{url}/metrics").text


def test_concurrent_requests_spread_over_both_replicas(ray_app):
    import asyncio

    url, _ = ray_app

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(f"{url}/v1/completions", json={
                "model": "tiny", "prompt": "Now", "max_tokens": 8, "temperature": 0}) for _ in range(24)])

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert len({r.headers["x-matta-replica"] for r in responses}) == 2  # both replicas took requests
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1  # greedy: every replica agrees


def test_locust_runs_against_the_ray_app(ray_app, checkpoint_512, tmp_path):
    import os

    from benchmarks.harness import load_test

    url, _ = ray_app
    _, path = checkpoint_512
    env = {**os.environ, "MATTA_MODEL": "tiny", "MATTA_CHECKPOINT": str(path), "MATTA_MAX_TOKENS": "4"}
    report = load_test(url, users=4, spawn_rate=4, seconds=6, user_classes=["SloUser", "PinnedUser"],
                       out=tmp_path / "ray", env=env)
    aggregated = report["endpoints"]["Aggregated"]
    assert aggregated["requests"] > 0 and aggregated["failures"] == 0, report["endpoints"]


def test_a_replica_whose_core_dies_is_recovered_while_the_other_keeps_serving(ray_app, checkpoint_512):
    """SIGKILL of one replica's engine core: its check_health fails, so Ray takes it out of rotation
    (and replaces it, unless its core was restarted first); the other replica serves throughout, no
    request gets a 5xx other than a quick 503, and both replicas serve again."""
    import os
    import signal
    import time
    from pathlib import Path

    url, _ = ray_app
    _, path = checkpoint_512

    def cores() -> list[int]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serving.engine.core_process" in args and str(path).encode() in args:
                found.append(int(cmdline.parent.name))
        return sorted(found)

    before = cores()
    assert len(before) == 2, before
    os.kill(before[0], signal.SIGKILL)
    body = {"model": "tiny", "prompt": "Now", "max_tokens": 4, "temperature": 0}
    statuses, served_by = [], set()
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, (statuses[-20:], served_by, cores())
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        statuses.append(r.status_code)
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            served_by.add(r.headers["x-matta-replica"])
        live = cores()
        if len(live) == 2 and before[0] not in live and len(served_by) >= 2 and statuses[-4:] == [200] * 4:
            break
        time.sleep(0.1)
    # The other replica served while the dead one was out: some 200 before the last 503 (how many
    # 503s Ray routes to the recovering replica depends on how long its core takes to start).
    last_refusal = max((i for i, code in enumerate(statuses) if code == 503), default=-1)
    assert 200 in statuses[:last_refusal], statuses
    status = serve.status().applications["matta"].deployments["MattaDeployment"].replica_states
    assert status.get("RUNNING") == 2, status
