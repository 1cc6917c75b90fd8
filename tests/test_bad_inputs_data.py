"""Bad data files, through every reader a command uses: training's data.train and data.eval (SFT
rows), the preference rows of `objective: dpo` and the prompt rows of `objective: grpo`, the task
rows and the preference pairs of `tunelab eval --task`, and `tunelab bench --data`.

A defect ends in the contract: exit status 1, one error line naming the file and line (or the
field), no traceback, and the directory exactly as it was. What is valid though unusual (a UTF-8
byte-order mark, CRLF line ends, a line break quoted inside a CSV cell, TSV, gzip, a 10 MB row) is
read as the same rows as the plain file.
"""

from __future__ import annotations

import codecs
import csv
import gc
import gzip
import io
import json
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import TINY_MODEL, assert_clean_failure, invoke, read_report, tiny_run_config, tree_state, write_jsonl, write_yaml
from tunelab import files
from tunelab.bench.workload import read_records
from tunelab.data import dataset
from tunelab.data.formats import load_examples
from tunelab.data.preference import load_preference_examples
from tunelab.data.prompts import load_prompt_examples
from tunelab.eval.tasks import read_task_rows

TEN_MB = 10 * 1024 * 1024


@pytest.fixture(autouse=True)
def reliability(record_property):
    record_property("reliability", "data files")


@pytest.fixture(scope="module", autouse=True)
def frozen_gc():
    """`tunelab train` calls gc.collect() before it measures memory, which walks every object of this
    process (torch's and transformers' too): frozen, those are skipped, and each refused run here
    takes some 50 ms instead of half a second."""
    gc.freeze()
    yield
    gc.unfreeze()


# --- the rows each reader takes -------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of rows: four clean ones, and the field of theirs where text belongs."""

    rows: list[dict]
    text_field: str


KINDS = {
    "sft": Kind([{"instruction": f"Add {i} and 1.", "output": f"{i + 1}"} for i in range(4)], "output"),
    "preference": Kind([{"prompt": f"{i} + 1 =", "chosen": f" {i + 1}", "rejected": f" {i + 2}"} for i in range(4)], "chosen"),
    "prompt": Kind([{"prompt": f"What is {i} + 1?", "answer": f"{i + 1}"} for i in range(4)], "prompt"),
    "task": Kind([{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(4)], "answer"),  # gsm8k's
}


def jsonl_text(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_json_array(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, indent=2))
    return path


def csv_text(rows: list[dict], delimiter: str = ",", line_end: str = "\n") -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter, lineterminator=line_end)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# --- the commands, each reading one data file -------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A command that reads a data file of `kind`: `prepare(tmp_path, data)` writes what else it needs
    and returns the call that runs it."""

    kind: str
    prepare: Callable[[Path, Path], Callable]


def train_command(tmp_path: Path, config: dict) -> Callable:
    config_path = write_yaml(tmp_path / "run.yaml", config)
    return lambda: invoke("train", config_path)


def eval_preference_command(tmp_path: Path, data: Path) -> Callable:
    task = write_yaml(tmp_path / "pairs.yaml", {"type": "preference", "data": str(data)})
    return lambda: invoke("eval", TINY_MODEL, "--task", task, "--out", tmp_path / "eval-out")


GRPO = {"name": "grpo", "num_generations": 4, "max_completion_length": 4, "rewards": [{"name": "math_exact"}]}

ENTRIES = {
    "train": Entry("sft", lambda tmp, data: train_command(tmp, tiny_run_config(tmp / "out", data))),
    "train-eval": Entry("sft", lambda tmp, data: train_command(tmp, tiny_run_config(tmp / "out", write_jsonl(tmp / "clean.jsonl", KINDS["sft"].rows), data))),
    "dpo": Entry("preference", lambda tmp, data: train_command(tmp, tiny_run_config(tmp / "out", data, objective={"name": "dpo"}))),
    "grpo": Entry("prompt", lambda tmp, data: train_command(tmp, tiny_run_config(tmp / "out", data, objective=GRPO))),
    # One new token at most, should a defect get through to generation.
    "eval-task": Entry("task", lambda tmp, data: lambda: invoke("eval", TINY_MODEL, "--task", "gsm8k", "--data", data, "--max-new-tokens", 1, "--out", tmp / "eval-out")),
    "eval-pref": Entry("preference", eval_preference_command),
    "bench": Entry("sft", lambda tmp, data: lambda: invoke("bench", "--model", TINY_MODEL, "--data", data, "--eval-samples", 1, "--out", tmp / "bench.json")),
}


def assert_refused(tmp_path: Path, entry: str, data: Path, *expected: str, vanished: Path | None = None) -> str:
    """Run the entry's command on `data`: a clean failure naming `expected`, and nothing written
    (`vanished`: a file the test deleted on the way)."""
    command = ENTRIES[entry].prepare(tmp_path, data)
    before = tree_state(tmp_path)
    message = assert_clean_failure(command(), *expected)
    if vanished is not None:
        del before[str(vanished.relative_to(tmp_path))]
    assert tree_state(tmp_path) == before
    return message


def cases(table: dict, entries) -> list:
    return [pytest.param(case, entry, id=f"{case}-{entry}") for case in table for entry in entries]


# --- defects of the file's bytes, the same for every reader -----------------------------------------


def not_utf8(data: Path, kind: Kind) -> tuple[str, ...]:
    data.write_bytes(codecs.BOM_UTF16_LE + jsonl_text(kind.rows).encode("utf-16-le"))  # starts ff fe
    return f"{data}:1", "UTF-8"


def latin1_on_line_3(data: Path, kind: Kind) -> tuple[str, ...]:
    lines = jsonl_text(kind.rows).encode().splitlines(keepends=True)
    lines[2] = json.dumps({**kind.rows[2], kind.text_field: "café au lait"}, ensure_ascii=False).encode("latin-1") + b"\n"
    data.write_bytes(b"".join(lines))
    return f"{data}:3", "UTF-8"


def truncated_last_line(data: Path, kind: Kind) -> tuple[str, ...]:
    data.write_text(jsonl_text(kind.rows)[:-6])
    return f"{data}:4", "JSON"


def ten_mb_line_truncated(data: Path, kind: Kind) -> tuple[str, ...]:
    data.write_text(json.dumps({**kind.rows[0], kind.text_field: "x" * TEN_MB})[:-10])
    return f"{data}:1", "JSON"


def directory(data: Path, kind: Kind) -> tuple[str, ...]:
    data.mkdir()
    return str(data), "directory"


def fifo(data: Path, kind: Kind) -> tuple[str, ...]:
    os.mkfifo(data)
    return str(data), "not a regular file"


BYTE_DEFECTS = {
    "not-utf8": not_utf8,
    "latin1-line3": latin1_on_line_3,
    "truncated-last-line": truncated_last_line,
    "10mb-line-truncated": ten_mb_line_truncated,
    "directory": directory,
    "fifo": fifo,
}


class Hang(Exception):
    pass


@pytest.fixture
def no_hang():
    """A reader that opened a FIFO would wait for a writer forever: fail the test instead."""

    def give_up(signum, frame):
        raise Hang("the command opened the FIFO and waited")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("case, entry", cases(BYTE_DEFECTS, ENTRIES))
def test_file_defect_is_refused(tmp_path, no_hang, case, entry):
    data = tmp_path / "data.jsonl"
    expected = BYTE_DEFECTS[case](data, KINDS[ENTRIES[entry].kind])
    message = assert_refused(tmp_path, entry, data, *expected)
    assert len(message) < 400  # no cell of the file quoted at length


@pytest.mark.parametrize("entry", ENTRIES)
def test_file_that_vanishes_after_its_check(tmp_path, monkeypatch, entry):
    data = write_jsonl(tmp_path / "data.jsonl", KINDS[ENTRIES[entry].kind].rows)
    check = files.check_regular_file

    def check_then_delete(path, what="data file"):
        check(path, what)
        if Path(path) == data:
            data.unlink()

    for module in (files, dataset):  # the tokenization cache's key reads the file first
        monkeypatch.setattr(module, "check_regular_file", check_then_delete)
    assert_refused(tmp_path, entry, data, str(data), "No such file", vanished=data)


# --- defects of one row (line 3), refused naming the line and the field ----------------------------


def with_field(row: dict, field: str, value) -> str:
    return json.dumps({**row, field: value})


# Line 3 of the file, given the kind's row 3 and its text field.
ROW_DEFECTS = {
    "not-object-number": lambda row, field: "42",
    "not-object-string": lambda row, field: '"a row"',
    "array-for-string": lambda row, field: with_field(row, field, [1, 2]),
    "nan-for-string": lambda row, field: with_field(row, field, math.nan),
    "infinity-for-string": lambda row, field: with_field(row, field, math.inf),
    "null-field": lambda row, field: with_field(row, field, None),
    "empty-string": lambda row, field: with_field(row, field, ""),
    "duplicate-key": lambda row, field: with_field(row, field, "one")[:-1] + f', "{field}": "two"}}',
}
ROW_ENTRIES = [entry for entry in ENTRIES if entry != "train-eval"]  # data.eval goes through data.train's reader
# A task template renders a list by design (texts one per line, other values as Python writes them).
ROW_CASES = [case for case in cases(ROW_DEFECTS, ROW_ENTRIES) if case.id != "array-for-string-eval-task"]


@pytest.mark.parametrize("case, entry", ROW_CASES)
def test_row_defect_is_refused_naming_line_and_field(tmp_path, case, entry):
    kind = KINDS[ENTRIES[entry].kind]
    lines = [json.dumps(row) for row in kind.rows]
    lines[2] = ROW_DEFECTS[case](kind.rows[2], kind.text_field)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    expected = "JSON object" if case.startswith("not-object") else kind.text_field
    assert_refused(tmp_path, entry, data, f"{data}:3", expected)


# --- table files -------------------------------------------------------------------------------------


def missing_cell(kind: Kind) -> tuple[str, str, str]:
    lines = csv_text(kind.rows).splitlines(keepends=True)
    lines[3] = lines[3].rstrip("\n").rsplit(",", 1)[0] + "\n"
    return "".join(lines), "4", "columns"


def missing_column(kind: Kind) -> tuple[str, str, str]:
    return csv_text([{k: v for k, v in row.items() if k != kind.text_field} for row in kind.rows]), "2", kind.text_field


def unterminated_quote(kind: Kind) -> tuple[str, str, str]:
    lines = csv_text(kind.rows).splitlines(keepends=True)
    lines[3] = '"' + lines[3]
    return "".join(lines), "4", "CSV"


CSV_DEFECTS = {"csv-missing-cell": missing_cell, "csv-missing-column": missing_column, "csv-unterminated-quote": unterminated_quote}


@pytest.mark.parametrize("case, entry", cases(CSV_DEFECTS, ROW_ENTRIES))
def test_csv_defect_is_refused(tmp_path, case, entry):
    text, line, expected = CSV_DEFECTS[case](KINDS[ENTRIES[entry].kind])
    data = tmp_path / "data.csv"
    data.write_text(text)
    assert_refused(tmp_path, entry, data, f"{data}:{line}", expected)


PARQUET_ENTRIES = [entry for entry in ROW_ENTRIES if entry != "eval-task"]  # task files are text


@pytest.mark.parametrize("entry", PARQUET_ENTRIES)
def test_parquet_with_the_wrong_schema_is_refused(tmp_path, entry):
    kind = KINDS[ENTRIES[entry].kind]
    data = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{**row, kind.text_field: i} for i, row in enumerate(kind.rows)]), data)  # an int column
    assert_refused(tmp_path, entry, data, f"{data}: row 1", kind.text_field)


def test_file_that_is_not_parquet_is_refused(tmp_path):
    data = tmp_path / "data.parquet"
    data.write_bytes(b"PAR1 not a parquet file")
    assert_refused(tmp_path, "train", data, str(data), "cannot read parquet file")


# --- JSON array files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["train", "eval-task"])
@pytest.mark.parametrize("value", [42, "rows"], ids=["number", "string"])
def test_json_file_holding_no_array_is_refused(tmp_path, entry, value):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(value))
    assert_refused(tmp_path, entry, data, f"{data}:1", "array of rows")


@pytest.mark.parametrize("entry", ["train", "eval-task"])
def test_latin1_byte_inside_a_json_array_names_its_line(tmp_path, entry):
    kind = KINDS[ENTRIES[entry].kind]
    rows = [{**kind.rows[0], next(iter(kind.rows[0])): "café"}, *kind.rows[1:]]
    text = json.dumps(rows, indent=2, ensure_ascii=False)
    assert "café" in text.splitlines()[2]  # line 3: the first field of the first row
    data = tmp_path / "data.json"
    data.write_bytes(text.encode("latin-1"))
    assert_refused(tmp_path, entry, data, f"{data}:3", "UTF-8")


# --- more defects of the text, which readers once crashed on or let through --------------------------

# (file name, its content given the kind's rows, the line named, a piece of the message)
TEXT_DEFECTS = {
    "deeply-nested": ("data.jsonl", lambda rows: jsonl_text(rows[:1]) + "[" * 100_000 + "\n", ":2", "nested too deeply"),
    "too-many-digits": ("data.jsonl", lambda rows: jsonl_text(rows[:1]) + "1" * 5000 + "\n", ":2", "too many digits"),
    "two-rows-on-a-line": ("data.jsonl", lambda rows: jsonl_text(rows[:1]) + json.dumps(rows[1]) + " " + json.dumps(rows[2]) + "\n", ":2", "one row per line"),
    "text-after-the-array": ("data.json", lambda rows: json.dumps(rows) + "\n]\n", ":2", "after the array"),
    "csv-column-named-twice": ("data.csv", lambda rows: "text,text\none,two\n", ":1", "named twice"),
}


@pytest.mark.parametrize("case, entry", cases(TEXT_DEFECTS, ["train", "eval-task"]))
def test_text_defect_is_refused(tmp_path, case, entry):
    name, content, line, expected = TEXT_DEFECTS[case]
    data = tmp_path / name
    data.write_text(content(KINDS[ENTRIES[entry].kind].rows))
    assert_refused(tmp_path, entry, data, f"{data}{line}", expected)


@pytest.mark.parametrize("entry", ["train", "eval-task"])
def test_damaged_gzip_is_refused(tmp_path, entry):
    data = tmp_path / "data.jsonl.gz"
    data.write_bytes(gzip.compress(jsonl_text(KINDS[ENTRIES[entry].kind].rows).encode())[:30])
    assert_refused(tmp_path, entry, data, str(data), "Compressed file ended")


# --- valid variants: the same rows as the plain file ------------------------------------------------


def variant_rows(kind: Kind) -> list[dict]:
    """The kind's rows with line breaks inside one text (a CSV cell that must be quoted)."""
    rows = [dict(row) for row in kind.rows]
    rows[1][kind.text_field] = f"{rows[1][kind.text_field]}\nand a second line\u2028and a third"  # U+2028: text, not a line end
    return rows


# (suffix, the file's bytes)
VARIANTS = {
    "bom-jsonl": (".jsonl", lambda rows: codecs.BOM_UTF8 + jsonl_text(rows).encode()),
    "crlf-jsonl": (".jsonl", lambda rows: jsonl_text(rows).replace("\n", "\r\n").encode()),
    "raw-utf8-jsonl": (".jsonl", lambda rows: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()),
    "bom-crlf-json": (".json", lambda rows: codecs.BOM_UTF8 + json.dumps(rows, indent=2).replace("\n", "\r\n").encode()),
    "csv-quoted-newline": (".csv", lambda rows: csv_text(rows).encode()),
    "bom-crlf-csv": (".csv", lambda rows: codecs.BOM_UTF8 + csv_text(rows, line_end="\r\n").encode()),
    "tsv": (".tsv", lambda rows: csv_text(rows, delimiter="\t").encode()),
    "gzip-jsonl": (".jsonl.gz", lambda rows: gzip.compress(jsonl_text(rows).encode())),
}


def prompt_rows_without_locations(path: Path) -> tuple[str, list[dict]]:
    data_format, examples = load_prompt_examples(path)
    return data_format, [{key: value for key, value in example.items() if key != "where"} for example in examples]


# Each reader, with the kind of rows it takes: what it makes of a file's rows, without where they were.
READERS = {
    "train": ("sft", load_examples),
    "dpo": ("preference", lambda path: load_preference_examples(path, "preference")),
    "grpo": ("prompt", prompt_rows_without_locations),
    "eval-task": ("task", lambda path: [row for _, row in read_task_rows(path)]),
    "bench": ("sft", lambda path: read_records(path, "sft")),
}


@pytest.mark.parametrize("variant, reader", cases(VARIANTS, READERS))
def test_valid_variant_reads_as_the_plain_file(tmp_path, variant, reader):
    kind_name, read = READERS[reader]
    rows = variant_rows(KINDS[kind_name])
    suffix, content = VARIANTS[variant]
    data = tmp_path / f"data{suffix}"
    data.write_bytes(content(rows))
    assert read(data) == read(write_jsonl(tmp_path / "plain.jsonl", rows))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
@pytest.mark.parametrize("reader", ["train", "eval-task"])  # the two readers of text (the others share training's)
def test_10mb_row_is_read_whole(tmp_path, reader, suffix):
    kind_name, read = READERS[reader]
    kind = KINDS[kind_name]
    rows = [{**kind.rows[0], kind.text_field: "y" * TEN_MB}, *kind.rows[1:]]
    data = tmp_path / f"data{suffix}"
    data.write_text(jsonl_text(rows) if suffix == ".jsonl" else csv_text(rows))
    as_json_array = read(write_json_array(tmp_path / "rows.json", rows))
    assert "y" * TEN_MB in json.dumps(as_json_array)
    assert read(data) == as_json_array


def test_valid_variants_train_end_to_end(tmp_path):
    rows = variant_rows(KINDS["sft"])
    train_file, eval_file = tmp_path / "train.csv", tmp_path / "eval.tsv"
    train_file.write_bytes(VARIANTS["bom-crlf-csv"][1](rows))
    eval_file.write_bytes(VARIANTS["tsv"][1](rows))
    config = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", train_file, eval_file, train={"max_steps": 1}))
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    data = read_report(tmp_path / "run")["data"]
    assert (data["train"]["rows"], data["eval"]["rows"], data["train"]["format"]) == (len(rows), len(rows), "alpaca")
