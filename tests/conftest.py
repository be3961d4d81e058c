"""Shared fixtures: tiny models, a tokenizer trained on text the tests make, the real corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from matta.checkpoint import save_checkpoint
from matta.config import ModelConfig
from matta.model import NestedGPT
from matta.tokenizer import Tokenizer

SERVED_N_CTX = 512  # long enough that a generation outlives a cancel or a burst of requests

REPO = Path(__file__).resolve().parents[1]

SAMPLE_TEXT = """
Now is the winter of our discontent made glorious summer by this sun of York;
and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.
"""


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([SAMPLE_TEXT] * 4, vocab_size=320)


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=320, n_ctx=64, d_model=64, n_layer=3, n_head=2,
                  widths={"s": 32, "m": 64, "l": 128, "ta": 256}, name="tiny")
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def config() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def model(config) -> NestedGPT:
    torch.manual_seed(0)
    m = NestedGPT(config).eval()
    # Non-zero biases and LayerNorm affine parameters, so parity tests exercise every tensor.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture
def checkpoint_dir(tmp_path, model, tokenizer) -> Path:
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer, {"recipe": "test"})


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """The real prepared corpus: data/shakespeare if `matta data prepare` ran, else prepared now."""
    prepared = REPO / "data" / "shakespeare"
    if (prepared / "data.json").is_file():
        return prepared
    from training.data import prepare_data

    out = tmp_path_factory.mktemp("shakespeare")
    cache = Path(os.environ.get("MATTA_DATA_CACHE", out / "raw"))
    prepare_data(out, cache_dir=cache, n_cloze=500)
    return out


@pytest.fixture(scope="module")
def checkpoint_512(tmp_path_factory, tokenizer):
    """A served-size tiny model (n_ctx 512, sharpened so greedy text is not one repeated token) and its checkpoint."""
    from tests.test_serving_engine import sharpen

    torch.manual_seed(0)
    model = NestedGPT(tiny_config(n_ctx=SERVED_N_CTX)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    sharpen(model)
    return model, save_checkpoint(tmp_path_factory.mktemp("served") / "ckpt", model, tokenizer, {"recipe": "test"})
