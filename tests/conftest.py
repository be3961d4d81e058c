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
from tests.helpers import REPO, SAMPLE_TEXT, SERVED_N_CTX, sharpen, tiny_config

# Servers the tests start decode eagerly unless a test asks for compiled steps (serving/worker/compiled.py):
# a background compile worker per test server would take the CI machine's cores.
os.environ.setdefault("MATTA_COMPILE", "off")


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([SAMPLE_TEXT] * 4, vocab_size=320)


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
    torch.manual_seed(0)
    model = NestedGPT(tiny_config(n_ctx=SERVED_N_CTX)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    sharpen(model)
    return model, save_checkpoint(tmp_path_factory.mktemp("served") / "ckpt", model, tokenizer, {"recipe": "test"})
