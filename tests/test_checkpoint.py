"""Checkpoint format: round trip, and refusal of every kind of tampering with a clear error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from matta.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file, verify_checkpoint

FILES = ["config.json", "model.safetensors", "tokenizer.json", "training.json"]


def test_round_trip_preserves_weights_config_tokenizer_and_training(checkpoint_dir, model, tokenizer):
    ckpt = load_checkpoint(checkpoint_dir)
    assert ckpt.config == model.config
    assert ckpt.training == {"recipe": "test"}
    assert ckpt.tokenizer.encode("To be, or not") == tokenizer.encode("To be, or not")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ckpt.model.state_dict()[name], tensor, atol=0, rtol=0)
    manifest = json.loads((checkpoint_dir / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(FILES)
    assert not ckpt.model.training


def test_saving_over_an_existing_checkpoint_replaces_it(checkpoint_dir, model, tokenizer):
    save_checkpoint(checkpoint_dir, model, tokenizer, {"recipe": "second"})
    assert load_checkpoint(checkpoint_dir).training == {"recipe": "second"}
    assert not list(checkpoint_dir.parent.glob(".ckpt*"))  # no staging leftovers


@pytest.mark.parametrize("name", FILES)
def test_one_flipped_byte_in_any_file_is_refused(checkpoint_dir, name):
    path = checkpoint_dir / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name}: sha256 mismatch"):
        load_checkpoint(checkpoint_dir)


@pytest.mark.parametrize("name", [*FILES, "manifest.json"])
def test_a_missing_file_is_refused(checkpoint_dir, name):
    (checkpoint_dir / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name}: missing"):
        load_checkpoint(checkpoint_dir)


def _rewrite_weights(checkpoint_dir, edit):
    """Edit the tensors and re-sign the manifest, as a careful attacker (or a buggy tool) would."""
    path = checkpoint_dir / "model.safetensors"
    tensors = edit(load_file(str(path)))
    save_file(tensors, str(path))
    manifest_path = checkpoint_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.safetensors"] = sha256_file(path)
    manifest_path.write_text(json.dumps(manifest))


def test_a_renamed_tensor_is_refused_by_name(checkpoint_dir):
    def rename(t):
        t["h.0.mlp.fc_weight_renamed"] = t.pop("h.0.mlp.fc_weight")
        return t

    _rewrite_weights(checkpoint_dir, rename)
    with pytest.raises(CheckpointError, match="missing tensor 'h.0.mlp.fc_weight'"):
        load_checkpoint(checkpoint_dir)


def test_an_extra_tensor_is_refused_by_name(checkpoint_dir):
    _rewrite_weights(checkpoint_dir, lambda t: {**t, "lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'lm_head.weight'"):
        load_checkpoint(checkpoint_dir)


def test_a_wrong_shape_is_refused_by_name(checkpoint_dir):
    _rewrite_weights(checkpoint_dir, lambda t: {**t, "h.1.mlp.proj_weight": t["h.1.mlp.proj_weight"][:-1].clone()})
    with pytest.raises(CheckpointError, match=r"tensor 'h.1.mlp.proj_weight' has shape \(255, 64\), expected \(256, 64\)"):
        load_checkpoint(checkpoint_dir)


def test_a_pickle_in_place_of_safetensors_is_never_unpickled(checkpoint_dir, tmp_path):
    """A torch.save file with a payload whose unpickling would create a marker file."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    weights = checkpoint_dir / "model.safetensors"
    torch.save({"x": Payload()}, weights)
    manifest_path = checkpoint_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.safetensors"] = sha256_file(weights)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors"):
        load_checkpoint(checkpoint_dir)
    assert not marker.exists()


def test_malformed_manifest_and_config_errors(checkpoint_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        verify_checkpoint(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint_dir, bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed manifest"):
        load_checkpoint(bad)
    shutil.rmtree(bad)
    shutil.copytree(checkpoint_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["widths"] = {"s": 300, "ta": 256}
    (bad / "config.json").write_text(json.dumps(config))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["config.json"] = sha256_file(bad / "config.json")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="config.json: widths must be strictly ascending"):
        load_checkpoint(bad)
