"""Config files for every matta tool: read YAML, validate with pydantic, errors that name the field.

Torch-free, so the router and the A/B layer use it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


def read_yaml(path: str | Path, what: str = "config file") -> object:
    """The parsed YAML of ``path``; ValueError for a missing file or invalid YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: no such {what}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from exc


def validate(model: type[Model], data: object, source: str) -> Model:
    """``model.model_validate(data)``; a ValidationError becomes one ValueError naming every bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise ValueError(f"{source}: {problems}") from exc
