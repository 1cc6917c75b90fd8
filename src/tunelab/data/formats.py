"""Read a data file and turn each row into one canonical example, validating as it goes.

Canonical examples are either chat (`{"messages": [{role, content}, ...]}`) or plain text
(`{"segments": [{"text", "train"}]}` for prompt_completion and continued pretraining). Every
malformed row stops the run with one message naming the file and line, before any training.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from tunelab.errors import TunelabError

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def read_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(location, row) for each row of a .json/.jsonl/.parquet/.csv file; location is `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_array_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise TunelabError(f"{path}: unsupported data file type '{suffix}' (use one of {', '.join(SUFFIXES)})")


def detect_format(row: dict, where: str) -> str:
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise TunelabError(f"{where}: cannot tell the data format from the keys {sorted(keys)}; set data.format to one of {', '.join(FORMATS)}")


def load_examples(path: str | Path, data_format: str = "auto") -> tuple[str, list[dict]]:
    """The detected format and the canonical examples of a file."""
    examples, fmt = [], None if data_format == "auto" else data_format
    for where, row in read_rows(path):
        if not isinstance(row, dict):
            raise TunelabError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        fmt = fmt or detect_format(row, where)
        examples.append(CONVERTERS[fmt](row, where))
    if not examples:
        raise TunelabError(f"{path}: the data set is empty")
    return fmt, examples


# --- per-format conversion to canonical examples ---------------------------------------------------


def _text_field(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise TunelabError(f"{where}: missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise TunelabError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _checked_messages(messages: list[dict], where: str) -> dict:
    if not any(m["role"] == "assistant" for m in messages):
        raise TunelabError(f"{where}: the conversation has no assistant turn to learn from")
    return {"messages": messages}


def _from_alpaca(row: dict, where: str) -> dict:
    instruction = _text_field(row, "instruction", where)
    extra_input = _text_field(row, "input", where, required=False)
    prompt = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    if not prompt.strip():
        raise TunelabError(f"{where}: field 'instruction' is empty")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text_field(row, "output", where)}]
    system = _text_field(row, "system", where, required=False)
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


def _turns(row: dict, key: str, role_key: str, text_key: str, roles: dict, where: str) -> dict:
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise TunelabError(f"{where}: field '{key}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise TunelabError(f"{where}: {key}[{i}] must be an object with '{role_key}' and '{text_key}'")
        role = roles.get(turn[role_key])
        if role is None:
            raise TunelabError(f"{where}: {key}[{i}] has unknown role '{turn[role_key]}' (expected one of {', '.join(roles)})")
        if not isinstance(turn[text_key], str):
            raise TunelabError(f"{where}: {key}[{i}].{text_key} must be a string")
        messages.append({"role": role, "content": turn[text_key]})
    return _checked_messages(messages, where)


def _from_messages(row: dict, where: str) -> dict:
    return _turns(row, "messages", "role", "content", {r: r for r in ROLES}, where)


def _from_sharegpt(row: dict, where: str) -> dict:
    return _turns(row, "conversations", "from", "value", SHAREGPT_ROLES, where)


def _from_prompt_completion(row: dict, where: str) -> dict:
    prompt, completion = _text_field(row, "prompt", where), _text_field(row, "completion", where)
    if not completion:
        raise TunelabError(f"{where}: field 'completion' is empty")
    return {"segments": [{"text": prompt, "train": False}, {"text": completion, "train": True}]}


def _from_text(row: dict, where: str) -> dict:
    text = _text_field(row, "text", where)
    if not text.strip():
        raise TunelabError(f"{where}: field 'text' is empty")
    return {"segments": [{"text": text, "train": True}]}


CONVERTERS = {
    "alpaca": _from_alpaca,
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "prompt_completion": _from_prompt_completion,
    "text": _from_text,
}


# --- file readers ----------------------------------------------------------------------------------


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise TunelabError(f"{path}:{number}: bad JSON: {err.msg} (column {err.colno})") from None


def _json_array_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a JSON array file, each located by the line its object starts on."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return  # an empty file: no rows (reported as an empty data set)
    decoder = json.JSONDecoder()

    def fail(err: json.JSONDecodeError):
        return TunelabError(f"{path}:{err.lineno}: bad JSON: {err.msg} (column {err.colno})")

    index = _skip_space(text, 0)
    if index >= len(text) or text[index] != "[":
        try:  # a single object, or invalid JSON: let the decoder say where
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise fail(err) from None
        raise TunelabError(f"{path}: expected a JSON array of rows (or use .jsonl), got {type(value).__name__}")
    index = _skip_space(text, index + 1)
    while index < len(text) and text[index] != "]":
        try:
            row, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as err:
            raise fail(err) from None
        yield f"{path}:{text.count(chr(10), 0, index) + 1}", row
        index = _skip_space(text, end)
        if index < len(text) and text[index] == ",":
            index = _skip_space(text, index + 1)
        elif index < len(text) and text[index] != "]":
            line = text.count(chr(10), 0, index) + 1
            raise TunelabError(f"{path}:{line}: bad JSON: expected ',' or ']' between rows")
    if index >= len(text):
        raise TunelabError(f"{path}:{text.count(chr(10)) + 1}: bad JSON: the array is not closed")


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a CSV file with a header line, each located by the line its record starts on.

    Cells stay the text they are (no type guessing: a completion `42` or `NA` is that string); an
    empty cell is a missing field.
    """
    csv.field_size_limit(2**31 - 1)  # a long text cell is data, not an error (the default is 128 KiB)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            start = reader.line_num + 1
            for cells in reader:
                if cells:  # the reader gives blank lines as []
                    if len(cells) != len(header):
                        raise TunelabError(f"{path}:{start}: {len(cells)} cells, but the header has {len(header)}")
                    yield f"{path}:{start}", {key: cell or None for key, cell in zip(header, cells)}
                start = reader.line_num + 1
        except csv.Error as err:
            raise TunelabError(f"{path}:{reader.line_num}: bad CSV: {err}") from None
        except UnicodeDecodeError as err:
            raise TunelabError(f"{path}: cannot read csv file: it is not UTF-8 text ({err.reason})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    from datasets import Dataset

    try:
        table = Dataset.from_parquet(str(path))
    except Exception as err:  # noqa: BLE001  (any parse failure is a bad input file)
        raise TunelabError(f"{path}: cannot read parquet file: {err}") from None
    for i, row in enumerate(table):
        yield f"{path}: row {i + 1}", row
