"""The one way raymoe reads a YAML file: UTF-8 decoded with a clear error, duplicate keys refused, `base:` chains
followed with cycle detection. Every problem is a ConfigError naming the field and the file (docs/reliability.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from raymoe.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping holding the same key twice (PyYAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                    key_node.start_mark) from None
        if key in seen:
            raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int, line: int):
        self.key, self.first_line, self.line = key, first_line, line


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str, field_path: str, source: str) -> Any:
    """YAML text -> Python value; ConfigError(field_path, source, ...) for invalid YAML or a duplicated key."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise ConfigError(field_path, source, f"the key {dup.key!r} appears twice in one mapping (lines "
                                              f"{dup.first_line} and {dup.line}); keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(field_path, source, f"not valid YAML: {exc}".replace("\n", " ")) from None
    except RecursionError:
        raise ConfigError(field_path, source, "nested too deeply to read") from None


def read_text(path: str | os.PathLike, field_path: str) -> str:
    """A config file's text; ConfigError when it is missing, not a file, unreadable or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field_path, str(path), "file not found" if not path.exists() else "not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(field_path, str(path), f"cannot read it: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(field_path, str(path), f"not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})"
                                                 "; save the file as UTF-8") from None


def read_mapping(path: str | os.PathLike, field_path: str) -> tuple[dict[str, Any], str]:
    """(the file's top-level mapping, its text); ConfigError unless it holds a mapping (an empty file is {})."""
    text = read_text(path, field_path)
    raw = parse_yaml(text, field_path, str(path))
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(field_path, str(path), f"must hold a mapping, got {type(raw).__name__}")
    return raw, text


def read_with_bases(path: str | os.PathLike, field_path: str, merge) -> dict[str, Any]:
    """Read a mapping and follow its `base: other.yaml` chain (relative to each file), merging with `merge(base,
    child)`; a chain that comes back to a file already in it is a ConfigError naming the cycle."""
    chain: list[Path] = []
    current, where = Path(path), field_path
    layers = []
    while True:
        resolved = current.resolve() if current.exists() else current.absolute()
        if resolved in chain:
            names = " -> ".join(p.name for p in chain[chain.index(resolved):] + [resolved])
            raise ConfigError("base", str(current), f"the base chain loops ({names}); remove one base:")
        chain.append(resolved)
        raw, _ = read_mapping(current, where)
        base = raw.pop("base", None)
        layers.append(raw)
        if base is None:
            break
        if not isinstance(base, str) or not base.strip():
            raise ConfigError("base", base, "must be a path to another YAML file")
        current, where = current.parent / base, "base"
    merged = layers[-1]
    for layer in reversed(layers[:-1]):
        merged = merge(merged, layer)
    return merged
