"""Read a YAML config (a run's, or any pydantic schema's: eval tasks, sweeps), apply `key.sub=value`
overrides, validate, and report errors by key and line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError, shown
from tunelab.files import read_text, write_text_atomic

Schema = TypeVar("Schema", bound=BaseModel)


def load_config(source: str | os.PathLike | dict, overrides: Iterable[str] | dict | None = None, schema: type[Schema] = RunConfig) -> Schema:
    """A validated `schema` (a RunConfig unless told) from a YAML file (or a dict), with overrides on top.

    `overrides` is either `["train.lr=1e-4", ...]` (values parsed as YAML) or a nested dict.
    """
    if isinstance(source, dict):
        raw, where, lines = _deep_copy(source), "config", {}
    else:
        raw, lines = _read_mapping(Path(source), schema)
        where = str(source)
    overridden: dict[str, str] = {}
    for key, value, given in _override_items(overrides):
        _set_path(raw, key, value)
        overridden[key] = given
    return parse_config(raw, where, lines, overridden, schema)


def parse_config(raw: dict, where: str = "config", lines: dict | None = None, overridden: dict[str, str] | None = None, schema: type[Schema] = RunConfig) -> Schema:
    """`raw` validated as `schema`; errors name `where` and the line (from `lines`: dotted key ->
    line) or, for a key in `overridden` (dotted key -> the override as given), the override."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise TunelabError(_format_errors(err, raw, where, lines or {}, overridden or {})) from None


def dump_config(config: RunConfig, path: str | os.PathLike) -> None:
    write_text_atomic(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (which builds no Python objects from tags) whose failures to build a value
    (`!!int abc`, the date 2024-13-45) are YAML errors at the value's line, like its other errors."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, LookupError, AttributeError, ArithmeticError) as err:
            what = f"{node.value!r} is not a valid {node.tag.rpartition(':')[2]}: " if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(None, None, f"{what}{err}", node.start_mark) from None


def _read_mapping(path: Path, schema: type[BaseModel]) -> tuple[dict, dict[str, int]]:
    """The mapping of a YAML config file, and the line of each dotted key in it."""
    text = read_text(path, "config file")
    try:
        raw = yaml.load(text, Loader=_SafeLoader)
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as err:
        raise TunelabError(f"{path}{_yaml_error_line(err, text)}: invalid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise TunelabError(f"{path}: invalid YAML: nested too deeply") from None
    keys = f"a YAML mapping of keys ({', '.join(list(schema.model_fields)[:3])}, ...)"
    if raw is None:
        raise TunelabError(f"{path}: the file is empty; a config is {keys}")
    if not isinstance(raw, dict):
        raise TunelabError(f"{path}: a config must be {keys}, not a {type(raw).__name__}")
    return raw, lines


def _yaml_error_line(err: yaml.YAMLError, text: str) -> str:
    """`:N`, the line of a YAML error, where it has one."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is not None:
        return f":{mark.line + 1}"
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow
        return f":{text[: err.position].count(chr(10)) + 1}"
    return ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    return " ".join(problem.split())


def _format_errors(err: ValidationError, raw: dict, where: str, lines: dict, overridden: dict[str, str]) -> str:
    """One line per bad key (a key failing every member of a union is one line): the file and line,
    or the override, then the key and what is wrong. A single problem is one line in all."""
    problems: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for e in err.errors():
        key = _dotted_key(e["loc"], raw, e["type"])
        message = "unknown key" if e["type"] == "extra_forbidden" else " ".join(e["msg"].removeprefix("Value error, ").split())
        if message not in problems.setdefault(key, []):
            problems[key].append(message)
        if e["type"] != "missing" and not isinstance(e["input"], dict):
            inputs.setdefault(key, e["input"])
    messages = []
    for key, found in problems.items():
        override = _override_of(key, overridden)
        if override is not None:
            origin = f"command-line override {override}"
        else:
            line = _nearest_line(lines, key)
            origin = f"{where}:{line}" if line else where
        problem = "; or ".join(found)
        got = f" (got {shown(inputs[key])})" if key in inputs and shown(inputs[key]) not in problem else ""
        messages.append(f"{origin}: `{key or '(top level)'}`: {problem}{got}")
    if len(messages) == 1:
        return f"invalid config: {messages[0]}"
    return "invalid config:\n  " + "\n  ".join(messages)


def _dotted_key(loc: tuple, raw: Any, error_type: str) -> str:
    """The config key an error is about. Only the parts of pydantic's location that are keys (or list
    indices) of the config count: the others name a union's member or a validator."""
    parts, node = [], raw
    for number, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (number == len(loc) - 1 and error_type == "missing" and isinstance(node, dict)):
            continue
        parts.append(str(part))
    return ".".join(parts)


def _override_of(key: str, overridden: dict[str, str]) -> str | None:
    """The override (as given) that set `key` or a section holding it, if one did."""
    setting = [k for k in overridden if key == k or key.startswith(f"{k}.")]
    return overridden[max(setting, key=len)] if setting else None


def _nearest_line(lines: dict, key: str) -> int | None:
    parts = key.split(".")
    while parts:  # a missing key has no line: point at its parent
        if ".".join(parts) in lines:
            return lines[".".join(parts)]
        parts.pop()
    return None


MERGE_TAG = "tag:yaml.org,2002:merge"


# Key paths _key_lines records at most: a text of nested aliases (a "billion laughs") names
# exponentially many paths; past this many, deeper keys point at their parent's line instead.
KEY_LINES_LIMIT = 100_000


def _key_lines(node: yaml.Node | None, prefix: str = "", budget: list[int] | None = None) -> dict[str, int]:
    """Map dotted key paths (a list item's by its index: `grid.0.method`) to their 1-based line in
    the YAML text. The keys a `<<: *anchor` merges in count as the mapping's own, unless it sets
    them; so do the keys reached through an alias (their line is the anchor's)."""
    budget = [KEY_LINES_LIMIT] if budget is None else budget
    found: dict[str, int] = {}
    merged: dict[str, int] = {}
    children: list[tuple[str, yaml.Node, int]] = []
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                for source in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                    merged.update(_key_lines(source, prefix, budget))
                continue
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            children.append((path, value_node, key_node.start_mark.line + 1))
    elif isinstance(node, yaml.SequenceNode):
        children = [(f"{prefix}.{index}" if prefix else str(index), item, item.start_mark.line + 1) for index, item in enumerate(node.value)]
    for path, child, line in children:
        if budget[0] <= 0:
            break
        budget[0] -= 1
        found[path] = line
        found.update(_key_lines(child, path, budget))
    return {**merged, **found}


def _override_items(overrides) -> list[tuple[str, Any, str]]:
    """(dotted key, value, the override as given) of each override."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return [(key, value, f"{key}={value!r}") for key, value in flatten_keys(overrides).items()]
    items = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise TunelabError(f"override '{item}' must look like key.sub=value")
        try:
            value = yaml.load(text, Loader=_SafeLoader) if text.strip() else ""
        except (yaml.YAMLError, RecursionError):  # not YAML: the text itself
            value = text
        items.append((key.strip(), value, item))
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
