"""Compiled decode steps (serving/worker/compiled.py): the same numbers as eager, swapped in without a start-up tax.

The compile tests use a two-width model (four step signatures) and share one on-disk cache, so the
cold compile is paid once per session (about a minute and a half on two cores).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
import torch
import torch._dynamo.utils
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.harness import ServerThread
from matta.checkpoint import load_checkpoint, save_checkpoint
from matta.kv_cache import StaticKVCache
from matta.model import NestedGPT
from serving.app import build_app
from serving.engine.inproc import Engine
from serving.messages import Sampling
from serving.settings import ServeSettings
from serving.worker.compile_cache import cache_dir_for
from serving.worker.compiled import DecodeSteps, decode_logits, representative_rows, rows_signature, step_inputs
from tests.helpers import REPO, generate_tokens, sharpen, tiny_config

GREEDY = Sampling(max_tokens=12, temperature=0.0)
PROMPTS = ["Now is the winter", "To be, or not to be", "Friends, Romans", "O Romeo", "All the world", "Is this"]


@pytest.fixture(scope="module")
def two_widths(tmp_path_factory, tokenizer):
    """A sharpened two-width checkpoint, its model and one compile cache for the module."""
    torch.manual_seed(1)
    model = sharpen(NestedGPT(tiny_config(widths={"s": 32, "ta": 128})).eval())
    root = tmp_path_factory.mktemp("compiled")
    path = save_checkpoint(root / "ckpt", model, tokenizer, {"recipe": "test"})
    return path, model, root / "cache"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_every_step_the_engine_can_take_has_a_signature_that_is_compiled(data):
    """Rows sorted widest first (as the engine keeps them) in any mix and batch size map to one of
    the signatures the worker compiles: none of the engine's steps is left eager for good."""
    config = load_checkpoint("checkpoints/default", weights=False).config
    max_batch = data.draw(st.integers(1, 32))
    compiled = {rows_signature(config, rows) for rows in representative_rows(config, max_batch)}
    size = {w: sum(config.resolve_width(w)) for w in config.served_widths}
    rows = data.draw(st.lists(st.sampled_from(config.served_widths), min_size=1, max_size=max_batch))
    rows.sort(key=lambda w: -size[w])
    assert rows_signature(config, rows) in compiled


def test_compile_off_runs_every_step_eager(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4)
    engine.start()
    try:
        asyncio.run(generate_tokens(engine, [("Now is", "s"), ("To be", "ta")], GREEDY))
    finally:
        engine.stop()
    stats = engine.stats()
    assert stats.eager_steps > 0 and stats.compiled_steps == 0 and stats.compile_signatures == 0


def test_a_compile_cache_others_could_write_is_refused(model, tmp_path):
    """What the cache holds is compiled code and torch's serialized compile state (read with
    torch.compiler.load_compiled_function): only a directory this user alone can write is used.
    ``require`` fails to start; ``background`` serves eager and says why."""
    leaf = cache_dir_for(model.config, tmp_path)
    leaf.mkdir(parents=True)
    leaf.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by no one else"):
        DecodeSteps(model, "require", cache_dir=tmp_path)
    background = DecodeSteps(model, "background", cache_dir=tmp_path, checkpoint=tmp_path)
    assert background.mode == "off" and "writable by no one else" in background.status.error
    background.start()  # nothing to start: no worker, every step eager
    assert background._worker is None and background.status.signatures == 0
    leaf.chmod(0o700)
    assert DecodeSteps(model, "background", cache_dir=tmp_path, checkpoint=tmp_path).mode == "background"


def test_a_failing_compile_worker_leaves_the_engine_serving_eager(two_widths, tokenizer, tmp_path):
    _, model, _ = two_widths
    steps = DecodeSteps(model, "background", max_batch=4, cache_dir=tmp_path / "cache",
                        checkpoint=tmp_path / "no-such-checkpoint")
    engine = Engine(model, tokenizer, max_batch=4, steps=steps)
    engine.start()
    try:
        deadline = time.monotonic() + 120
        while steps.status.error is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "the compile worker exited with code" in (steps.status.error or "")
        results = asyncio.run(generate_tokens(engine, [("Now is", "s"), ("To be", "ta")], GREEDY))
    finally:
        engine.stop()
    for (prompt, width), tokens in zip([("Now is", "s"), ("To be", "ta")], results, strict=True):
        assert tokens == model.generate_greedy(tokenizer.encode(prompt), GREEDY.max_tokens, width=width)
    assert steps.status.ready == 0 and engine.stats().compiled_steps == 0


@pytest.mark.slow
def test_compiled_steps_match_eager_and_serving_never_compiles(two_widths, tokenizer):
    _, model, cache = two_widths
    steps = DecodeSteps(model, "require", max_batch=8, cache_dir=cache)
    assert steps.status.ready == steps.status.signatures == 4

    # One step of every signature, compiled against eager (fp32): equal within 1e-5.
    for rows in [["ta", "ta", "s"], ["ta", "s", "s", "s"], ["s"], ["ta"] * 5, ["ta", "ta", "s", "s", "s"]]:
        ids, mask, cache_a, plans = step_inputs(model, rows, context=20)
        _, _, cache_b, _ = step_inputs(model, rows, context=20)
        with torch.inference_mode():
            want = decode_logits(model, ids, mask, cache_a, plans)
            got = steps(ids, mask, cache_b, plans)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for kb, ka in zip(cache_b.keys, cache_a.keys, strict=True):  # the step wrote its keys in place
            torch.testing.assert_close(kb[:, :, : cache_b.length], ka[:, :, : cache_a.length], atol=1e-5, rtol=0)
    assert steps.status.compiled_steps == 5 and steps.status.eager_steps == 0
    # The per-width engine (and benchmarks) pass a width's plan as resolve_width's tuple: same step.
    ids, mask, cache_a, _ = step_inputs(model, ["s", "s"], context=20)
    with torch.inference_mode():
        steps(ids, mask, cache_a, model.config.resolve_width("s"))
    assert steps.status.compiled_steps == 6 and steps.status.ready == 4
    # A cache filled to its last slot is grown first (the steps were traced with room to spare);
    # inputs the guards refuse (an explicit int32 mask; the engine passes none) run eager, and the
    # signature stays compiled.
    ids, mask, cache_a, plans = step_inputs(model, ["ta", "s"], context=20)
    _, _, cache_b, _ = step_inputs(model, ["ta", "s"], context=20)
    full = StaticKVCache.from_list(cache_b.as_list(), capacity=cache_b.length + 1)
    full.slot_lengths[:2] = cache_b.lengths  # the rows' own lengths, as step_inputs made them
    full.set_batch_size(2)
    explicit = (torch.arange(cache_b.length + 1)[None, :] <= cache_b.lengths[:, None]).int()
    with torch.inference_mode():
        want = decode_logits(model, ids, mask, cache_a, plans)
        torch.testing.assert_close(steps(ids, mask, full, plans), want, atol=1e-5, rtol=0)
        assert steps.status.compiled_steps == 7
        got = steps(ids, explicit, cache_b, plans)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert steps.status.guard_misses == 1 and steps.status.eager_steps == 1 and steps.status.ready == 4

    # Whole generations through the engine: every token as eager greedy decoding gives, and no
    # graph compiled on the serving path whatever the batch, context and width mix; every step of a
    # loaded signature runs compiled (a batch-1 step once refused the engine's cache of spare slots).
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    misses = steps.status.guard_misses
    engine = _generations_match_greedy(model, tokenizer, steps, [(p, "s" if i % 3 else "ta")
                                                                 for i, p in enumerate(PROMPTS)])
    engine = _generations_match_greedy(model, tokenizer, steps, [(PROMPTS[0], "s")])  # alone: batch 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert engine.stats().compiled_steps > 0 and steps.status.guard_misses == misses


@pytest.mark.slow
def test_matta_compile_loads_what_the_cache_holds_and_names_it(two_widths):
    """The CLI over the cache the test above filled (same thread count): every step loads, none is
    compiled again (a cold compile of four steps takes minutes; loading them, seconds)."""
    path, _, cache = two_widths
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "cli", "compile", str(path), "--max-batch", "8", "--threads",
                          str(torch.get_num_threads()), "--compile-cache", str(cache)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "4 compiled decode steps in " in out.stdout
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_background_compile_serves_at_once_and_swaps_compiled_steps_in(two_widths, tokenizer):
    """Through HTTP with the engine core in its own process: healthy and answering before any graph
    is ready, then the worker's graphs (from the on-disk cache the test above filled) are loaded
    and the same requests are answered by compiled steps with the same tokens."""
    path, model, cache = two_widths
    app = build_app(ServeSettings(checkpoint=path, device="cpu", max_batch=8, compile="background",
                                  compile_cache=cache))
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        health = client.get("/health")
        assert health.status_code == 200
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
        first = client.post("/v1/completions", json={**body, "model": "tiny:s"}).json()["choices"][0]["text"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            compiled = client.get("/health").json()["compiled"]
            if compiled["ready"] == compiled["signatures"]:
                break
            time.sleep(0.5)
        assert compiled == {"ready": 4, "signatures": 4}
        before = _compiled_steps(client)
        again = client.post("/v1/completions", json={**body, "model": "tiny:s"}).json()["choices"][0]["text"]
        assert again == first
        assert _compiled_steps(client) >= before + 11  # every decode step of the 12 tokens
    want = model.generate_greedy(tokenizer.encode(PROMPTS[0]), 12, width="s")
    assert tokenizer.encode(first)[:4] == want[:4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_steps_match_eager_on_cuda(two_widths, tokenizer, tmp_path):
    _, model, _ = two_widths
    model = model.to("cuda")
    steps = DecodeSteps(model, "require", max_batch=8, cache_dir=tmp_path / "cache")
    engine = _generations_match_greedy(model, tokenizer, steps, [(p, "s" if i % 2 else "ta")
                                                                 for i, p in enumerate(PROMPTS)])
    assert engine.stats().compiled_steps > 0


def _generations_match_greedy(model, tokenizer, steps, cases) -> Engine:
    """Generate every (prompt, width) case through an engine over ``steps``: every token is the one
    eager greedy decoding of that prompt alone gives. Returns the stopped engine."""
    engine = Engine(model, tokenizer, max_batch=8, steps=steps)
    engine.start()
    try:
        results = asyncio.run(generate_tokens(engine, cases, GREEDY))
    finally:
        engine.stop()
    for (prompt, width), tokens in zip(cases, results, strict=True):
        assert tokens == model.generate_greedy(tokenizer.encode(prompt), GREEDY.max_tokens, width=width)
    return engine


def _compiled_steps(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('matta_decode_steps_total{path="compiled"}'):
            return float(line.split()[-1])
    raise AssertionError("no matta_decode_steps_total{path=compiled} in /metrics")


@pytest.mark.slow
def test_compiled_steps_of_a_nested_llama_match_eager(tokenizer, tmp_path):
    """The Llama family (RoPE, GQA, SwiGLU) through the same compiled steps, by its forward interface
    alone: one step of every signature equals eager, and whole generations equal eager greedy."""
    from matta.config import ModelConfig
    from matta.llama import NestedLlama

    torch.manual_seed(2)
    config = ModelConfig(family="llama", vocab_size=320, n_ctx=64, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                         widths={"s": 32, "ta": 128}, tie_embeddings=False, name="tiny-llama")
    model = NestedLlama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # sharpened, so greedy text varies with the context and the width
    steps = DecodeSteps(model, "require", max_batch=8, cache_dir=tmp_path / "cache")
    assert steps.status.ready == steps.status.signatures == 4
    for rows in [["ta", "ta", "s"], ["s"], ["ta"] * 5]:
        ids, mask, cache_a, plans = step_inputs(model, rows, context=20)
        _, _, cache_b, _ = step_inputs(model, rows, context=20)
        with torch.inference_mode():
            # rtol: inductor's fused reductions round differently per CPU (2.6e-5 relative on AVX2)
            torch.testing.assert_close(steps(ids, mask, cache_b, plans), decode_logits(model, ids, mask, cache_a, plans),
                                       atol=1e-5, rtol=1e-4)
    assert steps.status.compiled_steps == 3 and steps.status.eager_steps == 0
    engine = _generations_match_greedy(model, tokenizer, steps, [(p, "s" if i % 2 else "ta")
                                                                 for i, p in enumerate(PROMPTS)])
    assert engine.stats().compiled_steps > 0


@pytest.mark.slow
def test_bfloat16_steps_compile_apart_from_float32_ones_and_match_bfloat16_eager(two_widths, tmp_path):
    """A bf16 engine's steps are compiled for bf16 (their own artifacts beside the fp32 ones in one
    cache) and compute what the bf16 eager step computes."""
    import copy

    _, model, _ = two_widths
    half = copy.deepcopy(model).to(torch.bfloat16)
    rows = [["ta", "s"]]
    cache = tmp_path / "cache"
    fp32 = DecodeSteps(model, "require", max_batch=8, cache_dir=cache, rows=rows)
    bf16 = DecodeSteps(half, "require", max_batch=8, cache_dir=cache, rows=rows)
    assert fp32.paths[0] != bf16.paths[0] and fp32.paths[0].exists() and bf16.paths[0].exists()
    ids, mask, cache_a, plans = step_inputs(half, rows[0], context=20)
    _, _, cache_b, _ = step_inputs(half, rows[0], context=20)
    assert cache_a.keys[0].dtype == torch.bfloat16
    with torch.inference_mode():
        want = decode_logits(half, ids, mask, cache_a, plans)
        got = bf16(ids, mask, cache_b, plans)
    assert got.dtype == torch.float32 and bf16.status.compiled_steps == 1
    # Fused kernels round bf16 intermediates at other points than eager's op-by-op path.
    torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0)
