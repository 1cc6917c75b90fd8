"""Property tests of the data converters and file readers: whatever a row or a file holds, the result
is a canonical example (of the shape tokenizing expects) or a TunelabError, never another exception.

The strategies lean toward the keys, roles and shapes the converters look for, so that both outcomes
occur; each test checks that both did.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tunelab.data.formats import CONVERTERS, FORMATS, ROLES, load_examples
from tunelab.data.preference import ROLES as PREFERENCE_ROLES
from tunelab.data.preference import load_preference_examples
from tunelab.data.prompts import load_prompt_examples
from tunelab.errors import TunelabError
from tunelab.eval.tasks import read_task_rows

FAST = settings(max_examples=200, deadline=None, database=None)


@pytest.fixture(autouse=True)
def reliability(record_property):
    record_property("reliability", "property: data converters")


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory):
    """Besides its example database (off here), Hypothesis keeps caches in its home directory, by
    default .hypothesis/ in the working directory: keep them out of the repository."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


# --- strategies ---------------------------------------------------------------------------------------

FIELD_NAMES = ["instruction", "input", "output", "system", "messages", "conversations", "prompt", "completion", "text", "chosen", "rejected", "label", "answer"]
ROLE_NAMES = ["system", "user", "assistant", "tool", "human", "gpt", "model", "bot"]
SUFFIXES = [".jsonl", ".json", ".csv", ".tsv"]

texts = st.sampled_from(["", " ", "hi", "2 + 2 =", " 4", "line\nbreak"]) | st.text(max_size=10)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts  # floats include NaN and ±Infinity
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8)
# A chat turn in either layout (role/content, from/value), its parts sometimes missing or of another type.
turns = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(ROLE_NAMES) | json_values,
        "content": texts | json_values,
        "from": st.sampled_from(ROLE_NAMES) | json_values,
        "value": texts | json_values,
    },
)
field_values = texts | st.lists(turns, max_size=4) | json_values
any_rows = st.dictionaries(st.sampled_from(FIELD_NAMES) | texts, field_values, max_size=6)

some_text = st.sampled_from(["hi", "2 + 2 =", " 4", "line\nbreak"]) | st.text(min_size=1, max_size=10)
user_turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": some_text}), min_size=1, max_size=2)
assistant_turns = st.lists(st.fixed_dictionaries({"role": st.just("assistant"), "content": some_text}), min_size=1, max_size=2)
chat = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": some_text}), min_size=1, max_size=4)
sharegpt_chat = st.lists(st.fixed_dictionaries({"from": st.sampled_from(ROLE_NAMES), "value": some_text}), min_size=1, max_size=4)
# The typical value of each field of a row shape.
ALPACA = {"instruction": some_text, "output": some_text}
MESSAGES = {"messages": chat}
SHAREGPT = {"conversations": sharegpt_chat}
PROMPT_COMPLETION = {"prompt": some_text, "completion": some_text}
TEXT = {"text": some_text}
PLAIN_PAIR = {"prompt": some_text, "chosen": some_text, "rejected": some_text}
CHAT_PAIR = {"prompt": user_turns, "chosen": assistant_turns, "rejected": assistant_turns}
UNPAIRED = {"prompt": some_text, "completion": some_text, "label": st.booleans()}
PROMPT_ROW = {"prompt": some_text | user_turns, "answer": some_text}


def typical_or_any(typical: st.SearchStrategy) -> st.SearchStrategy:
    """The typical value four times in five, else any value at all."""
    return st.integers(0, 4).flatmap(lambda n: typical if n else field_values)


def rows_of(*shapes: dict) -> st.SearchStrategy:
    """Rows of these shapes with fields sometimes replaced by any value, and as often any row at all."""
    shaped = st.sampled_from(shapes).flatmap(
        lambda shape: st.fixed_dictionaries({key: typical_or_any(value) for key, value in shape.items()}, optional={"system": typical_or_any(some_text), "id": json_values})
    )
    return shaped | any_rows


# A pair left to find its prompt: the leading turns its chosen and rejected conversations share.
implicit_prompt_pairs = st.builds(lambda prompt, chosen, rejected: {"chosen": prompt + chosen, "rejected": prompt + rejected}, user_turns, assistant_turns, assistant_turns)
SFT_SHAPES = {"alpaca": ALPACA, "messages": MESSAGES, "sharegpt": SHAREGPT, "prompt_completion": PROMPT_COMPLETION, "text": TEXT}
# The rows each reader takes.
ROWS = {
    "sft": rows_of(*SFT_SHAPES.values()),
    "preference": rows_of(PLAIN_PAIR, CHAT_PAIR) | implicit_prompt_pairs,
    "unpaired": rows_of(UNPAIRED, PLAIN_PAIR),
    "prompt": rows_of(PROMPT_ROW),
    "task": rows_of(PROMPT_ROW, ALPACA),
}


def jsonl_text(values: list) -> str:
    return "".join(json.dumps(value) + "\n" for value in values)


def table_text(rows: list[dict], delimiter: str) -> str:
    """The rows as a CSV or TSV table under the first row's keys; a value that is not text as its JSON."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({key: value if isinstance(value, str) else json.dumps(value) for key, value in row.items()} for row in rows)
    return out.getvalue()


def damaged(file: tuple[str, str], at: int, inserted: bytes) -> tuple[str, bytes]:
    """A file's text as UTF-8 with a few bytes put in at `at`, or cut off there when there are none."""
    suffix, data = file[0], file[1].encode()
    return suffix, data[:at] + inserted + (data[at:] if inserted else b"")


def data_files(rows: st.SearchStrategy) -> st.SearchStrategy:
    """(suffix, content) of a data file: rows as JSON lines, a JSON array or a table, intact or
    damaged; or a file of any bytes or any JSON value."""
    row_lists = st.lists(rows, min_size=1, max_size=3)
    intact = st.one_of(
        row_lists.map(lambda rows: (".jsonl", jsonl_text(rows))),
        row_lists.map(lambda rows: (".json", json.dumps(rows))),
        row_lists.map(lambda rows: (".csv", table_text(rows, ","))),
        row_lists.map(lambda rows: (".tsv", table_text(rows, "\t"))),
    )
    return st.one_of(
        intact.map(lambda file: (file[0], file[1].encode())),
        st.builds(damaged, intact, st.integers(0, 200), st.binary(max_size=3)),
        st.tuples(st.sampled_from(SUFFIXES), st.binary(max_size=40)),
        st.tuples(st.sampled_from(SUFFIXES), st.lists(json_values, max_size=3).map(jsonl_text).map(str.encode)),
        st.tuples(st.sampled_from(SUFFIXES), json_values.map(json.dumps).map(str.encode)),
    )


# --- the canonical shapes -----------------------------------------------------------------------------


def assert_messages(messages, roles, ends_with_assistant: bool = False) -> None:
    assert isinstance(messages, list) and messages
    for message in messages:
        assert set(message) == {"role", "content"} and message["role"] in roles and isinstance(message["content"], str)
    if ends_with_assistant:
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"].strip()


def assert_sft_example(example: dict) -> None:
    """Chat messages with an assistant turn to learn from, or text segments with a target."""
    if "messages" in example:
        assert set(example) == {"messages"}
        assert_messages(example["messages"], ROLES)
        assistant = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
        assert assistant and all(content.strip() for content in assistant)
    else:
        assert set(example) == {"segments"}
        segments = example["segments"]
        assert all(set(s) == {"text", "train"} and isinstance(s["text"], str) and isinstance(s["train"], bool) for s in segments)
        assert any(s["train"] and s["text"].strip() for s in segments)


def assert_preference_example(example: dict, kind: str) -> None:
    completions = ["chosen", "rejected"] if kind == "preference" else ["completion"]
    assert set(example) == {"prompt", *completions} | ({"label"} if kind == "unpaired" else set())
    if isinstance(example["prompt"], str):
        assert example["prompt"].strip()
        assert all(isinstance(example[key], str) and example[key].strip() for key in completions)
    else:
        assert_messages(example["prompt"], PREFERENCE_ROLES)
        for key in completions:
            assert_messages(example[key], PREFERENCE_ROLES, ends_with_assistant=True)
    if kind == "unpaired":
        assert isinstance(example["label"], bool)


def assert_prompt_row(example: dict) -> None:
    assert set(example) == {"prompt", "fields", "where"}
    prompt, fields = json.loads(example["prompt"]), json.loads(example["fields"])
    if isinstance(prompt, str):
        assert prompt.strip()
    else:
        assert_messages(prompt, PREFERENCE_ROLES)
    assert isinstance(fields, dict) and "prompt" not in fields


def read_sft(path: Path) -> None:
    data_format, examples = load_examples(path)
    assert data_format in FORMATS and examples
    for example in examples:
        assert_sft_example(example)


def read_preference(path: Path, kind: str) -> None:
    data_format, examples, identical = load_preference_examples(path, kind)
    assert data_format in (f"{kind}:plain", f"{kind}:conversational") and examples and identical >= 0
    for example in examples:
        assert_preference_example(example, kind)


def read_prompt_rows(path: Path) -> None:
    data_format, examples = load_prompt_examples(path)
    assert data_format in ("prompt:plain", "prompt:conversational") and examples
    for example in examples:
        assert_prompt_row(example)


def read_task(path: Path) -> None:
    for where, row in read_task_rows(path):
        assert isinstance(where, str) and isinstance(row, dict)


READERS = {
    "sft": read_sft,
    "preference": lambda path: read_preference(path, "preference"),
    "unpaired": lambda path: read_preference(path, "unpaired"),
    "prompt": read_prompt_rows,
    "task": read_task,
}


def outcome(check, where: str) -> str:
    """'read' when `check` passes, 'refused' when it raises a TunelabError whose one-line message
    names `where` (the file, or the row's file:line); any other exception fails."""
    try:
        check()
    except TunelabError as err:
        assert where in str(err) and "\n" not in str(err), str(err)
        return "refused"
    return "read"


# --- properties ---------------------------------------------------------------------------------------
# Each property runs inside its test, which then checks that the strategies led to both outcomes.


def test_converters_make_a_canonical_example_or_refuse():
    outcomes = Counter()

    @FAST
    @given(data_format=st.sampled_from(FORMATS), data=st.data())
    def check(data_format, data):
        row = data.draw(rows_of(SFT_SHAPES[data_format]))
        outcomes[outcome(lambda: assert_sft_example(CONVERTERS[data_format](row, "data.jsonl:1")), "data.jsonl:1")] += 1

    check()
    assert outcomes["read"] and outcomes["refused"], outcomes


@pytest.mark.parametrize("reader", ["preference", "unpaired", "prompt"])
def test_preference_and_prompt_rows_are_canonical_or_refused(tmp_path, reader):
    outcomes = Counter()
    path = tmp_path / "rows.jsonl"

    @FAST
    @given(rows=st.lists(ROWS[reader], min_size=1, max_size=3))
    def check(rows):
        path.write_text(jsonl_text(rows))
        outcomes[outcome(lambda: READERS[reader](path), str(path))] += 1

    check()
    assert outcomes["read"] and outcomes["refused"], outcomes


@pytest.mark.parametrize("reader", READERS)
def test_any_file_is_read_or_refused(tmp_path, reader):
    outcomes = Counter()

    @FAST
    @given(file=data_files(ROWS[reader]))
    def check(file):
        suffix, content = file
        path = tmp_path / f"data{suffix}"
        path.write_bytes(content)
        outcomes[outcome(lambda: READERS[reader](path), str(path))] += 1

    check()
    assert outcomes["read"] and outcomes["refused"], outcomes
