"""Read a YAML config (a run's, or any pydantic schema's: eval tasks, sweeps), apply `key.sub=value`
overrides, validate, and report errors by key and line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError

Schema = TypeVar("Schema", bound=BaseModel)


def load_config(source: str | os.PathLike | dict, overrides: Iterable[str] | dict | None = None, schema: type[Schema] = RunConfig) -> Schema:
    """A validated `schema` (a RunConfig unless told) from a YAML file (or a dict), with overrides on top.

    `overrides` is either `["train.lr=1e-4", ...]` (values parsed as YAML) or a nested dict.
    """
    if isinstance(source, dict):
        raw, where, lines = _deep_copy(source), "config", {}
    else:
        path = Path(source)
        if not path.is_file():
            raise TunelabError(f"config file not found: {path}")
        text = path.read_text()
        try:
            raw = yaml.safe_load(text) or {}
            lines = _key_lines(yaml.compose(text))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise TunelabError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from None
        if not isinstance(raw, dict):
            raise TunelabError(f"{path}: a config must be a YAML mapping of keys ({', '.join(list(schema.model_fields)[:3])}, ...)")
        where = str(path)
    overridden: set[str] = set()
    for key, value in _override_items(overrides):
        _set_path(raw, key, value)
        overridden.add(key)
    return parse_config(raw, where, lines, overridden, schema)


def parse_config(raw: dict, where: str = "config", lines: dict | None = None, overridden=(), schema: type[Schema] = RunConfig) -> Schema:
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise TunelabError(_format_errors(err, where, lines or {}, set(overridden))) from None


def dump_config(config: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _format_errors(err: ValidationError, where: str, lines: dict, overridden: set[str]) -> str:
    messages = []
    for e in err.errors():
        key = ".".join(str(part) for part in e["loc"] if not str(part).startswith("function-"))
        if key in overridden:
            origin = "command-line override"
        else:
            line = _nearest_line(lines, key)
            origin = f"{where}:{line}" if line else where
        got = f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e["input"], dict) else ""
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        messages.append(f"{origin}: `{key or '(top level)'}`: {message}{got}")
    return "invalid config:\n  " + "\n  ".join(messages)


def _nearest_line(lines: dict, key: str) -> int | None:
    parts = key.split(".")
    while parts:  # a missing key has no line: point at its parent
        if ".".join(parts) in lines:
            return lines[".".join(parts)]
        parts.pop()
    return None


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Map dotted key paths to their 1-based line in the YAML text."""
    found: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            found[path] = key_node.start_mark.line + 1
            found.update(_key_lines(value_node, path))
    return found


def _override_items(overrides) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(flatten_keys(overrides).items())
    items = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise TunelabError(f"override '{item}' must look like key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        items.append((key.strip(), value))
    return items


def flatten_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf value} (an empty mapping is a leaf)."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        flat.update(flatten_keys(value, path) if isinstance(value, dict) and value else {path: value})
    return flat


def changed_keys(saved: dict, current: dict, ignored: frozenset[str] = frozenset()) -> list[str]:
    """The dotted keys (sorted) whose leaf values differ between two nested mappings, except `ignored`."""
    saved, current = flatten_keys(saved), flatten_keys(current)
    return sorted(k for k in saved.keys() | current.keys() if k not in ignored and saved.get(k) != current.get(k))


def _set_path(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part in ("model", "method"):
            child = {"name": child}  # `model: alias` shorthand, now given sub-keys
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise TunelabError(f"override '{key}': `{part}` is not a mapping")
        node[part] = child
        node = child
    node[parts[-1]] = value


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}
