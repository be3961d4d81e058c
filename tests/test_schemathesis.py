"""Schemathesis against the server's own OpenAPI schema: >= 1000 generated requests, every check.

The server runs as it would in production: API key, admin key, an A/B experiment. Schemathesis
generates schema-valid and schema-violating requests for every operation and checks each answer:
no 5xx, the status code and content type documented, the body matching its schema (JSON and each
server-sent event), valid data accepted and invalid data refused (see tests/schemathesis.toml for
the one operation exempt from the last-but-one). Then the server must still be healthy with no
request left in its batch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from benchmarks.harness import ServerThread
from serving.app import build_app
from serving.settings import ServeSettings
from tests.helpers import write_config

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).with_name("schemathesis.toml")
MIN_CASES = 1000
KEY = "schemathesis-key"


def test_schemathesis_finds_no_failure_in_1000_generated_requests(checkpoint_512, tmp_path):
    _, path = checkpoint_512
    settings = ServeSettings(checkpoint=path, device="cpu", max_batch=8, api_key=KEY, admin_key=KEY,
                              experiment=write_config(tmp_path / "exp.yaml"), ab_db=tmp_path / "ab.sqlite")
    st = Path(sys.executable).with_name("st")
    # A fixed seed keeps CI reproducible; MATTA_SCHEMATHESIS_SEED=random explores afresh.
    seed = os.environ.get("MATTA_SCHEMATHESIS_SEED", "20261128")
    with ServerThread(build_app(settings)) as server:
        command = [str(st), "--no-color", "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json",
                   "--max-examples", "250", "--request-timeout", "30", "-H", f"Authorization: Bearer {KEY}",
                   *(["--seed", seed] if seed != "random" else [])]
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        report = run.stdout + run.stderr
        assert run.returncode == 0, report[-6000:]
        generated = re.search(r"(\d+) generated, (\d+) passed", report)
        assert generated, report[-3000:]
        assert int(generated.group(1)) >= MIN_CASES and generated.group(1) == generated.group(2), report[-3000:]
        print(f"schemathesis: {generated.group(0)}")

        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0


def test_the_schema_states_what_the_server_enforces(checkpoint_512):
    """Spot checks of the schema the fuzzing relies on: a drift here would make it test less."""
    model, path = checkpoint_512
    with ServerThread(build_app(ServeSettings(checkpoint=path, device="cpu"))) as server:
        schema = httpx.get(f"{server.url}/openapi.json").json()
    request = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert set(request["model"]["enum"]) == {"tiny", *(f"tiny:{w}" for w in model.config.width_names)}
    token_ids = next(b for b in request["prompt"]["anyOf"] if b.get("items", {}).get("type") == "integer")
    assert token_ids["items"] == {"type": "integer", "minimum": 0, "maximum": model.config.vocab_size - 1}
    assert request["n"]["enum"] == [1]
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "503", "504"} <= set(completions) and "422" not in completions
    assert "Retry-After" in completions["429"]["headers"]
    assert "text/event-stream" in completions["200"]["content"]
    assert "401" not in schema["paths"]["/health"]["get"]["responses"]
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
