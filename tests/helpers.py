"""Helpers the test modules share (fixtures live in conftest.py; servers and load clients, which the
benchmarks share too, in benchmarks/harness.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch
import yaml

from matta.config import ModelConfig

SERVED_N_CTX = 512  # long enough that a generation outlives a cancel or a burst of requests


REPO = Path(__file__).resolve().parents[1]


SAMPLE_TEXT = """
Now is the winter of our discontent made glorious summer by this sun of York;
and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.
"""


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=320, n_ctx=64, d_model=64, n_layer=3, n_head=2,
                  widths={"s": 32, "m": 64, "l": 128, "ta": 256}, name="tiny")
    values.update(overrides)
    return ModelConfig(**values)


def sharpen(model):
    """Scale a random model's weights up so its greedy text varies with the context and the width.

    At GPT-2 init a tiny random model repeats one token forever, which would make "batched
    equals alone" checks vacuous.
    """
    with torch.no_grad():
        model.wte.weight.mul_(3)
        model.wpe.weight.mul_(3)
        for block in model.h:
            for weight in (block.attn.c_attn.weight, block.attn.c_proj.weight, block.mlp.fc_weight,
                           block.mlp.proj_weight):
                weight.mul_(8)
    return model


WIDTHS = ["s", "m", "l", "ta"]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


CONFIG = {
    "name": "width-test", "salt": "2026-11", "unit": "user",
    "arms": [{"name": "control", "weight": 50, "policy": {"kind": "fixed", "width": "ta"}},
             {"name": "treatment", "weight": 50, "policy": {"kind": "fixed", "width": "s"}}],
}


def write_config(path, config=CONFIG):
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def rows(db, table="exposures"):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
    finally:
        conn.close()
