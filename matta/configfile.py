"""Config files for every matta tool: read YAML, validate with pydantic, errors that name the field.

Torch-free, so the router and the A/B layer use it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


# Bounds on what one config document may parse into, checked while composing it (before any
# object is built or validated): nesting depth (PyYAML composes recursively, so 20,000 levels were
# a RecursionError) and nodes counted as expanded (aliases repeat a node without copying it, so a
# 55 KB "billion laughs" document validated into a 100 MB error message).
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 10_000
MAX_ERROR_CHARS = 2000  # a config error message (the first problems) is cut here


class ConfigTooLargeError(yaml.YAMLError):
    """A YAML/JSON document over the depth or node bound."""


def _bounded_loader(max_depth: int, max_nodes: int) -> type[yaml.SafeLoader]:
    class BoundedLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses documents nested deeper than ``max_depth`` or expanding to
        more than ``max_nodes`` nodes (an alias counts as the whole subtree it repeats)."""

        _depth = 0

        def compose_node(self, parent, index):
            self._depth += 1
            if self._depth > max_depth:
                raise ConfigTooLargeError(f"nested deeper than {max_depth} levels")
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def compose_document(self):
            node = super().compose_document()
            size = _expanded_size(node, {}, max_nodes)
            if size > max_nodes:
                raise ConfigTooLargeError(f"more than {max_nodes} values once aliases are expanded "
                                          "(or an alias inside what it names)")
            return node

    return BoundedLoader


def _expanded_size(node: yaml.Node, sizes: dict[int, int], limit: int) -> int:
    """Nodes in ``node``'s tree with every alias expanded, stopping soon after ``limit``; memoised by
    node identity, so a document of shared subtrees costs its distinct nodes, not its expansion.
    Composing bounded the depth and a cycle counts as over the limit, so the recursion is shallow."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = limit + 1  # until done: a node that contains itself (`&a [*a]`) is endless
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, limit)
        if total > limit:
            break
    sizes[id(node)] = total
    return total


def load_yaml(text: str, max_depth: int = MAX_CONFIG_DEPTH, max_nodes: int = MAX_CONFIG_NODES) -> object:
    """``yaml.safe_load`` (JSON is YAML too) within bounds on depth and expanded size;
    ``yaml.YAMLError`` (:class:`ConfigTooLargeError` for the bounds) for a document it refuses."""
    return yaml.load(text, Loader=_bounded_loader(max_depth, max_nodes))


def read_yaml(path: str | Path, what: str = "config file") -> object:
    """The parsed YAML of ``path``; ValueError for a missing file, invalid YAML, or one over the bounds."""
    path = Path(path)
    try:
        return load_yaml(path.read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: no such {what}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(shorten(f"{path}: invalid YAML ({exc})")) from exc


def shorten(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` cut to about ``limit`` characters, saying how much was left out."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message) - limit} more characters)"


def validate(model: type[Model], data: object, source: str) -> Model:
    """``model.model_validate(data)``; a ValidationError becomes one ValueError naming every bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(shorten(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: "
                                     f"{e['msg'].removeprefix('Value error, ')}", 200) for e in exc.errors())
        raise ValueError(shorten(f"{source}: {problems}")) from exc
