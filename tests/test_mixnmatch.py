"""Mix'n'Match profiles: config and checkpoint round-trip, the search, and serving a profile by name."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
import torch

from matta.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MIXNMATCH_FILE,
    CheckpointError,
    load_checkpoint,
    load_config,
    save_checkpoint,
    verify_checkpoint,
)
from matta.config import LLAMA_ONLY_FIELDS, ModelConfig
from matta.hf import export_width
from matta.model import NestedGPT
from tests.helpers import SERVED_N_CTX, tiny_config
from training.evaluate import perplexity, width_logits_fn
from training.mixnmatch import (
    choose_profiles,
    exhaustive_profiles,
    heuristic_profiles,
    pareto_front,
    profile_perplexities,
)

PROFILES = {"mnm1": [32, 64, 128], "mnm2": [64, 128, 256]}


def with_profiles(model: NestedGPT, profiles: dict) -> NestedGPT:
    model.config = ModelConfig(**{**model.config.to_dict(), "profiles": profiles})
    return model


def test_profiles_resolve_label_and_order_by_flops(config):
    config = ModelConfig(**{**config.to_dict(), "profiles": PROFILES})
    assert config.resolve_width("mnm1") == (32, 64, 128)
    assert config.width_label([64, 128, 256]) == "mnm2"
    assert config.served_widths == ["s", "m", "mnm1", "l", "mnm2", "ta"]
    assert config.width_names == ["s", "m", "l", "ta"]
    flops = [config.flops_per_token(w) for w in config.served_widths]
    assert flops == sorted(flops)


@pytest.mark.parametrize("profiles, message", [
    ({"s": [32, 64, 128]}, "already a width"),
    ({"mnm1": [32, 64]}, "must list 3 FFN sizes"),
    ({"mnm1": [32, 64, 512]}, r"in 1\.\.256"),
    ({"mnm1": [64, 64, 64]}, "is uniform"),
    ({"a:b": [32, 64, 128]}, "invalid"),
])
def test_bad_profiles_are_refused_quoting_the_value(config, profiles, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**config.to_dict(), "profiles": profiles})


def test_checkpoint_round_trip_keeps_config_json_readable_by_old_readers(model, tokenizer, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", with_profiles(model, PROFILES), tokenizer, {"recipe": "test"})
    assert load_config(path).profiles == PROFILES
    manifest = verify_checkpoint(path)
    assert MIXNMATCH_FILE in manifest["files"]
    # What a reader from before profiles does: from_dict(config.json) refuses unknown keys, so
    # config.json must hold exactly the keys it knows (a GPT-2 config leaves the Llama family's out too).
    old_keys = {f.name for f in dataclasses.fields(ModelConfig)} - {"profiles", "family", *LLAMA_ONLY_FIELDS}
    assert set(json.loads((path / CONFIG_FILE).read_text())) == old_keys
    ckpt = load_checkpoint(path)
    x = torch.randint(0, ckpt.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x, width="mnm1").logits, model(x, width=[32, 64, 128]).logits)


def test_checkpoint_without_profiles_writes_no_mixnmatch_file(checkpoint_dir):
    assert not (checkpoint_dir / MIXNMATCH_FILE).exists()
    assert load_config(checkpoint_dir).profiles == {}


def test_tampered_profiles_are_refused(model, tokenizer, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", with_profiles(model, PROFILES), tokenizer, {"recipe": "test"})
    (path / MIXNMATCH_FILE).write_text(json.dumps({"format": "matta-mixnmatch/1", "profiles": {"mnm1": [1, 1, 2]}}))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(path)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    del manifest["files"][MIXNMATCH_FILE]
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert load_config(path).profiles == {}  # an unlisted file is not trusted, so not read


def test_hf_export_of_a_profile_is_refused(model, tokenizer, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", with_profiles(model, PROFILES), tokenizer, {"recipe": "test"})
    with pytest.raises(ValueError, match="'mnm1' is a per-layer Mix'n'Match profile"):
        export_width(load_checkpoint(path), "mnm1", tmp_path / "x")


def test_heuristic_profiles_are_gentle_and_non_decreasing():
    profiles = heuristic_profiles([32, 64, 128], 3)
    assert len(profiles) == 3 + 2 * 2
    for p in profiles:
        assert list(p) == sorted(p) and len(set(p)) <= 2
    assert len(exhaustive_profiles([32, 64, 128], 3)) == 27


def test_shared_prefix_search_equals_the_plain_forward(model):
    tokens = torch.randint(0, model.config.vocab_size, (64 * 8 + 1,), generator=torch.Generator().manual_seed(0))
    tokens = tokens.numpy().astype("uint16")
    profiles = [(32, 64, 128), (32, 64, 256), (256, 32, 32), (64, 64, 64)]
    fast = profile_perplexities(model, profiles, tokens, window=64, max_windows=8, batch_size=3)
    for p in profiles:
        slow = perplexity(width_logits_fn(model, list(p)), tokens, 64, batch_size=3, max_windows=8)
        assert fast[p] == pytest.approx(slow, rel=1e-5)


def test_pareto_front_and_choice_keep_the_ladder_monotone(config):
    points = {(1,): (1.0, 10.0), (2,): (2.0, 8.0), (3,): (3.0, 9.0), (4,): (4.0, 5.0)}
    assert pareto_front(points) == [(1,), (2,), (4,)]
    uniform = {m: (m,) * 3 for m in config.widths.values()}
    ppl = {uniform[32]: 50.0, uniform[64]: 40.0, uniform[128]: 30.0, uniform[256]: 20.0,
           (32, 64, 128): 35.0,   # between m and l in FLOPs and in ppl: admissible
           (64, 128, 256): 31.0,  # between l and ta in FLOPs but worse than l: would break the ladder
           (32, 32, 64): 45.0}
    chosen = choose_profiles(config, ppl, list(ppl), count=3)
    assert (64, 128, 256) not in chosen
    assert set(chosen) == {(32, 64, 128), (32, 32, 64)}


@pytest.fixture(scope="module")
def mixnmatch_checkpoint(tmp_path_factory, tokenizer):
    from tests.helpers import sharpen

    torch.manual_seed(0)
    model = NestedGPT(tiny_config(n_ctx=SERVED_N_CTX, profiles=PROFILES)).eval()
    sharpen(model)
    evaluation = {"split": "test", "widths": {w: {"ppl": 50.0 - i, "cloze_acc": 0.01 * (i + 1)}
                                             for i, w in enumerate(model.config.served_widths)}}
    path = save_checkpoint(tmp_path_factory.mktemp("mnm") / "ckpt", model, tokenizer,
                           {"recipe": "test", "eval": evaluation})
    return model, path


def test_a_pinned_mixnmatch_id_is_listed_and_served_over_http(mixnmatch_checkpoint, tokenizer):
    from benchmarks.harness import ServerThread
    from serving.app import build_app
    from serving.settings import ServeSettings

    model, path = mixnmatch_checkpoint
    app = build_app(ServeSettings(checkpoint=path, max_batch=8, max_queue=16, device="cpu"))
    with ServerThread(app) as server:
        ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
        assert ids == ["tiny", *(f"tiny:{w}" for w in ["s", "m", "mnm1", "l", "mnm2", "ta"])]
        prompt = "To be, or not to be"
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny:mnm1", "prompt": prompt,
                                                              "max_tokens": 8, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.headers["x-matta-width"] == "mnm1"
        expected = model.generate_greedy(tokenizer.encode(prompt), 8, width="mnm1")
        text = tokenizer.decode([t for t in expected if t != tokenizer.eos_id])
        assert r.json()["choices"][0]["text"] == text
        assert text != tokenizer.decode(model.generate_greedy(tokenizer.encode(prompt), 8, width="ta"))
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny:mnm9", "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 404 and "mnm9" in r.json()["error"]["message"]


def test_slo_policy_and_profile_get_the_profiles_as_operating_points(mixnmatch_checkpoint):
    from serving.app import build_app
    from serving.settings import ServeSettings
    from serving.worker.profile import profile_model

    model, path = mixnmatch_checkpoint
    latency = profile_model(model, batches=(1, 4), contexts=(8, 32), prefill=((1, 8), (2, 16)), repeats=1)
    assert set(latency.costs) == set(model.config.served_widths)
    # Mixed-width steps measured against their sum-of-parts prediction (uniform widths only).
    mixed = latency.meta["relative_error"]["mixed_steps"]
    assert latency.mixed_factor == mixed["factor"] > 0 and mixed["fit_median"] >= 0
    profile_path = latency.save(path.parent / "latency.json")
    app = build_app(ServeSettings(checkpoint=path, policy="slo", profile=profile_path, device="cpu"))
    policy = app.state.frontend.policy
    assert policy.widths == ["s", "m", "mnm1", "l", "mnm2", "ta"]
    assert app.state.frontend.quality["mnm1"] == pytest.approx(0.03)


def test_add_profiles_searches_writes_and_evaluates(tmp_path, corpus_dir):
    from training.data import TokenData
    from training.mixnmatch import add_profiles

    tokenizer = TokenData(corpus_dir).tokenizer()
    torch.manual_seed(0)
    model = NestedGPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_ctx=64, d_model=64, n_layer=2, n_head=1,
                                  widths={"s": 32, "m": 64, "ta": 128}, name="tiny-mnm"))
    source = save_checkpoint(tmp_path / "src", model, tokenizer, {"recipe": "test"})
    out, training = add_profiles(source, corpus_dir, tmp_path / "out", count=2, search_tokens=1024, cloze_items=5)
    result = training["mixnmatch"]
    assert result["exhaustive"] and result["space"] == 9 and len(result["points"]) == 9
    assert {"winner", "max_ppl_gap"} <= set(result["comparison"])
    assert all(p["decode_step_ms"] > 0 for p in result["points"] if p["uniform"])
    ckpt = load_checkpoint(out)
    assert set(ckpt.config.profiles) == set(result["chosen"])
    front = result["fronts"]["exhaustive"]
    for name, profile in ckpt.config.profiles.items():
        assert profile in front and ckpt.training["eval"]["widths"][name]["ffn"] == profile
    assert load_config(source).profiles == {}  # --out leaves the source as it was
