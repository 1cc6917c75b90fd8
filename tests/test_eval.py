"""Evaluation: answer scoring, generation cases, batched generation, and `evaluate()` end to end.

Everything runs on the in-process `tiny-random-llama` in fp32 on the CPU.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

import tunelab
from helpers import read_report, tiny_run_config, write_jsonl, write_records_data, write_yaml
from tunelab.config.schema import ModelConfig
from tunelab.data.dataset import build_datasets
from tunelab.data.formats import load_examples
from tunelab.errors import TunelabError
from tunelab.eval.evaluate import evaluate, generation_cases
from tunelab.generation import generate
from tunelab.models.loader import load_model
from tunelab.runs import load_run
from tunelab.scoring.answers import exact_match, json_scores, normalize_text, parse_json_object, score_prediction

# The module, not the function `tunelab.eval.evaluate` that shadows it as a package attribute.
evaluate_module = importlib.import_module("tunelab.eval.evaluate")

TINY_SPECIAL_IDS = (0, 1, 2)  # <pad>, <s>, </s> of the tiny tokenizer
TINY_EOS = 2
METRIC_KEYS = {"eval_loss", "eval_ppl", "exact_match", "json_valid", "json_record_match", "json_field_accuracy"}


# --- scoring ------------------------------------------------------------------------------------------


def test_normalize_text_ignores_case_and_whitespace_only():
    assert normalize_text("  Hello\t\n  WORLD  ") == "hello world"
    assert normalize_text("Straße") == normalize_text("STRASSE")  # casefold, not lower
    assert normalize_text("hello, world") != normalize_text("hello world")  # punctuation counts


def test_exact_match():
    assert exact_match("Paris\n", "  paris")
    assert exact_match("New   York", "new york")
    assert not exact_match("Paris.", "Paris")
    assert not exact_match("", "Paris")


@pytest.mark.parametrize(
    "text",
    [
        'Sure! Here is the record: {"name": "Ana", "age": 31} Hope that helps.',
        '```json\n{"name": "Ana", "age": 31}\n```',
        'set {x} first, then {"name": "Ana", "age": 31}',  # a brace that starts no JSON is skipped
        '{"name": "Ana", "age": 31}',
    ],
)
def test_parse_json_object_finds_the_object(text):
    assert parse_json_object(text) == {"name": "Ana", "age": 31}


def test_parse_json_object_keeps_nesting():
    assert parse_json_object('x {"a": {"b": [1, 2]}, "c": null} y') == {"a": {"b": [1, 2]}, "c": None}


@pytest.mark.parametrize("text", ["", "no json here", '{"name": "Ana", "age": 31', "{'name': 'Ana'}", "[1, 2, 3]"])
def test_parse_json_object_invalid_is_none(text):
    assert parse_json_object(text) is None


REFERENCE = {"name": "Ana Silva", "age": 33, "city": "Porto", "date": "2024-01-02", "amount": 12.5}


def test_json_scores_perfect_record():
    scores = json_scores(json.dumps(REFERENCE), REFERENCE)
    assert scores == {"json_valid": 1.0, "json_record_match": 1.0, "json_field_accuracy": 1.0}


def test_json_scores_extra_key_breaks_the_record_not_the_fields():
    scores = json_scores(json.dumps(REFERENCE | {"currency": "EUR"}), REFERENCE)
    assert scores["json_valid"] == 1.0
    assert scores["json_record_match"] == 0.0
    assert scores["json_field_accuracy"] == 1.0


def test_json_scores_wrong_and_missing_fields():
    predicted = dict(REFERENCE, city="Lisbon")
    del predicted["amount"]
    scores = json_scores(json.dumps(predicted), REFERENCE)
    assert scores["json_record_match"] == 0.0
    assert scores["json_field_accuracy"] == pytest.approx(3 / 5)


def test_json_scores_unparseable_prediction():
    assert json_scores("Ana Silva, 33, Porto", REFERENCE) == {
        "json_valid": 0.0,
        "json_record_match": 0.0,
        "json_field_accuracy": 0.0,
    }


def test_json_scores_numbers_compare_by_value():
    assert json_scores('{"age": 33.0}', {"age": 33})["json_record_match"] == 1.0
    assert json_scores('{"age": 33}', {"age": 33.0})["json_record_match"] == 1.0
    assert json_scores('{"amount": 1299.99}', {"amount": 1299.99})["json_record_match"] == 1.0
    assert json_scores('{"age": 34}', {"age": 33})["json_record_match"] == 0.0
    assert json_scores('{"amount": 12.51}', {"amount": 12.5})["json_record_match"] == 0.0


def test_json_scores_strings_compare_normalized():
    assert json_scores('{"city": " porto "}', {"city": "Porto"})["json_record_match"] == 1.0
    assert json_scores('{"city": "Portugal"}', {"city": "Porto"})["json_record_match"] == 0.0


def test_json_scores_bools_are_not_numbers():
    assert json_scores('{"paid": true}', {"paid": True})["json_record_match"] == 1.0
    assert json_scores('{"paid": false}', {"paid": False})["json_record_match"] == 1.0
    assert json_scores('{"paid": 1}', {"paid": True})["json_record_match"] == 0.0
    assert json_scores('{"paid": true}', {"paid": 1})["json_record_match"] == 0.0
    assert json_scores('{"paid": 0}', {"paid": False})["json_record_match"] == 0.0
    assert json_scores('{"paid": false}', {"paid": True})["json_record_match"] == 0.0


def test_score_prediction_adds_json_scores_only_for_json_references():
    assert set(score_prediction("Paris", "Paris")) == {"exact_match"}
    assert score_prediction("Paris", "paris")["exact_match"] == 1.0
    reference = json.dumps(REFERENCE)
    scores = score_prediction("Here you go: " + reference, reference)
    assert scores["exact_match"] == 0.0
    assert scores["json_record_match"] == 1.0


# --- generation cases ---------------------------------------------------------------------------------


def test_generation_cases_per_format(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    chat = [
        system,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    ends_with_user = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    _, chat_examples = load_examples(write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}, {"messages": ends_with_user}]))
    assert generation_cases(chat_examples) == [(chat[:-1], "Paris")]  # a chat ending in a user turn has no answer

    _, completion_examples = load_examples(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "Sky:", "completion": " blue"}]))
    assert generation_cases(completion_examples) == [("2 + 2 =", " 4"), ("Sky:", " blue")]

    _, text_examples = load_examples(write_jsonl(tmp_path / "text.jsonl", [{"text": "Once upon a time."}]))
    assert generation_cases(text_examples) == []


# --- generate() ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chaotic_tiny():
    """tiny-random-llama with large random weights: its greedy outputs vary from token to token, so
    any error in padding, positions or caching changes them (the stock init repeats one token)."""
    model, tokenizer = load_model(ModelConfig(name="tiny-random-llama", device="cpu", dtype="float32"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model, tokenizer


@pytest.fixture
def ids_decoding(chaotic_tiny, monkeypatch):
    """Make the tokenizer decode to space-separated token ids (special tokens dropped as the real
    decode with skip_special_tokens does): byte tokens that are not whole UTF-8 characters all
    decode to '�', which would hide a wrong token."""
    _, tokenizer = chaotic_tiny

    def decode(ids, skip_special_tokens=False, **_):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in TINY_SPECIAL_IDS))

    monkeypatch.setattr(tokenizer, "decode", decode)


PROMPTS = [
    "Hi",
    "A much longer prompt about a payment of 1,299.00 EUR made in Lisbon.",
    [{"role": "user", "content": "Extract: Ana Silva, 31, Porto."}],
    "mid length text",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
]


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A chat prompt through the chat template (which adds any special tokens), text as it is."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def reference_greedy(model, tokenizer, prompt, max_new_tokens: int) -> str:
    """Greedy decoding the slow, obvious way: one unpadded sequence, a full forward per token."""
    ids = prompt_ids(tokenizer, prompt)
    new = []
    for _ in range(max_new_tokens):
        next_id = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        new.append(next_id)
        if next_id == TINY_EOS:
            break
    return " ".join(str(i) for i in new if i not in TINY_SPECIAL_IDS)


def test_generate_batched_equals_one_by_one_and_reference(chaotic_tiny, ids_decoding):
    model, tokenizer = chaotic_tiny
    assert len({len(prompt_ids(tokenizer, p)) for p in PROMPTS}) == len(PROMPTS)  # every row padded differently
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10)
    one_by_one = [generate(model, tokenizer, [p], max_new_tokens=10)[0] for p in PROMPTS]
    expected = [reference_greedy(model, tokenizer, p, 10) for p in PROMPTS]
    assert batched == expected
    assert one_by_one == expected
    assert len(set(expected)) == len(expected)  # the outputs really depend on the prompt
    # Small batches (several chunks, each padded differently) give the same answers.
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2) == expected


def test_generate_greedy_is_deterministic(chaotic_tiny, ids_decoding):
    model, tokenizer = chaotic_tiny
    first = generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    torch.manual_seed(123)  # greedy output does not depend on the global RNG
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=8) == first


def test_generate_respects_max_new_tokens(chaotic_tiny, ids_decoding):
    model, tokenizer = chaotic_tiny
    outputs = generate(model, tokenizer, PROMPTS, max_new_tokens=5)
    assert all(len(o.split()) <= 5 for o in outputs)
    assert max(len(o.split()) for o in outputs) == 5  # not cut shorter than asked


def test_generate_stops_at_the_models_eos_ids(chaotic_tiny, ids_decoding, monkeypatch):
    """A token listed in the model's generation_config.eos_token_id ends that sequence (and only
    that one: the rest of the batch keeps going, and the padding after the stop is not decoded)."""
    model, tokenizer = chaotic_tiny
    free = [o.split() for o in generate(model, tokenizer, PROMPTS, max_new_tokens=10)]
    long_prompt = 1
    stop_at = next(i for i in range(2, 10) if free[long_prompt][i] not in free[long_prompt][:i])
    stop_id = int(free[long_prompt][stop_at])
    monkeypatch.setattr(model.generation_config, "eos_token_id", [TINY_EOS, stop_id])
    stopped = [o.split() for o in generate(model, tokenizer, PROMPTS, max_new_tokens=10)]
    for free_tokens, stopped_tokens in zip(free, stopped):
        cut = free_tokens.index(str(stop_id)) + 1 if str(stop_id) in free_tokens else len(free_tokens)
        assert stopped_tokens == free_tokens[:cut]
    assert stopped[long_prompt] == free[long_prompt][: stop_at + 1]


def test_generate_sampling_is_seeded_and_leaves_global_rng_alone(chaotic_tiny, ids_decoding):
    model, tokenizer = chaotic_tiny
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # a different global RNG: same seed, same samples
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7) == first
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, seed=8) != first
    assert first != generate(model, tokenizer, PROMPTS, max_new_tokens=8)  # it did sample


def test_generate_decodes_real_text(chaotic_tiny):
    """With the real decode: one string per prompt, no padding or special-token text in it."""
    model, tokenizer = chaotic_tiny
    outputs = generate(model, tokenizer, PROMPTS, max_new_tokens=6)
    assert len(outputs) == len(PROMPTS) and all(isinstance(o, str) for o in outputs)
    assert not any(token in o for o in outputs for token in ("<pad>", "<s>", "</s>"))


def test_generate_cuts_at_stop_strings_and_keeps_code_indent(chaotic_tiny):
    """With a stop string (taken from one free completion), each completion is its free text cut
    before the string's first occurrence; the others run on unchanged. keep_indent keeps leading
    whitespace that the default strips."""
    model, tokenizer = chaotic_tiny
    free = generate(model, tokenizer, PROMPTS, max_new_tokens=16, keep_indent=True)
    text = free[1]
    start = next(
        j
        for j in range(2, len(text) - 1)
        if text[j : j + 2].isascii() and text[j : j + 2].isprintable() and text[j : j + 2].strip() == text[j : j + 2] and text.find(text[j : j + 2]) == j
    )
    stop = text[start : start + 2]
    stopped = generate(model, tokenizer, PROMPTS, max_new_tokens=16, keep_indent=True, stop=[stop])
    assert stopped == [f[: f.find(stop)].rstrip() if stop in f else f for f in free]
    assert stopped[1] == text[:start].rstrip() and len(stopped[1]) < len(text)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=16) == [f.strip() for f in free]
    assert any(f != f.lstrip() for f in free)  # some completion starts with whitespace that keep_indent kept


# --- evaluate() ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records(module_cache, tmp_path_factory):
    return write_records_data(tmp_path_factory.mktemp("records"), n_train=16, n_eval=4, seed=0)


@pytest.fixture(scope="module")
def run_eval(module_cache, tiny_run):
    return evaluate(tiny_run, max_new_tokens=4)


@torch.no_grad()
def mean_target_loss(model, samples) -> float:
    """Cross-entropy per target token, one unpadded sample at a time (no packing, no batching)."""
    total, count = 0.0, 0
    for sample in samples:
        ids = torch.tensor([sample["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(sample["target_mask"][1:], dtype=torch.bool)
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total += float(losses[targets].sum())
        count += int(targets.sum())
    return total / count


def eval_rows(eval_file: Path) -> list[dict]:
    return [json.loads(line) for line in eval_file.read_text().splitlines()]


def test_evaluate_run_scores_base_and_tuned(tiny_run, run_eval, records):
    _, eval_file = records
    saved = json.loads((tiny_run / "eval.json").read_text())
    assert saved["n"] == 4
    for label in ("base", "tuned"):
        metrics = saved[label]
        assert METRIC_KEYS <= set(metrics)
        assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
        assert metrics["eval_ppl"] == pytest.approx(math.exp(metrics["eval_loss"]))
        for key in ("exact_match", "json_valid", "json_record_match", "json_field_accuracy"):
            assert 0.0 <= metrics[key] <= 1.0
    assert saved["tuned"]["eval_loss"] != saved["base"]["eval_loss"]
    # The run's own end-of-training eval saw the same model and data.
    assert saved["tuned"]["eval_loss"] == pytest.approx(read_report(tiny_run)["eval_loss"], rel=1e-5)


def test_evaluate_eval_loss_matches_a_plain_forward(tiny_run, run_eval):
    """eval_loss (packed batches) equals the loss computed one sample at a time."""
    config = tunelab.load_config(tiny_run / "config.yaml")
    run = load_run(tiny_run)
    samples = build_datasets(config.data, run.tokenizer, config.train.seed).eval
    assert run_eval["tuned"]["eval_loss"] == pytest.approx(mean_target_loss(run.model, samples), rel=1e-5)
    base, _ = load_model(config.model)
    assert run_eval["base"]["eval_loss"] == pytest.approx(mean_target_loss(base, samples), rel=1e-5)


def test_evaluate_writes_one_sample_line_per_case(tiny_run, run_eval, records):
    _, eval_file = records
    lines = [json.loads(line) for line in (tiny_run / "eval_samples.jsonl").read_text().splitlines()]
    rows = eval_rows(eval_file)
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        assert line["prompt"] == row["messages"][:-1]
        assert line["reference"] == row["messages"][-1]["content"]
        assert isinstance(line["base"], str) and isinstance(line["tuned"], str)
    # The mean exact match is the share of lines whose prediction equals the reference.
    for label in ("base", "tuned"):
        hits = [" ".join(x[label].split()).casefold() == " ".join(x["reference"].split()).casefold() for x in lines]
        assert run_eval[label]["exact_match"] == pytest.approx(sum(hits) / len(hits))


def fake_generate(predict):
    """A stand-in for `generate` that answers each prompt with `predict(prompt)`."""

    def generate(model, tokenizer, prompts, max_new_tokens=128, progress=None, **_):
        if progress is not None:
            progress(len(prompts))
        return [predict(p) for p in prompts]

    return generate


def write_config(tmp_path: Path, records, **sections) -> Path:
    train_file, eval_file = records
    return write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", train_file, eval_file, **sections))


def test_evaluate_averages_generation_scores(tmp_path, records, monkeypatch):
    """Known predictions (via a stand-in generator) give the means worked out by hand."""
    _, eval_file = records
    answers = {row["messages"][1]["content"]: row["messages"][2]["content"] for row in eval_rows(eval_file)}
    sentences = list(answers)

    def predict(prompt):
        sentence = prompt[-1]["content"]
        reference = answers[sentence]
        position = sentences.index(sentence)
        if position == 0:
            return reference  # all right
        if position == 1:
            return "Sure: " + reference  # right record, not an exact match
        if position == 2:
            return json.dumps(dict(json.loads(reference), city="Atlantis"))  # 4 of 5 fields
        return "I cannot help with that."  # no JSON

    monkeypatch.setattr(evaluate_module, "generate", fake_generate(predict))
    results = evaluate(write_config(tmp_path, records))
    base = results["base"]
    assert base["exact_match"] == pytest.approx(1 / 4)
    assert base["json_valid"] == pytest.approx(3 / 4)
    assert base["json_record_match"] == pytest.approx(2 / 4)
    assert base["json_field_accuracy"] == pytest.approx((1 + 1 + 4 / 5 + 0) / 4)


@pytest.mark.parametrize("json_first", [True, False])
def test_evaluate_json_scores_cover_only_json_references(tmp_path, monkeypatch, json_first):
    """With some answers JSON and some plain text, the JSON scores average over the JSON answers,
    whatever the row order."""
    plain = [{"instruction": "Capital of France?", "output": "Paris"}, {"instruction": "Capital of Peru?", "output": "Lima"}]
    as_json = {"instruction": "As JSON: Ana is 31.", "output": '{"name": "Ana", "age": 31}'}
    rows = [as_json, *plain] if json_first else [*plain, as_json]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    answers = {row["instruction"]: row["output"] for row in rows}
    monkeypatch.setattr(evaluate_module, "generate", fake_generate(lambda prompt: answers[prompt[-1]["content"]]))
    results = evaluate(write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", data, data)))
    assert results["base"]["exact_match"] == 1.0
    assert results["base"]["json_valid"] == 1.0
    assert results["base"]["json_record_match"] == 1.0
    assert results["base"]["json_field_accuracy"] == 1.0


def test_evaluate_config_file_scores_base_only(tmp_path, records, run_eval):
    config_path = write_config(tmp_path, records)
    results = evaluate(config_path, max_new_tokens=4, max_samples=2)
    assert "base" in results and "tuned" not in results
    assert results["n"] == 2
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())  # the config's output dir
    assert saved["base"] == results["base"]
    lines = (tmp_path / "out" / "eval_samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 and set(json.loads(lines[0])) == {"prompt", "reference", "base"}
    assert math.isfinite(results["base"]["eval_loss"])


def test_evaluate_config_file_matches_run_base_scores(tmp_path, records, run_eval):
    results = evaluate(write_config(tmp_path, records), max_new_tokens=4, out=tmp_path / "elsewhere")
    assert results["base"]["eval_loss"] == pytest.approx(run_eval["base"]["eval_loss"], rel=1e-6)
    assert results["base"]["exact_match"] == run_eval["base"]["exact_match"]
    assert (tmp_path / "elsewhere" / "eval.json").is_file()
    assert not (tmp_path / "out").exists()


def test_evaluate_eval_split_scores_held_out_train_rows(tmp_path, records, monkeypatch):
    train_file, _ = records
    config_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", train_file, data={"eval_split": 0.25}))
    monkeypatch.setattr(evaluate_module, "generate", fake_generate(lambda prompt: ""))
    results = evaluate(config_path)
    assert results["n"] == 4  # a quarter of 16 rows
    lines = [json.loads(line) for line in (tmp_path / "out" / "eval_samples.jsonl").read_text().splitlines()]
    by_sentence = {row["messages"][1]["content"]: row["messages"][2]["content"] for row in eval_rows(train_file)}
    assert len(lines) == 4
    for line in lines:  # each case pairs a train row's prompt with that same row's answer
        assert by_sentence[line["prompt"][-1]["content"]] == line["reference"]


def test_evaluate_without_eval_data_fails(tmp_path, records):
    train_file, _ = records
    config_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", train_file))
    with pytest.raises(TunelabError, match="data.eval"):
        evaluate(config_path)
    assert not (tmp_path / "out").exists()


def test_evaluate_missing_target_fails(tmp_path):
    with pytest.raises(TunelabError, match="not found"):
        evaluate(tmp_path / "no-such-run")
