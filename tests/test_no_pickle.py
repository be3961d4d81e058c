"""No pickle is ever loaded: every loader works with unpickling made impossible, the code has no
unpickling call, and exports and checkpoints contain no pickle file."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from matta.checkpoint import load_checkpoint
from matta.hf import export_width, import_hf, load_hf_gpt2
from router.latency import LatencyModel, WidthCost
from training.data import TokenData
from training.state import load_state, save_state

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("matta", "training", "serving", "router", "cli", "deploy", "benchmarks")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    # (pickle.Unpickler stays: libraries subclass it at import time; the static test covers its use.)
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    real_np_load = np.load

    def np_load_without_pickle(*args, **kwargs):
        assert kwargs.get("allow_pickle", False) is False, "np.load with allow_pickle=True"
        return real_np_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", np_load_without_pickle)


def test_every_loader_works_with_unpickling_impossible(no_unpickling, checkpoint_dir, corpus_dir, tmp_path):
    ckpt = load_checkpoint(checkpoint_dir)
    exported = export_width(ckpt, ckpt.config.width_names[0], tmp_path / "export")
    load_hf_gpt2(exported)
    import_hf(exported, tmp_path / "imported")
    load_checkpoint(tmp_path / "imported")
    state_dir = tmp_path / "state"
    save_state(state_dir, {"step": 3, "model": ckpt.model.state_dict(), "rng": torch.get_rng_state()})
    assert load_state(state_dir)["step"] == 3
    data = TokenData(corpus_dir)
    assert len(data.tokens("val")) > 0 and data.cloze("val")
    LatencyModel.load(LatencyModel({"s": WidthCost(0.001, 0.0, 0.0, 0.001, 0.0)}).save(tmp_path / "profile.json"))


def test_exports_and_checkpoints_hold_no_pickle_file(checkpoint_dir, tmp_path):
    ckpt = load_checkpoint(checkpoint_dir)
    exported = export_width(ckpt, ckpt.config.width_names[-1], tmp_path / "export")
    for directory in (checkpoint_dir, exported, REPO / "checkpoints" / "default"):
        files = [p for p in directory.rglob("*") if p.is_file()]
        assert files
        for path in files:
            assert path.suffix not in PICKLE_SUFFIXES, path
            assert not path.read_bytes()[:2] == b"\x80\x04" and not path.read_bytes().startswith(b"PK"), path


def test_no_code_path_calls_an_unpickler():
    """A static check over our packages: no pickle loads, torch.load only with weights_only=True."""
    offenders = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"\bpickle\.(load|loads|Unpickler)\b|\bcloudpickle\.load", code):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
                if "torch.load(" in code and "weights_only=True" not in code:
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
                if "allow_pickle=True" in code:
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
