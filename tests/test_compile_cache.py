"""The compile cache is a file format the server loads: every bad artifact (empty, truncated, garbage,
another torch's, failing its checksum, unreadable) and a write that fails (a full disk) leaves the
server serving, that decode step eager, with one warning and a count in
``matta_compile_cache_faults_total{kind}``; nothing of a bad artifact reaches torch's deserializer.

Before the artifact header (serving/worker/compiled.py ``write_artifact``/``read_artifact``), each of these
artifacts went to ``torch.compiler.load_compiled_function`` as it was: a pickle planted in the cache
ran, ``--compile require`` failed to start, and no metric said anything."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

from benchmarks.harness import ServerThread, metric
from matta.checkpoint import save_checkpoint
from matta.model import NestedGPT
from serving.app import build_app
from serving.engine.inproc import Engine
from serving.messages import Sampling
from serving.settings import ServeSettings
from serving.worker.compile_cache import ARTIFACT_MAGIC, artifact_path, cache_dir_for, read_artifact, temporary_path
from serving.worker.compiled import DecodeSteps, representative_rows, rows_signature
from tests.helpers import generate_tokens, sharpen, tiny_config

MAX_BATCH = 4
GREEDY = Sampling(max_tokens=6, temperature=0.0)
PROMPTS = ["To be", "or not"]


class Planted:
    """A pickle that, if anything ever unpickles it, leaves a file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def one_width(tmp_path_factory, tokenizer):
    """A one-width checkpoint and a cache holding its first step signature, compiled once (~30 s)."""
    torch.manual_seed(2)
    model = sharpen(NestedGPT(tiny_config(widths={"s": 64})).eval())
    root = tmp_path_factory.mktemp("cache-faults")
    path = save_checkpoint(root / "ckpt", model, tokenizer, {"recipe": "test"})
    rows = representative_rows(model.config, MAX_BATCH)[0]
    DecodeSteps(model, "require", max_batch=MAX_BATCH, cache_dir=root / "cache", rows=[rows])
    artifact = artifact_path(cache_dir_for(model.config, root / "cache"), rows_signature(model.config, rows),
                             torch.device("cpu"), torch.float32)
    assert read_artifact(artifact)  # whole, of this torch
    return path, model, root / "cache", artifact.relative_to(root / "cache")


def corrupt(artifact: Path, kind: str, marker: Path) -> None:
    """Make ``artifact`` bad in the way ``kind`` names; the payloads that torch would unpickle are a
    planted pickle, so the test sees whether anything deserialized them."""
    data = artifact.read_bytes()
    end = data.index(b"\n", len(ARTIFACT_MAGIC))
    header = json.loads(data[len(ARTIFACT_MAGIC):end])
    planted = pickle.dumps(Planted(marker))
    if kind == "empty":
        artifact.write_bytes(b"")
    elif kind == "truncated":
        artifact.write_bytes(data[:len(data) // 2])
    elif kind == "garbage":
        artifact.write_bytes(planted)
    elif kind == "version":  # a whole artifact, checksum and all, from another torch
        header.update(torch="2.0.0", bytes=len(planted), sha256=hashlib.sha256(planted).hexdigest())
        artifact.write_bytes(ARTIFACT_MAGIC + json.dumps(header).encode() + b"\n" + planted)
    elif kind == "checksum":  # same length, other bytes
        artifact.write_bytes(data[:end + 1] + planted + data[end + 1 + len(planted):])
    elif kind == "unreadable":
        if os.geteuid() == 0:  # root reads a mode-000 file: a directory in its place cannot be read
            artifact.unlink()
            artifact.mkdir()
        else:
            artifact.chmod(0)
    else:
        raise AssertionError(kind)


def cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "serving.worker.compiled" and r.levelname == "WARNING"]


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "version", "checksum", "unreadable"])
def test_a_bad_artifact_leaves_the_server_serving_with_one_warning_and_a_metric(one_width, tmp_path, kind, caplog):
    path, _, cache, artifact = one_width
    shutil.copytree(cache, tmp_path / "cache")
    marker = tmp_path / "unpickled"
    corrupt(tmp_path / "cache" / artifact, kind, marker)
    app = build_app(ServeSettings(checkpoint=path, device="cpu", engine="inproc", compile="background",
                                  compile_cache=tmp_path / "cache", max_batch=MAX_BATCH))
    with ServerThread(app) as server:
        steps = app.state.engine.steps
        deadline = time.monotonic() + 60
        while not steps.status.faults and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": ["To be", "or not"],
                                                              "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        scraped = httpx.get(f"{server.url}/metrics").text
        assert metric(scraped, "matta_compile_cache_faults_total", kind=kind) == 1, scraped[-1500:]
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert not marker.exists(), "a bad artifact was deserialized"
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and str(artifact.name) in warnings[0], warnings
    assert steps.status.ready == 0  # nothing loaded: the worker was compiling it again when the server stopped


def test_the_core_process_counts_a_bad_artifact_in_the_metric_too(one_width, tmp_path):
    path, _, cache, artifact = one_width
    shutil.copytree(cache, tmp_path / "cache")
    marker = tmp_path / "unpickled"
    corrupt(tmp_path / "cache" / artifact, "garbage", marker)
    # The core's thread count as this process's: artifacts are per thread count (artifact_path).
    app = build_app(ServeSettings(checkpoint=path, device="cpu", engine="process", compile="background",
                                  compile_cache=tmp_path / "cache", max_batch=MAX_BATCH,
                                  threads=torch.get_num_threads()))
    with ServerThread(app) as server:
        deadline = time.monotonic() + 60
        while not app.state.engine.stats().compile_faults and time.monotonic() < deadline:
            # (the load the API process reads arrives with the core's steps)
            httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        scraped = httpx.get(f"{server.url}/metrics").text
        assert metric(scraped, "matta_compile_cache_faults_total", kind="garbage") == 1, scraped[-1500:]
    assert not marker.exists()


@pytest.mark.slow
def test_require_with_a_bad_artifact_compiles_it_again_and_a_full_disk_leaves_it_eager(one_width, tmp_path, tokenizer,
                                                                                       caplog):
    """``--compile require``: a bad artifact is compiled again at start-up (the server starts); when the
    disk is full (writes to /dev/full: ENOSPC from the kernel), the step runs eager and nothing partial
    is left in the cache."""
    _, model, cache, artifact = one_width
    rows = representative_rows(model.config, MAX_BATCH)[:1]
    shutil.copytree(cache, tmp_path / "cache")
    corrupt(tmp_path / "cache" / artifact, "garbage", tmp_path / "unpickled")
    steps = DecodeSteps(model, "require", max_batch=MAX_BATCH, cache_dir=tmp_path / "cache", rows=rows)
    assert steps.status.faults == {"garbage": 1} and steps.status.ready == 1
    assert read_artifact(tmp_path / "cache" / artifact)  # rewritten whole

    full = tmp_path / "full-disk"
    target = full / artifact
    target.parent.mkdir(parents=True, mode=0o700)
    temporary_path(target).symlink_to("/dev/full")  # what write_artifact opens: every write is ENOSPC
    caplog.clear()
    steps = DecodeSteps(model, "require", max_batch=MAX_BATCH, cache_dir=full, rows=rows)
    assert steps.status.faults == {"write": 1} and steps.status.ready == 0
    assert "No space left on device" in steps.status.error
    assert len(cache_warnings(caplog)) == 1
    assert not target.exists() and not temporary_path(target).exists()  # nothing partial left
    engine = Engine(model, tokenizer, max_batch=MAX_BATCH, steps=steps)
    engine.start()
    try:
        results = asyncio.run(generate_tokens(engine, [(p, "s") for p in PROMPTS], GREEDY))
    finally:
        engine.stop()
    for prompt, tokens in zip(PROMPTS, results, strict=True):
        assert tokens == model.generate_greedy(tokenizer.encode(prompt), GREEDY.max_tokens, width="s")
    assert engine.stats().eager_steps > 0 and engine.stats().compiled_steps == 0
