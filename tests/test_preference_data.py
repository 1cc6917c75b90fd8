"""Preference rows: TRL's layouts are read, bad rows stop the run at file:line before any write,
prompts are tokenized once and shared, and long rows are cut prompt-first from the left."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

import tunelab
from helpers import read_report, tiny_run_config, write_jsonl
from tunelab.config import DataConfig, ModelConfig
from tunelab.data.dataset import tokenized_split
from tunelab.data.preference import fit_to_length, load_preference_examples, tokenize_preference
from tunelab.errors import TunelabError
from tunelab.models.loader import ensure_chat_template, load_tokenizer

PLAIN = {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Rome."}
CHAT = {
    "prompt": [{"role": "user", "content": "Capital of France?"}],
    "chosen": [{"role": "assistant", "content": "Paris."}],
    "rejected": [{"role": "assistant", "content": "Rome."}],
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name="tiny-random-llama"))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "rejected": "r"}, "missing field 'chosen'"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen' must be a string"),
        ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "field 'chosen' is empty"),
        ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
        ({"prompt": CHAT["prompt"], "chosen": "Paris", "rejected": CHAT["rejected"]}, "'chosen' must be a non-empty list of messages"),
        ({"prompt": CHAT["prompt"], "chosen": [{"role": "user", "content": "x"}], "rejected": CHAT["rejected"]}, "must end with an assistant message"),
        ({"prompt": [{"role": "robot", "content": "x"}], "chosen": CHAT["chosen"], "rejected": CHAT["rejected"]}, "unknown role 'robot'"),
    ],
)
def test_a_bad_preference_row_is_named_by_file_line_and_field(row, message, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PLAIN, row])
    with pytest.raises(TunelabError, match=f"pairs.jsonl:2: .*{message}"):
        load_preference_examples(str(path), "preference")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "completion": "c", "label": "yes"}, "field 'label' must be true or false"),
        ({"prompt": "p", "completion": "c"}, "missing field 'label'"),
        ({"prompt": "p", "completion": "", "label": True}, "field 'completion' is empty"),
    ],
)
def test_a_bad_unpaired_row_is_named_by_file_line_and_field(row, message, tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": False}, row])
    with pytest.raises(TunelabError, match=f"kto.jsonl:2: {message}"):
        load_preference_examples(str(path), "unpaired")


def test_a_bad_row_stops_the_run_before_any_write(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PLAIN, {"prompt": "p", "chosen": None, "rejected": "r"}])
    config = tiny_run_config(tmp_path / "run", path, objective={"name": "dpo"})
    with pytest.raises(TunelabError, match=r"pairs.jsonl:2: missing field 'chosen'"):
        tunelab.train(config)
    assert not (tmp_path / "run").exists()


def test_identical_chosen_and_rejected_are_counted_and_warned(tmp_path, capsys):
    rows = [PLAIN, {**PLAIN, "rejected": PLAIN["chosen"]}, {**PLAIN, "prompt": "Say", "rejected": PLAIN["chosen"]}]
    config = tiny_run_config(tmp_path / "run", write_jsonl(tmp_path / "pairs.jsonl", rows), objective={"name": "dpo"}, train={"max_steps": 1})
    tunelab.train(config)
    assert read_report(config["output"])["data"]["train"]["identical_pairs"] == 2
    assert "2 rows have chosen identical to rejected" in capsys.readouterr().err


def test_the_three_trl_layouts_are_read(tmp_path):
    implicit = {"chosen": CHAT["prompt"] + CHAT["chosen"], "rejected": CHAT["prompt"] + CHAT["rejected"]}
    for rows, expected in [([PLAIN], "preference:plain"), ([CHAT], "preference:conversational"), ([implicit], "preference:conversational")]:
        data_format, examples, _ = load_preference_examples(str(write_jsonl(tmp_path / "p.jsonl", rows)), "preference")
        assert data_format == expected
    assert examples[0] == CHAT  # the shared leading turns became the prompt


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer that merges 'a' + 'b' into one token: tokenizing prompt + completion as one
    text would move the boundary."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "x": 5, "ab": 6, "y": 7}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    ensure_chat_template(tokenizer)
    return tokenizer


def test_the_prompt_is_tokenized_once_and_shared_even_where_tokens_would_merge():
    tokenizer = merging_tokenizer()
    assert tokenizer("xa" + "b")["input_ids"] != tokenizer("xa")["input_ids"] + tokenizer("b", add_special_tokens=False)["input_ids"]
    tokens = tokenize_preference({"prompt": "xa", "chosen": "b", "rejected": "y"}, tokenizer, "preference")
    assert tokens["prompt_ids"] == tokenizer("xa")["input_ids"]  # the prompt the model is given
    assert tokens["chosen_ids"] == [4, tokenizer.eos_token_id]  # 'b' stays its own token, then EOS
    assert tokens["rejected_ids"] == [7, tokenizer.eos_token_id]


def test_conversational_completions_end_with_the_end_of_turn_token(tokenizer):
    tokens = tokenize_preference(CHAT, tokenizer, "preference")
    full = tokenizer.apply_chat_template(CHAT["prompt"] + CHAT["chosen"], tokenize=False)
    assert tokenizer.decode(tokens["prompt_ids"] + tokens["chosen_ids"]) == full.rstrip()
    end_of_turn = tokenizer.decode(tokens["chosen_ids"][-3:])
    assert "Paris." in tokenizer.decode(tokens["chosen_ids"]) and end_of_turn.strip() and full.rstrip().endswith(end_of_turn)


def test_long_rows_lose_prompt_tokens_from_the_left_then_completion_tokens():
    row = {"prompt_ids": list(range(10, 30)), "chosen_ids": [1, 2, 3, 4], "rejected_ids": [5, 6]}
    fitted, cut = fit_to_length(row, 12)
    assert cut and fitted == {"prompt_ids": list(range(22, 30)), "chosen_ids": [1, 2, 3, 4], "rejected_ids": [5, 6]}
    fitted, cut = fit_to_length({**row, "chosen_ids": list(range(40, 60))}, 12)
    assert fitted["prompt_ids"] == [29] and fitted["chosen_ids"] == list(range(40, 51)) and fitted["rejected_ids"] == [5, 6]
    assert fit_to_length(row, 26) == (row, False)


@pytest.mark.parametrize("too_long", ["truncate", "drop"])
def test_cut_and_dropped_rows_are_counted(too_long, tokenizer, tmp_path):
    rows = [PLAIN, {**PLAIN, "prompt": "word " * 100}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dataset, stats = tokenized_split(str(path), DataConfig(train=str(path), max_length=64, too_long=too_long), tokenizer, "preference")
    if too_long == "truncate":
        assert (stats.truncated, stats.dropped_too_long, len(dataset)) == (1, 0, 2)
        longest = max(len(s["prompt_ids"]) + max(len(s["chosen_ids"]), len(s["rejected_ids"])) for s in dataset)
        assert longest == 64
    else:
        assert (stats.truncated, stats.dropped_too_long, len(dataset)) == (0, 1, 1)
    assert json.loads(json.dumps(stats.as_dict()))["rows"] == 2
