"""The checkpoint directory: config.json, model.safetensors, tokenizer.json, training.json, manifest.json.

A chat template (jinja, as HF's ``apply_chat_template`` reads it), when the model has one, is the
optional file chat_template.jinja, listed in the manifest like mixnmatch.json.

Named Mix'n'Match profiles (``ModelConfig.profiles``), when there are any, go to a sixth file,
mixnmatch.json, listed in the manifest, not into config.json: readers that predate profiles
refuse unknown config.json keys but verify and then ignore extra manifest files, so they keep
loading such a checkpoint and serve its uniform widths.

Weights are safetensors only; nothing here can execute code from a file. Loading checks the
manifest (sha256 of every file) before it parses anything, then checks every tensor's name
and shape, and refuses the first problem with a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from matta.config import DTYPE_CHOICES, ModelConfig
from matta.llama import build_model
from matta.model import NestedDecoder
from matta.tokenizer import Tokenizer

FORMAT = "matta-checkpoint/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TRAINING_FILE = "training.json"
MANIFEST_FILE = "manifest.json"
MIXNMATCH_FILE = "mixnmatch.json"
MIXNMATCH_FORMAT = "matta-mixnmatch/1"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # optional: the tokenizer's chat template (HF's file name)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The dtypes a model can be loaded and served in (weights and KV cache; checkpoints store float32)."""
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TRAINING_FILE)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be trusted or used; the message names the culprit."""


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    model: NestedDecoder | None  # None when loaded without weights
    tokenizer: Tokenizer
    training: dict
    chat_template: str | None = None

    @property
    def name(self) -> str:
        return self.config.name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | Path, model: NestedDecoder, tokenizer: Tokenizer, training: dict,
                    chat_template: str | None = None) -> Path:
    """Write a complete checkpoint directory atomically (a crash leaves the old one or none);
    ``chat_template`` (jinja) goes to chat_template.jinja."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = model.config.to_dict()
        profiles = config.pop("profiles")
        _write_json(staging / CONFIG_FILE, config)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        tokenizer.save(staging / TOKENIZER_FILE)
        _write_json(staging / TRAINING_FILE, training)
        names = list(REQUIRED_FILES)
        if profiles:
            _write_json(staging / MIXNMATCH_FILE, {"format": MIXNMATCH_FORMAT, "profiles": profiles})
            names.append(MIXNMATCH_FILE)
        if chat_template is not None:
            (staging / CHAT_TEMPLATE_FILE).write_text(chat_template)
            names.append(CHAT_TEMPLATE_FILE)
        files = {name: sha256_file(staging / name) for name in names}
        _write_json(staging / MANIFEST_FILE, {"format": FORMAT, "files": files})
        for name in (*names, MANIFEST_FILE):
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory ``new`` to ``target``; an existing ``target`` is swapped out, then removed.

    Readers see the old directory or the new one, never a half-written mix.
    """
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def verify_checkpoint(path: str | Path) -> dict:
    """Check that every file is present and matches manifest.json; return the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing; refusing an unverifiable checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: malformed manifest ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: unknown format {manifest.get('format')!r}; expected {FORMAT!r}")
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{manifest_path}: does not list {name}")
    for name, expected in files.items():
        file_path = path / name
        if Path(name).name != name:
            raise CheckpointError(f"{manifest_path}: file name {name!r} is not a plain file name")
        if not file_path.is_file():
            raise CheckpointError(f"{file_path}: missing")
        actual = sha256_file(file_path)
        if actual != expected:
            raise CheckpointError(f"{file_path}: sha256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...)")
    return manifest


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_config(path: str | Path) -> ModelConfig:
    """The verified config of a checkpoint, without loading its weights."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    data = _read_json(path / CONFIG_FILE)
    if "profiles" in data:
        raise CheckpointError(f"{path / CONFIG_FILE}: 'profiles' belong in {MIXNMATCH_FILE}, not config.json")
    source = path / CONFIG_FILE
    if MIXNMATCH_FILE in manifest["files"]:
        source = path / MIXNMATCH_FILE
        mixnmatch = _read_json(source)
        if mixnmatch.get("format") != MIXNMATCH_FORMAT:
            raise CheckpointError(f"{source}: unknown format {mixnmatch.get('format')!r}; expected {MIXNMATCH_FORMAT!r}")
        data["profiles"] = mixnmatch.get("profiles")
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", weights: bool = True,
                    dtype: str = "float32") -> Checkpoint:
    """Verify and load a checkpoint directory; the model is returned in eval mode, its weights in
    ``dtype`` (:data:`DTYPES`, or "auto": :func:`resolve_dtype`). With ``weights=False`` only the
    config, tokenizer and training record are read (a server's API process needs no more)."""
    path = Path(path)
    config = load_config(path)
    try:
        # A Llama-family checkpoint names its own end-of-text token; GPT-2 ones use <|endoftext|>.
        tokenizer = Tokenizer.from_file(path / TOKENIZER_FILE, config.eos_token_id if config.is_llama else None)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path / TOKENIZER_FILE}: {tokenizer.vocab_size} tokens do not fit vocab_size {config.vocab_size}"
        )
    if tokenizer.eos_id != config.eos_token_id:
        raise CheckpointError(
            f"{path / TOKENIZER_FILE}: end-of-text id {tokenizer.eos_id} != config eos_token_id {config.eos_token_id}"
        )
    training = _read_json(path / TRAINING_FILE)
    chat_template = None
    if CHAT_TEMPLATE_FILE in _read_json(path / MANIFEST_FILE)["files"]:  # verified by load_config
        try:
            chat_template = (path / CHAT_TEMPLATE_FILE).read_text()
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{path / CHAT_TEMPLATE_FILE}: not UTF-8 text ({exc})") from exc
    if not weights:
        return Checkpoint(path=path, config=config, model=None, tokenizer=tokenizer, training=training,
                          chat_template=chat_template)
    weights_path = path / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors ({exc})") from exc
    model = build_model(config)
    load_state_dict_strict(model, tensors, weights_path)
    model.to(device=device, dtype=DTYPES[resolve_dtype(dtype, device)]).eval()
    return Checkpoint(path=path, config=config, model=model, tokenizer=tokenizer, training=training,
                      chat_template=chat_template)


def resolve_dtype(dtype: str, device: str | torch.device = "cpu") -> str:
    """``dtype`` itself, or for "auto" "bfloat16" where the device computes it natively (a CUDA GPU
    with bf16, a CPU with AVX-512 BF16 or AMX, as oneDNN reports) and "float32" elsewhere."""
    if dtype in DTYPES:
        return dtype
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {list(DTYPE_CHOICES)}")
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def load_state_dict_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy ``tensors`` into ``model``, refusing missing/unexpected names and wrong shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{_more(missing)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}{_more(unexpected)}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {tensor.dtype}, expected a float type")
    model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)


def _more(names: list[str]) -> str:
    return f" (+{len(names) - 1} more)" if len(names) > 1 else ""
