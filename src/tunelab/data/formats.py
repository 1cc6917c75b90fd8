"""Read a data file and turn each row into one canonical example, validating as it goes.

Canonical examples are either chat (`{"messages": [{role, content}, ...]}`) or plain text
(`{"segments": [{"text", "train"}]}` for prompt_completion and continued pretraining). Every
malformed row stops the run with one message naming the file and line, before any training.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from tunelab.errors import TunelabError, shown
from tunelab.files import read_bytes, read_text

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
SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv")  # each may be gzipped too (.jsonl.gz)
DELIMITERS = {".csv": ",", ".tsv": "\t"}


def read_rows(path: str | Path, columns: list[str] | None = None, what: str = "data file", empty_cell=None) -> Iterator[tuple[str, dict]]:
    """(location, row) for each row of a data file (see SUFFIXES); location is `file:line` (`file: row N`
    in parquet). Every row is an object: a mapping of field names to values. A table's empty cell
    is `empty_cell`: None by default, a missing field (a table cannot leave a field out otherwise);
    `columns` name a table's cells (see delimited_rows)."""
    path = Path(path)
    suffix = data_suffix(path)
    if suffix not in SUFFIXES:
        raise TunelabError(f"{path}: unsupported {what} type '{suffix}' (use one of {', '.join(SUFFIXES)}, or one of them gzipped)")
    if suffix == ".parquet":
        rows = _parquet_rows(path)
    elif suffix in DELIMITERS:
        table = delimited_rows(path, read_text(path, what), DELIMITERS[suffix], columns)
        rows = ((where, {key: cell if cell else empty_cell for key, cell in row.items()}) for where, row in table)
    else:
        values = jsonl_values if suffix == ".jsonl" else json_array_values
        rows = ((f"{path}:{line}", value) for line, value in values(read_text(path, what)))
    try:
        for where, row in rows:
            if not isinstance(row, dict):
                raise TunelabError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            yield where, row
    except BadJson as err:
        raise TunelabError(f"{path}:{err.line}: bad JSON: {err}") from None


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
    raise TunelabError(
        f"{where}: cannot tell the data format from the keys {shown(sorted(keys))} (expected messages, conversations, instruction and output, "
        f"prompt and completion, or text); or set data.format to one of {', '.join(FORMATS)}"
    )


def load_examples(path: str | Path, data_format: str = "auto") -> tuple[str, list[dict]]:
    """The detected format and the canonical examples of a file."""
    examples, fmt = [], None if data_format == "auto" else data_format
    for where, row in read_rows(path):
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
        raise TunelabError(f"{where}: field '{key}' must be a string, got {shown(value)}")
    return value


def _nonempty_text_field(row: dict, key: str, where: str) -> str:
    value = _text_field(row, key, where)
    if not value.strip():
        raise TunelabError(f"{where}: field '{key}' is empty")
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
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _nonempty_text_field(row, "output", where)}]
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
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise TunelabError(f"{where}: {key}[{i}] has unknown role {shown(turn[role_key])} (expected one of {', '.join(roles)})")
        if not isinstance(turn[text_key], str):
            raise TunelabError(f"{where}: {key}[{i}].{text_key} must be a string, got {shown(turn[text_key])}")
        if role == "assistant" and not turn[text_key].strip():
            raise TunelabError(f"{where}: {key}[{i}].{text_key} is empty: an assistant turn with nothing to learn")
        messages.append({"role": role, "content": turn[text_key]})
    return _checked_messages(messages, where)


def _from_messages(row: dict, where: str) -> dict:
    return _turns(row, "messages", "role", "content", {r: r for r in ROLES}, where)


def _from_sharegpt(row: dict, where: str) -> dict:
    return _turns(row, "conversations", "from", "value", SHAREGPT_ROLES, where)


def _from_prompt_completion(row: dict, where: str) -> dict:
    prompt, completion = _text_field(row, "prompt", where), _nonempty_text_field(row, "completion", where)
    return {"segments": [{"text": prompt, "train": False}, {"text": completion, "train": True}]}


def _from_text(row: dict, where: str) -> dict:
    return {"segments": [{"text": _nonempty_text_field(row, "text", where), "train": True}]}


CONVERTERS = {
    "alpaca": _from_alpaca,
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "prompt_completion": _from_prompt_completion,
    "text": _from_text,
}


# --- file readers ----------------------------------------------------------------------------------


def data_suffix(path: Path) -> str:
    """The suffix that names a file's format: `.jsonl` for `rows.jsonl` and `rows.jsonl.gz` alike."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


class BadJson(ValueError):
    """Text that is not JSON as data rows need it: the reason, and the line (of the text) it is on."""

    def __init__(self, reason: str, line: int):
        super().__init__(reason)
        self.line = line


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    row = {}
    for key, value in pairs:
        if key in row:
            raise _RepeatedKey(key)
        row[key] = value
    return row


# A key repeated in one object is an error: which value is meant is ambiguous (json's own decoder
# keeps the last one silently). NaN and Infinity parse; a converter refuses them where text belongs.
_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _decode(text: str, index: int, first_line: int = 1) -> tuple[Any, int]:
    """The JSON value that starts at text[index] and the index after it; `first_line`: the line
    `text` starts on, for the line BadJson names."""
    try:
        return _JSON.raw_decode(text, index)
    except json.JSONDecodeError as err:
        raise BadJson(f"{err.msg.removesuffix(' at')} at column {err.colno}", first_line + err.lineno - 1) from None
    except _RepeatedKey as err:
        reason = f"the key {shown(err.args[0])} appears twice in one object"
    except RecursionError:
        reason = "nested too deeply"
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        reason = "a number with too many digits"
    raise BadJson(reason, first_line + text.count("\n", 0, index))


def jsonl_values(text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) of each non-blank line of a JSON Lines text; BadJson for a line that is not one
    JSON value."""
    # Lines end at \n, \r\n or \r, as a text file's lines do; not at the other characters that
    # str.splitlines takes (a JSON string may hold U+2028).
    lines = io.StringIO(text, newline=None).read().split("\n")
    for number, line in enumerate(lines, start=1):
        start = _skip_space(line, 0)
        if start < len(line):
            value, end = _decode(line, start, number)
            if _skip_space(line, end) < len(line):
                raise BadJson(f"more after the row at column {end + 1}; one row per line", number)
            yield number, value


def json_array_values(text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) of each element of a JSON array text, located by the line the element starts
    on; an empty text has none. BadJson for anything but one array."""
    index = _skip_space(text, 0)
    if index == len(text):
        return
    if text[index] != "[":
        value, _ = _decode(text, index)  # one object, or not JSON at all: the decoder says where
        raise BadJson(f"expected an array of rows (or use .jsonl), got {type(value).__name__}", 1)
    line_at = _LineCounter(text)
    index = _skip_space(text, index + 1)
    while index < len(text) and text[index] != "]":
        value, end = _decode(text, index)
        yield line_at(index), value
        index = _skip_space(text, end)
        if index < len(text) and text[index] == ",":
            index = _skip_space(text, index + 1)
        elif index < len(text) and text[index] != "]":
            raise BadJson("expected ',' or ']' between rows", line_at(index))
    if index >= len(text):
        raise BadJson("the array is not closed", line_at(len(text)))
    after = _skip_space(text, index + 1)
    if after < len(text):
        raise BadJson("more after the array's closing ']'", line_at(after))


class _LineCounter:
    """The 1-based line of a position in a text, for positions that only move forward: each call
    counts the line breaks since the last one (counting from the start every time is quadratic in
    the size of a file)."""

    def __init__(self, text: str):
        self.text, self.position, self.line = text, 0, 1

    def __call__(self, index: int) -> int:
        self.line += self.text.count("\n", self.position, index)
        self.position = index
        return self.line


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def delimited_rows(path: Path, text: str, delimiter: str, columns: list[str] | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """(file:line, {column: cell}) of each record of a CSV or TSV text after its header line, located
    by the line the record starts on (a quoted cell may hold line breaks). Cells are the text they
    are: no type guessing, and an empty cell is ''. `columns` name the cells by position instead of
    the header, unless the header names them all (in any order)."""
    csv.field_size_limit(2**31 - 1)  # a long text cell is data, not an error (the default is 128 KiB)
    # strict: a quote left open is an error, not a cell that swallows the rest of the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    names, start = None, 1
    try:
        for cells in reader:
            if not cells:  # the reader gives blank lines as []
                pass
            elif names is None:
                names = cells if not columns or set(columns) <= set(cells) else columns
                _refuse_repeated(names, f"{path}:{start}")
            elif len(cells) != len(names):
                raise TunelabError(f"{path}:{start}: {len(cells)} columns, the header has {len(names)}")
            else:
                yield f"{path}:{start}", dict(zip(names, cells))
            start = reader.line_num + 1
    except csv.Error as err:
        kind = "TSV" if delimiter == "\t" else "CSV"
        # Strict quoting ends the text with this error only inside a quoted cell.
        reason = "a quote opened in this record is never closed" if str(err) == "unexpected end of data" else err
        raise TunelabError(f"{path}:{start}: bad {kind}: {reason}") from None


def _refuse_repeated(columns: list[str], where: str) -> None:
    repeated = next((name for i, name in enumerate(columns) if name in columns[:i]), None)
    if repeated is not None:
        raise TunelabError(f"{where}: the column {shown(repeated)} is named twice")


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(read_bytes(path)))
    except pa.ArrowException as err:
        raise TunelabError(f"{path}: cannot read parquet file: {str(err).splitlines()[0]}") from None
    _refuse_repeated(table.column_names, str(path))
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i + 1}", row
