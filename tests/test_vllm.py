"""vLLM (CPU build) serves an exported width with matta's greedy tokens, alone and behind `matta route`.

The vLLM tests are slow (vLLM starts in ~30-50 s on 2 cores) and need the separate virtualenv that
deploy/vllm/setup_venv.sh creates; without it they are skipped.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from benchmarks.harness import VLLM_VENV, ServerThread, VLLMServer
from deploy.vllm.launch import check_export, vllm_command, vllm_env
from matta.checkpoint import load_checkpoint
from matta.hf import export_width
from serving.api.route import build_route_app
from serving.settings import RouteSettings
from tests.helpers import REPO

DEFAULT_CHECKPOINT = REPO / "checkpoints" / "default"
PROMPT = "ROMEO.\nWhat light"
MAX_TOKENS = 16

requires_vllm = pytest.mark.skipif(not (VLLM_VENV / "bin" / "vllm").is_file(),
                                   reason=f"no vLLM in {VLLM_VENV}: create it with deploy/vllm/setup_venv.sh")


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def vllm_s(checkpoint, tmp_path_factory):
    """vLLM serving the Student width `s` of the shipped checkpoint, exported to a temporary directory."""
    tmp = tmp_path_factory.mktemp("vllm")
    export = export_width(checkpoint, "s", tmp / "s")
    server = VLLMServer(export, f"{checkpoint.config.name}:s", tmp / "vllm-s.log")
    try:
        server.start()
        print(f"vLLM started in {server.start_s:.1f} s")
        yield server
    finally:
        server.stop()


def matta_greedy(checkpoint, width: str) -> tuple[list[int], list[int], str]:
    """Prompt ids, then matta's own greedy tokens and text at ``width`` (end-of-text dropped, as vLLM does)."""
    prompt_ids = checkpoint.tokenizer.encode(PROMPT)
    tokens = checkpoint.model.generate_greedy(prompt_ids, MAX_TOKENS, width=width)
    tokens = [t for t in tokens if t != checkpoint.tokenizer.eos_id]
    return prompt_ids, tokens, checkpoint.tokenizer.decode(tokens)


def test_the_launch_command_serves_an_export_in_float32(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="setup_venv.sh"):
        vllm_command(export_width(checkpoint, "s", tmp_path / "s"), "m:s", 8001, venv=tmp_path / "no-venv")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "vllm"):
        (venv / "bin" / name).touch()
    cmd = vllm_command(tmp_path / "s", "matta-shakespeare:s", 8001, venv=venv, extra_args=("--seed", "1"))
    assert cmd[:3] == [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.launchers.api_server.entry"]
    value = lambda flag: cmd[cmd.index(flag) + 1]
    assert value("--model") == str(tmp_path / "s") and value("--served-model-name") == "matta-shakespeare:s"
    assert value("--dtype") == "float32" and value("--max-model-len") == str(checkpoint.config.n_ctx)
    assert "--enforce-eager" in cmd and cmd[-2:] == ["--seed", "1"]
    (tmp_path / "s" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        check_export(tmp_path / "s")
    env = vllm_env(threads=2, base={"VLLM_CPU_OMP_THREADS_BIND": "0-1"})
    assert env["OMP_NUM_THREADS"] == "2" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.slow
@requires_vllm
def test_vllm_greedy_equals_matta_at_the_exported_width(vllm_s, checkpoint):
    prompt_ids, tokens, text = matta_greedy(checkpoint, "s")
    # Token ids in, so tokenization cannot differ; `return_token_ids` is a vLLM extension.
    r = httpx.post(f"{vllm_s.url}/v1/completions", timeout=60, json={
        "model": f"{checkpoint.config.name}:s", "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0,
        "return_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == tokens
    assert choice["text"] == text


@pytest.mark.slow
@requires_vllm
def test_matta_route_relays_a_vllm_backend(vllm_s, checkpoint, tmp_path):
    from benchmarks.harness import Server

    name = checkpoint.config.name
    ta = Server(DEFAULT_CHECKPOINT, threads=1, max_batch=4, log_path=tmp_path / "matta-ta.log",
                extra_args=("--policy", "fixed:ta"))
    try:
        config = RouteSettings.model_validate({"model": name, "checkpoint": str(DEFAULT_CHECKPOINT), "backends": [
            {"width": "s", "url": vllm_s.url, "model": f"{name}:s"},
            {"width": "ta", "url": ta.start(), "model": f"{name}:ta"}]})
        with ServerThread(build_route_app(config)) as proxy:
            health = httpx.get(f"{proxy.url}/health", timeout=10).json()
            assert health["backends"] == {"s": "ok", "ta": "ok"}
            for width in ("s", "ta"):
                prompt_ids, _, text = matta_greedy(checkpoint, width)
                body = {"model": f"{name}:{width}", "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0}
                r = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=60)
                assert r.status_code == 200, r.text
                assert r.headers["x-matta-width"] == width
                assert r.json()["choices"][0]["text"] == text
            # A text prompt: vLLM tokenizes the export's tokenizer.json exactly as matta does.
            _, _, text = matta_greedy(checkpoint, "s")
            streamed = ""
            with httpx.stream("POST", f"{proxy.url}/v1/completions", timeout=60, json={
                    "model": f"{name}:s", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "stream": True}) as r:
                assert r.status_code == 200 and r.headers["x-matta-width"] == "s"
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        streamed += "".join(c["text"] for c in json.loads(line[6:])["choices"])
            assert streamed == text
    finally:
        ta.stop()


LLAMA_CHECKPOINT = REPO / "checkpoints" / "llama"


@pytest.mark.slow
@requires_vllm
@pytest.mark.parametrize("width", ["s", "ta"])
def test_vllm_serves_a_llama_family_export_with_matta_s_greedy_tokens(width, tmp_path):
    """The shipped nested Llama (GQA, head_dim 64 as vLLM's CPU build needs) exported as a plain
    LlamaForCausalLM with intermediate_size = the width: vLLM's greedy tokens are matta's."""
    checkpoint = load_checkpoint(LLAMA_CHECKPOINT)
    export = export_width(checkpoint, width, tmp_path / width)
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"
    served = f"{checkpoint.config.name}:{width}"
    server = VLLMServer(export, served, tmp_path / "vllm.log")
    try:
        server.start()
        prompt_ids, tokens, text = matta_greedy(checkpoint, width)
        r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": served, "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == tokens
        assert r.json()["choices"][0]["text"] == text
    finally:
        server.stop()


@requires_vllm
@pytest.mark.slow
def test_vllms_own_benchmark_client_runs_from_its_venv_and_counts_as_ours(checkpoint, vllm_s, tmp_path):
    """`benchmarks.vs_vllm`'s wrapper runs `vllm.benchmarks.serve` in the vllm-cpu venv; on the same
    server and prompts it completes what our client completes, with the same output tokens."""
    from benchmarks.client import Request, run_closed_loop, summarize
    from benchmarks.vs_vllm import run_vllm_client

    export = vllm_s.cmd[vllm_s.cmd.index("--model") + 1]
    model = f"{checkpoint.config.name}:s"
    texts = [f"{PROMPT} {i}" for i in range(4)]
    theirs = run_vllm_client(vllm_s.url, model, export, texts, MAX_TOKENS, 2, 8, tmp_path)
    requests = [Request(texts[i % 4], MAX_TOKENS, 0.0, model, {"ignore_eos": True}) for i in range(8)]
    ours = summarize(*asyncio.run(run_closed_loop(vllm_s.url, requests, 2)))
    assert theirs["completed"] == ours["completed"] == 8 and theirs["failed"] == ours["failed"] == 0
    assert theirs["total_output_tokens"] == ours["total_output_tokens"] == 8 * MAX_TOKENS
    assert theirs["median_ttft_ms"] > 0 and ours["median_ttft_ms"] > 0
