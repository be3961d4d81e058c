"""Resume state without pickle: tensors go to safetensors, everything else to JSON."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from matta.checkpoint import replace_dir

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def flatten(tree: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor in a nested dict/list structure by a reference into ``tensors``."""
    if isinstance(tree, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = tree.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(tree, dict):
        if not all(isinstance(k, (str, int)) for k in tree):
            raise TypeError(f"cannot store dict keys {list(tree)!r} at {prefix}")
        return {"__dict__": [[k, flatten(v, tensors, f"{prefix}.{k}")] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {"__list__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store {type(tree).__name__} at {prefix}")


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {k: unflatten(v, tensors) for k, v in tree["__dict__"]}
        if "__list__" in tree:
            return [unflatten(v, tensors) for v in tree["__list__"]]
    return tree


def save_state(path: Path, state: dict) -> None:
    """Write ``state`` (nested dicts/lists of tensors and JSON scalars) atomically to a directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        tree = flatten(state, tensors)
        save_file(tensors, str(staging / STATE_TENSORS))
        (staging / STATE_JSON).write_text(json.dumps(tree))
        for name in (STATE_TENSORS, STATE_JSON):
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_state(path: Path) -> dict:
    tensors = load_file(str(path / STATE_TENSORS))
    return unflatten(json.loads((path / STATE_JSON).read_text()), tensors)
