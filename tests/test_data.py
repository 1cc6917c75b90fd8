"""Data: file formats to canonical examples, malformed-file messages, chat target masks, too-long rows,
the tokenization cache, eval splits, and packing (a packed batch's loss equals the unpacked one)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

import tunelab.data.dataset as dataset_module
from tunelab.config import DataConfig, ModelConfig
from tunelab.data.batching import IGNORE, make_batch, pack_rows
from tunelab.data.dataset import build_datasets, tokenized_split
from tunelab.data.formats import load_examples
from tunelab.data.tokenize import tokenize_example
from tunelab.errors import TunelabError
from tunelab.models.loader import load_model, load_tokenizer
from tunelab.models.tiny import tiny_tokenizer
from tunelab.objectives.causal_lm import causal_lm_loss

TINY = "tiny-random-llama"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain? Say it politely."},
    {"role": "assistant", "content": " Madrid, señor 🙂 "},
    {"role": "user", "content": "Thanks\nbye"},
    {"role": "assistant", "content": "Bye!\nTake care."},
]


@pytest.fixture
def tokenizer():
    return load_tokenizer(ModelConfig(name=TINY))


@pytest.fixture
def chatml_tokenizer():
    """The tiny byte-level tokenizer with ChatML special tokens and template, `<|im_end|>` as EOS."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tiny_model():
    model, tokenizer = load_model(ModelConfig(name=TINY, dtype="float32", device="cpu"))
    return model, tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json_array(path, rows):
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def error_message(path, data_format="auto") -> str:
    with pytest.raises(TunelabError) as info:
        load_examples(path, data_format)
    return str(info.value)


def line_of(text: str, fragment: str) -> int:
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if fragment in line]
    assert len(lines) == 1, f"{fragment!r} is on lines {lines}"
    return lines[0]


# --- formats -------------------------------------------------------------------------------------

FORMAT_CASES = {
    "alpaca without input": (
        "alpaca",
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]},
    ),
    "alpaca with input": (
        "alpaca",
        {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
        {
            "messages": [
                {"role": "user", "content": "Translate to French.\n\ncheese"},
                {"role": "assistant", "content": "fromage"},
            ]
        },
    ),
    "alpaca with system": (
        "alpaca",
        {"system": "Be terse.", "instruction": "Greet me.", "output": "Hi."},
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Greet me."},
                {"role": "assistant", "content": "Hi."},
            ]
        },
    ),
    "messages": ("messages", {"messages": CONVERSATION}, {"messages": CONVERSATION}),
    "sharegpt": (
        "sharegpt",
        {
            "conversations": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "Hello?"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "user", "value": "Again."},
                {"from": "assistant", "value": "Hello again."},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hello?"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Again."},
                {"role": "assistant", "content": "Hello again."},
            ]
        },
    ),
    "prompt_completion": (
        "prompt_completion",
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"segments": [{"text": "2 + 2 =", "train": False}, {"text": " 4", "train": True}]},
    ),
    "text": (
        "text",
        {"text": "Once upon a time, a byte."},
        {"segments": [{"text": "Once upon a time, a byte.", "train": True}]},
    ),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_format_is_detected_and_converted(tmp_path, case, suffix):
    expected_format, row, expected_example = FORMAT_CASES[case]
    path = tmp_path / f"data{suffix}"
    (write_jsonl if suffix == ".jsonl" else write_json_array)(path, [row, row])
    fmt, examples = load_examples(path)
    assert fmt == expected_format
    assert examples == [expected_example, expected_example]


def test_explicit_format_overrides_detection(tmp_path):
    # both keys present: auto picks prompt_completion, `text` reads the text field
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "text": "whole text"}])
    assert load_examples(path)[0] == "prompt_completion"
    assert load_examples(path, "text") == ("text", [{"segments": [{"text": "whole text", "train": True}]}])


ALPACA_TABLE = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
]
ALPACA_TABLE_EXAMPLES = [FORMAT_CASES["alpaca without input"][2], FORMAT_CASES["alpaca with input"][2]]


def test_csv_alpaca(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA_TABLE)
    assert load_examples(path) == ("alpaca", ALPACA_TABLE_EXAMPLES)


def test_parquet_alpaca(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ALPACA_TABLE), path)
    assert load_examples(path) == ("alpaca", ALPACA_TABLE_EXAMPLES)


def test_csv_cells_stay_text_and_rows_are_located_by_their_first_line(tmp_path):
    path = tmp_path / "data.csv"
    text = 'prompt,completion\n2+2=,4\nDoes it apply?,NA\n"a prompt\nover two lines",null\nzip code?,\n'
    path.write_text(text, encoding="utf-8")
    # a CSV has no types: cells that look like numbers or NA are still the text written
    with pytest.raises(TunelabError) as info:
        load_examples(path)
    assert f"{path}:{line_of(text, 'zip code?')}:" in str(info.value)  # the empty cell, after a 2-line record
    assert "completion" in str(info.value)
    path.write_text(text.replace("zip code?,", "zip code?,01234"), encoding="utf-8")
    fmt, examples = load_examples(path)
    assert [e["segments"][1]["text"] for e in examples] == ["4", "NA", "null", "01234"]
    assert examples[2]["segments"][0]["text"] == "a prompt\nover two lines"


def test_csv_row_with_extra_cells(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\np,c\np,c,extra\n")
    message = error_message(path)
    assert f"{path}:3:" in message and "header" in message


def test_csv_that_is_not_utf8(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("prompt,completion\nna\xefve,caf\xe9\n".encode("latin-1"))
    message = error_message(path)
    assert str(path) in message and "UTF-8" in message


# --- malformed files ----------------------------------------------------------------------------


def test_bad_json_line_of_jsonl(tmp_path):
    lines = [json.dumps({"text": f"row {i}"}) for i in range(1, 21)]
    lines[4] = ""  # a blank line still counts as a line
    lines[16] = '{"text": "row 17"'  # line 17
    path = tmp_path / "file.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = error_message(path)
    assert f"{path}:17:" in message and "bad JSON" in message


@pytest.mark.parametrize(
    "broken, fragment",
    [
        ('    "text" "three"\n', '"three"'),  # no colon
        ('    "text": three\n', "three"),  # unquoted value
    ],
)
def test_bad_json_inside_json_array_reports_its_line(tmp_path, broken, fragment):
    text = '[\n  {\n    "text": "one"\n  },\n  {\n    "text": "two"\n  },\n  {\n' + broken + '  },\n  {\n    "text": "four"\n  }\n]\n'
    path = tmp_path / "data.json"
    path.write_text(text)
    assert f"{path}:{line_of(text, fragment)}:" in error_message(path)


def test_missing_comma_between_json_array_rows(tmp_path):
    text = '[\n  {"text": "one"},\n  {"text": "two"}\n  {"text": "three"}\n]\n'
    path = tmp_path / "data.json"
    path.write_text(text)
    assert f"{path}:{line_of(text, 'three')}:" in error_message(path)


def test_unclosed_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "one"},\n  {"text": "two"}\n')
    message = error_message(path)
    assert str(path) in message and "not closed" in message


def test_json_file_that_is_not_an_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"text": "one"}')
    assert "array" in error_message(path)


def test_missing_field_in_json_array_names_the_row_line(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}]
    path = write_json_array(tmp_path / "data.json", rows)
    message = error_message(path)
    assert f"{path}:{line_of(path.read_text(), 'answer') - 2}:" in message  # the row's `{` line
    assert "'output'" in message


def test_missing_field(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}]
    message = error_message(write_jsonl(tmp_path / "data.jsonl", rows))
    assert "data.jsonl:3:" in message and "missing field 'output'" in message


def test_wrong_field_type(tmp_path):
    message = error_message(write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "completion": 4}]))
    assert "data.jsonl:1:" in message and "'completion'" in message


def test_unknown_role_in_messages(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    message = error_message(write_jsonl(tmp_path / "data.jsonl", [good, good, bad]))
    assert "data.jsonl:3:" in message and "'bot'" in message and "messages[1]" in message


def test_unknown_role_in_sharegpt(tmp_path):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    bad = {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    message = error_message(write_jsonl(tmp_path / "data.jsonl", [good, bad]))
    assert "data.jsonl:2:" in message and "'robot'" in message and "conversations[0]" in message


def test_conversation_without_assistant_turn(tmp_path):
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    message = error_message(write_jsonl(tmp_path / "data.jsonl", [row]))
    assert "data.jsonl:1:" in message and "assistant" in message


def test_format_fixed_by_first_row(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, {"text": "a different format"}]
    message = error_message(write_jsonl(tmp_path / "data.jsonl", rows))
    assert "data.jsonl:2:" in message and "'prompt'" in message


def test_undetectable_format(tmp_path):
    message = error_message(write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}]))
    assert "data.jsonl:1:" in message and "data.format" in message


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n\n"),
        ("empty.json", ""),
        ("empty_array.json", "[\n]\n"),
        ("header_only.csv", "prompt,completion\n"),
    ],
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    message = error_message(path)
    assert str(path) in message and "empty" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text('{"text": "hi"}\n')
    message = error_message(path)
    assert str(path) in message and "'.txt'" in message


def test_missing_data_file(tmp_path):
    assert "not found" in error_message(tmp_path / "absent.jsonl")


def test_row_not_an_object_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n["text", "two"]\n')
    message = error_message(path)
    assert f"{path}:2:" in message and "object" in message


def test_row_not_an_object_json_array(tmp_path):
    text = '[\n  {"text": "one"},\n  "two"\n]\n'
    path = tmp_path / "data.json"
    path.write_text(text)
    message = error_message(path)
    assert f"{path}:{line_of(text, 'two')}:" in message and "object" in message


# --- chat target masks ----------------------------------------------------------------------------


def target_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive target tokens."""
    runs, current = [], []
    for token, is_target in zip(ids, mask):
        if is_target:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", ["default", "chatml"])
def test_chat_targets_are_exactly_each_assistant_turn_and_its_end(template, tokenizer, chatml_tokenizer):
    tok = tokenizer if template == "default" else chatml_tokenizer
    end_of_turn = "</s>" if template == "default" else "<|im_end|>"
    assert tok.eos_token == end_of_turn

    tokens = tokenize_example({"messages": CONVERSATION}, tok)
    ids, mask = tokens["input_ids"], tokens["target_mask"]
    assert len(ids) == len(mask)
    # the ids are the whole rendered conversation
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # the end-of-turn marker is one token (so it can be a target on its own)
    assert ids.count(tok.convert_tokens_to_ids(end_of_turn)) == (3 if template == "default" else len(CONVERSATION))

    assistant_turns = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(run) for run in target_runs(ids, mask)] == [turn + end_of_turn for turn in assistant_turns]

    prompt_text = tok.decode([t for t, m in zip(ids, mask) if not m])
    for message in CONVERSATION:
        if message["role"] != "assistant":
            assert message["content"] in prompt_text


@pytest.mark.parametrize("template", ["default", "chatml"])
def test_train_on_all_makes_every_token_a_target(template, tokenizer, chatml_tokenizer):
    tok = tokenizer if template == "default" else chatml_tokenizer
    assistant_only = tokenize_example({"messages": CONVERSATION}, tok)
    everything = tokenize_example({"messages": CONVERSATION}, tok, train_on="all")
    assert everything["input_ids"] == assistant_only["input_ids"]
    assert everything["target_mask"] == [1] * len(everything["input_ids"])


@pytest.mark.parametrize("template", ["default", "chatml"])
def test_prompt_completion_targets_are_completion_and_eos(template, tokenizer, chatml_tokenizer):
    tok = tokenizer if template == "default" else chatml_tokenizer
    prompt, completion = "Question: what is 2+2?\nAnswer:", " 4, señor."
    example = {"segments": [{"text": prompt, "train": False}, {"text": completion, "train": True}]}
    tokens = tokenize_example(example, tok)
    ids, mask = tokens["input_ids"], tokens["target_mask"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == completion + tok.eos_token
    assert tok.decode([t for t, m in zip(ids, mask) if not m]) == prompt
    assert mask == sorted(mask)  # prompt first, then the targets


def test_text_targets_are_all_tokens_and_eos(tokenizer):
    tokens = tokenize_example({"segments": [{"text": "plain text", "train": True}]}, tokenizer)
    assert tokens["target_mask"] == [1] * len(tokens["input_ids"])
    assert tokenizer.decode(tokens["input_ids"]) == "plain text</s>"


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # renders the number of messages first: a conversation's prefix renders differently
    tokenizer.chat_template = "{{ messages | length }}" + CHATML_TEMPLATE
    with pytest.raises(TunelabError, match="prefix"):
        tokenize_example({"messages": CONVERSATION}, tokenizer)


# --- too-long rows, through the dataset builder --------------------------------------------------

MAX_LENGTH = 16
LENGTH_ROWS = [
    {"prompt": "ab", "completion": "cd"},  # fits
    {"prompt": "pppp", "completion": "c" * 20},  # too long, targets left after truncation
    {"prompt": "q" * 20, "completion": "x"},  # too long, no target left after truncation
    {"prompt": "hi ", "completion": "there"},  # fits
]


def expected_tokens(row: dict, tok) -> tuple[list[int], list[int]]:
    prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    completion = tok(row["completion"], add_special_tokens=False)["input_ids"]
    return prompt + completion + [tok.eos_token_id], [0] * len(prompt) + [1] * (len(completion) + 1)


def test_truncate_counts_and_truncates(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", LENGTH_ROWS)
    config = DataConfig(train=str(path), max_length=MAX_LENGTH, too_long="truncate")
    data = build_datasets(config, tokenizer, seed=0)
    full = [expected_tokens(row, tokenizer) for row in LENGTH_ROWS]
    too_long = [len(ids) > MAX_LENGTH for ids, _ in full]
    no_target_left = [not any(mask[1:MAX_LENGTH]) for _, mask in full]
    assert too_long == [False, True, True, False] and no_target_left == [False, False, True, False]

    stats = data.stats["train"]
    assert (stats.rows, stats.format) == (4, "prompt_completion")
    assert stats.truncated == sum(too_long)
    assert stats.dropped_too_long == 0
    assert stats.dropped_no_target == sum(no_target_left)
    kept = [i for i in range(4) if not no_target_left[i]]
    assert data.train["input_ids"] == [full[i][0][:MAX_LENGTH] for i in kept]
    assert data.train["target_mask"] == [full[i][1][:MAX_LENGTH] for i in kept]
    assert data.eval is None


def test_drop_counts_and_drops(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", LENGTH_ROWS)
    config = DataConfig(train=str(path), max_length=MAX_LENGTH, too_long="drop")
    train, stats = tokenized_split(str(path), config, tokenizer)
    assert (stats.rows, stats.truncated, stats.dropped_too_long, stats.dropped_no_target) == (4, 0, 2, 0)
    assert train["input_ids"] == [expected_tokens(LENGTH_ROWS[i], tokenizer)[0] for i in (0, 3)]


def test_no_row_left_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [LENGTH_ROWS[2]])
    with pytest.raises(TunelabError, match="max_length"):
        tokenized_split(str(path), DataConfig(train=str(path), max_length=MAX_LENGTH), tokenizer)


def test_chat_rows_are_truncated_to_max_length(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}])
    full = tokenize_example({"messages": CONVERSATION}, tokenizer)
    max_length = len(full["input_ids"]) // 2  # cuts the conversation after its first assistant turn
    assert 1 in full["target_mask"][:max_length]
    train, stats = tokenized_split(str(path), DataConfig(train=str(path), max_length=max_length), tokenizer)
    assert (stats.truncated, stats.dropped_no_target) == (1, 0)
    assert train["input_ids"] == [full["input_ids"][:max_length]]
    assert train["target_mask"] == [full["target_mask"][:max_length]]


# --- the tokenization cache -----------------------------------------------------------------------


@pytest.fixture
def tokenize_calls(monkeypatch):
    """Counts the calls of the tokenizer step that `tokenized_split` makes."""
    calls = []
    real = dataset_module.tokenize_example

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "tokenize_example", counting)
    return calls


def test_second_tokenization_comes_from_the_cache(tmp_path, tokenizer, tokenize_calls, isolated_cache):
    rows = [{"prompt": f"prompt {i}", "completion": f"completion {i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = DataConfig(train=str(path), max_length=64)

    first, first_stats = tokenized_split(str(path), config, tokenizer)
    assert len(tokenize_calls) == len(rows)
    assert list((isolated_cache / "tokenized").glob("*.arrow"))  # under TUNELAB_CACHE

    second, second_stats = tokenized_split(str(path), config, tokenizer)
    assert len(tokenize_calls) == len(rows)  # not tokenized again
    assert second["input_ids"] == first["input_ids"]
    assert second["target_mask"] == first["target_mask"]
    assert second_stats == first_stats


@pytest.mark.parametrize(
    "change",
    ["content", "max_length", "train_on", "format", "tokenizer"],
)
def test_cache_is_not_reused_after_a_change(tmp_path, tokenizer, chatml_tokenizer, tokenize_calls, change):
    rows = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = DataConfig(train=str(path), max_length=512)
    tokenized_split(str(path), config, tokenizer)
    tokenized_split(str(path), config, tokenizer)
    assert len(tokenize_calls) == len(rows)

    tok = tokenizer
    if change == "content":
        write_jsonl(path, rows[::-1])
    elif change == "max_length":
        config = config.model_copy(update={"max_length": 100})  # truncates the longer conversation
    elif change == "train_on":
        config = config.model_copy(update={"train_on": "all"})
    elif change == "format":
        config = config.model_copy(update={"format": "messages"})
    else:
        tok = chatml_tokenizer
    changed, _ = tokenized_split(str(path), config, tok)
    assert len(tokenize_calls) == 2 * len(rows)
    expected = [tokenize_example(example, tok, config.train_on) for example in load_examples(path)[1]]
    assert changed["input_ids"] == [e["input_ids"][: config.max_length] for e in expected]
    assert changed["target_mask"] == [e["target_mask"][: config.max_length] for e in expected]


# --- eval split -------------------------------------------------------------------------------


def decoded_rows(data, tok) -> list[str]:
    return [tok.decode(ids) for ids in data["input_ids"]]


def test_eval_split_is_deterministic_disjoint_and_sized(tmp_path, tokenizer):
    texts = [f"row number {i}" for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    config = DataConfig(train=str(path), eval_split=0.25, max_length=64)

    data = build_datasets(config, tokenizer, seed=7)
    train, evaluation = decoded_rows(data.train, tokenizer), decoded_rows(data.eval, tokenizer)
    assert len(evaluation) == round(0.25 * len(texts)) and len(train) == len(texts) - len(evaluation)
    assert not set(train) & set(evaluation)
    assert sorted(train + evaluation) == sorted(t + "</s>" for t in texts)

    again = build_datasets(config, tokenizer, seed=7)
    assert decoded_rows(again.eval, tokenizer) == evaluation and decoded_rows(again.train, tokenizer) == train
    other_seed = build_datasets(config, tokenizer, seed=8)
    assert set(decoded_rows(other_seed.eval, tokenizer)) != set(evaluation)


def test_eval_split_leaving_no_training_rows_fails(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}])
    with pytest.raises(TunelabError, match="eval_split"):
        build_datasets(DataConfig(train=str(path), eval_split=0.9), tokenizer, seed=0)


def test_eval_file(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a train row"}])
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"text": "an eval row"}, {"text": "another"}])
    data = build_datasets(DataConfig(train=str(train_path), eval=str(eval_path)), tokenizer, seed=0)
    assert decoded_rows(data.eval, tokenizer) == ["an eval row</s>", "another</s>"]
    assert data.stats["eval"].rows == 2


# --- packing: the contract test ---------------------------------------------------------------


def packing_samples(tokenizer) -> list[dict]:
    """Six tokenized samples of different lengths and target patterns (chat, prompt/completion, text)."""
    examples = [
        {"messages": CONVERSATION},
        {"messages": CONVERSATION[1:3]},
        {"messages": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"}]},
        {"segments": [{"text": "The prompt is here.", "train": False}, {"text": " Completion!", "train": True}]},
        {"segments": [{"text": "Short text.", "train": True}]},
        {"segments": [{"text": "A somewhat longer plain text sample, for continued pretraining.", "train": True}]},
    ]
    samples = [tokenize_example(example, tokenizer) for example in examples]
    assert len({len(s["input_ids"]) for s in samples}) == len(samples)
    return samples


def reference_loss(model, sample: dict) -> torch.Tensor:
    """Plain Hugging Face forward on the sample alone, shifted cross-entropy over its target tokens."""
    ids = torch.tensor(sample["input_ids"])
    predicted = torch.tensor(sample["target_mask"][1:], dtype=torch.bool)  # the first token is never predicted
    logits = model(input_ids=ids[None]).logits[0, :-1]
    return F.cross_entropy(logits[predicted].float(), ids[1:][predicted], reduction="sum")


def row_segments(batch, row: int, pad_id: int) -> list[tuple[int, int]]:
    """(start, end) of each sample in a batch row, read off the restarting position ids."""
    real = int((batch.input_ids[row] != pad_id).sum())
    assert bool((batch.input_ids[row, real:] == pad_id).all())  # samples first, padding after
    starts = [t for t in range(real) if batch.position_ids[row, t] == 0]
    return list(zip(starts, starts[1:] + [real]))


def test_packed_loss_equals_unpacked_and_plain_forward(tiny_model):
    model, tokenizer = tiny_model
    pad_id = tokenizer.pad_token_id
    samples = packing_samples(tokenizer)
    lengths = [len(s["input_ids"]) for s in samples]
    max_length = max(max(lengths), sum(lengths) // 3)

    packed = make_batch(samples, max_length, packing=True, pad_id=pad_id)
    padded = make_batch(samples, max_length, packing=False, pad_id=pad_id)
    assert packed.input_ids.shape[0] < len(samples)
    assert packed.input_ids.shape[1] <= max_length
    assert padded.input_ids.shape[0] == len(samples)
    n_predicted = sum(sum(s["target_mask"][1:]) for s in samples)
    assert packed.n_targets == padded.n_targets == n_predicted
    assert packed.n_tokens == padded.n_tokens == sum(lengths)

    # each sample sits whole in one row, its positions restart at 0, and no label crosses into a neighbour
    found = []
    for row in range(packed.input_ids.shape[0]):
        segments = row_segments(packed, row, pad_id)
        for start, end in segments:
            ids = packed.input_ids[row, start:end]
            assert packed.position_ids[row, start:end].tolist() == list(range(end - start))
            sample = next(s for s in samples if s["input_ids"] == ids.tolist())
            found.append(samples.index(sample))
            labels = packed.labels[row, start:end]
            expected = [t if m else IGNORE for t, m in zip(sample["input_ids"][1:], sample["target_mask"][1:])]
            assert labels.tolist() == expected + [IGNORE]  # the last token predicts nothing
            # a query attends to earlier tokens of its own sample only
            allowed = packed.attention_mask[row, 0, start:end]
            assert allowed[:, start:end].tolist() == torch.ones(end - start, end - start).tril().bool().tolist()
            assert not allowed[:, :start].any() and not allowed[:, end:].any()
        real = segments[-1][1]
        assert bool((packed.labels[row, real:] == IGNORE).all())
    assert sorted(found) == list(range(len(samples)))

    with torch.no_grad():
        packed_loss = causal_lm_loss(model, packed)
        padded_loss = causal_lm_loss(model, padded)
        separate = [causal_lm_loss(model, make_batch([s], max_length, False, pad_id)) for s in samples]
        reference = [reference_loss(model, s) for s in samples]

        # the check can fail: one plain causal mask over a packed row lets samples see each other
        width = packed.input_ids.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool).tril().expand(packed.input_ids.shape[0], 1, width, width)
        leaky_loss = causal_lm_loss(model, dataclasses.replace(packed, attention_mask=causal))

    for separate_loss, reference_sample_loss in zip(separate, reference):
        assert separate_loss.item() == pytest.approx(reference_sample_loss.item(), rel=1e-5)
    total = sum(r.item() for r in reference)
    assert packed_loss.item() == pytest.approx(total, rel=1e-5)
    assert padded_loss.item() == pytest.approx(total, rel=1e-5)
    assert packed_loss.item() == pytest.approx(sum(s.item() for s in separate), rel=1e-5)
    assert abs(leaky_loss.item() - total) > 1e-4 * total


@pytest.mark.parametrize("capacity", [8, 20, 64, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_rows_fits_capacity_and_uses_every_sample_once(capacity, seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, capacity) for _ in range(50)]
    rows = pack_rows(lengths, capacity)
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert len(rows) >= math.ceil(sum(lengths) / capacity)
    assert len(rows) <= len(lengths)


def test_pack_rows_fills_rows():
    # 6 + 4 and 5 + 5 fill two rows of 10 exactly
    rows = pack_rows([6, 5, 5, 4], 10)
    assert sorted(sorted(row) for row in rows) == [[0, 3], [1, 2]]
