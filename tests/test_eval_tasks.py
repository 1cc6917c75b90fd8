"""Evaluation tasks (`tunelab eval TARGET --task T`): task loading, every scorer, and the targets.

The likelihood scorers are checked against log-likelihoods computed here, one unpadded forward pass
per sequence; the generation scorers run with a stubbed `generate` whose outputs are known, so each
expected metric is counted by hand. Everything uses the in-process `tiny-random-llama` on the CPU.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import write_jsonl, write_yaml
from peft_oracle import train_tiny_run
from tunelab.cli.main import app
from tunelab.errors import TunelabError
from tunelab.eval import harness
from tunelab.eval.harness import evaluate_task, load_target, run_task
from tunelab.eval.tasks import BUILTIN, load_task, read_task_rows, task_samples
from tunelab.models.tiny import tiny_llama, tiny_tokenizer
from tunelab.scoring.answers import fenced_code, final_number, macro_f1, numbers_equal

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EVAL_KEYS = {"task", "type", "n", "metrics", "samples_file", "seconds"}


@pytest.fixture(scope="module")
def tiny():
    """The tiny model and its byte-level tokenizer (no chat template: prompts stay plain text)."""
    tokenizer = tiny_tokenizer()
    return tiny_llama(len(tokenizer)).eval(), tokenizer


# ---- Independent references --------------------------------------------------------------------


@torch.no_grad()
def hand_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt) from one unpadded forward pass, summed token by token."""
    context = tokenizer(prompt)["input_ids"]
    tokens = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([context + tokens])).logits[0].double()
    logp = logits.log_softmax(-1)
    return sum(logp[len(context) + j - 1, token].item() for j, token in enumerate(tokens))


@torch.no_grad()
def hand_perplexity(model, tokenizer, texts: list[str]) -> tuple[float, int]:
    """exp of the token-weighted mean of each text's own HF loss (mean over its len-1 predictions)."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        loss = model(input_ids=ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count), count


def hand_macro_f1(predicted: list, gold: list, labels: list) -> float:
    """Precision/recall per label, their harmonic mean (0 where undefined), averaged over labels."""
    scores = []
    for label in labels:
        tp = sum(1 for p, g in zip(predicted, gold) if p == label and g == label)
        predicted_n = sum(1 for p in predicted if p == label)
        gold_n = sum(1 for g in gold if g == label)
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / gold_n if gold_n else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


def pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


class StubGenerate:
    """Stands in for `tunelab.eval.harness.generate`: `answer(prompt, occurrence)` gives each output;
    records every call's prompts and options."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, model, tokenizer, prompts, **options):
        self.calls.append((list(prompts), options))
        seen: Counter = Counter()
        outputs = []
        for prompt in prompts:
            outputs.append(self.answer(prompt, seen[prompt_key(prompt)]))
            seen[prompt_key(prompt)] += 1
        options["progress"](len(prompts))
        return outputs


def stub_generate(monkeypatch, answer) -> StubGenerate:
    stub = StubGenerate(answer)
    monkeypatch.setattr(harness, "generate", stub)
    return stub


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


# ---- Scoring functions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 72", "72"),
        ("Step 1: 5 * 2 = 10\n#### 1,234\nThe answer is 99", "1234"),  # the number right after ####
        ("So the total is 3, then 5, then finally 42.", "42"),  # no ####: the last number
        ("It costs $1,250,000 in total.", "1250000"),
        ("The answer is $18.00.", "18"),
        ("#### 18.0", "18"),
        ("about 0.50 of it", "0.5"),
        ("#### 100", "100"),  # trailing zeros of an integer stay
        ("The temperature fell to -5 degrees", "-5"),
        ("#### -3.50", "-3.5"),
        ("#### $ 7", "7"),
        ("See pages 3-4", "4"),  # a hyphen between numbers is a range, not a minus sign
        ("so 12-5=7", "7"),
        ("(2)-3", "3"),
        ("I have no idea.", None),
        ("", None),
        ("#### unknown", None),  # after ####, nothing: the numbers before do not count
    ],
)
def test_final_number(text, expected):
    assert final_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Here it is:\n```python\ndef f():\n    return 1\n```\nIt returns 1.", "def f():\n    return 1"),
        ("```py\nx = 1\n```", "x = 1"),
        ("```\nx = 1\n```", "x = 1"),  # a bare fence
        ("```python\nx = 1\n```\n```python\ny = 2\n```", "x = 1"),  # the first block only
        ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # cut off before the closing fence
        ("def f():\n    return 1", "def f():\n    return 1"),  # no fence: all of it
    ],
)
def test_fenced_code(text, expected):
    assert fenced_code(text) == expected


def test_numbers_equal():
    assert numbers_equal("18", "18")
    assert numbers_equal("0.5", ".5")
    assert numbers_equal("1e3", "1000")
    assert not numbers_equal("18", "19")
    assert not numbers_equal(None, "18")
    assert not numbers_equal("18", None)
    assert not numbers_equal("abc", "18")


def test_macro_f1_of_a_known_confusion():
    """gold a a a b b c / predicted a a b b c c:
    a: P=2/2 R=2/3 F1=0.8; b: P=1/2 R=1/2 F1=0.5; c: P=1/2 R=1/1 F1=2/3; an absent label d: 0."""
    gold = ["a", "a", "a", "b", "b", "c"]
    predicted = ["a", "a", "b", "b", "c", "c"]
    assert macro_f1(predicted, gold, ["a", "b", "c"]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert macro_f1(predicted, gold, ["a", "b", "c", "d"]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)
    assert macro_f1(gold, gold, ["a", "b", "c"]) == 1.0
    assert macro_f1(["b"] * 6, gold, ["a", "b", "c"]) == pytest.approx(0.5 / 3)  # b: P=2/6 R=1 F1=0.5; a, c: 0


# ---- Built-in tasks and task files -------------------------------------------------------------


@pytest.mark.parametrize("name", ["gsm8k", "sst2"])
def test_builtin_tasks_that_need_data_say_pass_data(name):
    with pytest.raises(TunelabError, match="--data"):
        load_task(name)


def test_builtin_tasks_load_with_data(tmp_path):
    data = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    task = load_task("gsm8k", data)
    assert (task.name, task.type, task.data, task.max_new_tokens) == ("gsm8k", "math_exact", str(data), 320)
    sst2 = load_task("sst2", tmp_path / "dev.tsv", ["max_samples=5"])
    assert (sst2.type, sst2.columns, sst2.labels, sst2.max_samples) == ("classification", ["label", "sentence"], {"0": "negative", "1": "positive"}, 5)
    quickstart = load_task("quickstart")
    assert quickstart.type == "json_fields" and quickstart.data is None


def test_humaneval_loads_its_164_problems():
    task = load_task("humaneval")
    assert task.type == "code_pass_at_k" and task.data.endswith("HumanEval.jsonl.gz")
    samples = task_samples(task, chat=False)
    assert len(samples) == 164
    assert [s.id for s in samples[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert all(s.prompt == s.row["prompt"] and "def check(" in s.row["test"] and s.row["entry_point"] for s in samples)


def test_unknown_task_name_lists_the_builtins():
    with pytest.raises(TunelabError) as err:
        load_task("no-such-task")
    assert "no-such-task" in str(err.value)
    assert all(name in str(err.value) for name in BUILTIN)


def test_unknown_key_in_a_task_yaml_names_its_line(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text('type: classification\ndata: dev.tsv\nlabels: {"0": a, "1": c}\ntemprature: 0.5\n')
    with pytest.raises(TunelabError) as err:
        load_task(path)
    assert f"{path}:4" in str(err.value)
    assert "`temprature`: unknown key" in str(err.value)


def test_task_yaml_reads_data_relative_to_itself_and_overrides(tmp_path):
    folder = tmp_path / "tasks"
    path = write_yaml(folder / "mine.yaml", {"type": "perplexity", "data": "texts.jsonl"})
    task = load_task(path, overrides=["batch_size=3"])
    assert task.name == "mine"  # the file's stem
    assert task.data == str((folder / "texts.jsonl").resolve())
    assert task.batch_size == 3
    assert load_task(path, data=tmp_path / "other.jsonl").data == str(tmp_path / "other.jsonl")
    with pytest.raises(TunelabError, match="command-line override"):
        load_task(path, overrides=["batch_size=0"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"type": "classification"}, "needs `labels`"),
        ({"type": "code_pass_at_k", "samples": 2, "k": [1, 5], "temperature": 0.8}, "pass@5 needs samples >= 5"),
        ({"type": "code_pass_at_k", "samples": 4, "k": [1], "temperature": 0.0}, "set a temperature"),
        ({"type": "sentiment"}, "`type`"),
    ],
)
def test_inconsistent_task_configs_are_refused(tmp_path, options, message):
    with pytest.raises(TunelabError, match=message):
        load_task(write_yaml(tmp_path / "task.yaml", options))


def test_read_task_rows_formats(tmp_path):
    rows = [{"a": 1}, {"a": 2}]
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n\n{"a": 2}\n'))
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "r.csv").write_text("a,b\n1,x\n2,y\n")
    write_tsv(tmp_path / "r.tsv", ["h1", "h2"], [["1", "x"], ["2", "y"]])
    assert read_task_rows(tmp_path / "r.jsonl.gz") == [(f"{tmp_path}/r.jsonl.gz:1", rows[0]), (f"{tmp_path}/r.jsonl.gz:3", rows[1])]
    assert [r for _, r in read_task_rows(tmp_path / "r.json")] == rows
    assert read_task_rows(tmp_path / "r.csv") == [(f"{tmp_path}/r.csv:2", {"a": "1", "b": "x"}), (f"{tmp_path}/r.csv:3", {"a": "2", "b": "y"})]
    # `columns` names the columns by position; the header line is skipped either way.
    assert [r for _, r in read_task_rows(tmp_path / "r.tsv", ["label", "text"])] == [{"label": "1", "text": "x"}, {"label": "2", "text": "y"}]


@pytest.mark.parametrize(
    ("name", "content", "line", "message"),
    [
        ("bad.jsonl", '{"a": 1}\n{"a": \n', 2, "bad JSON"),
        ("bad.csv", "a,b\n1,2\n1,2,3\n", 3, "3 columns, the header has 2"),
    ],
)
def test_malformed_data_files_name_file_and_line(tmp_path, name, content, line, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(TunelabError) as err:
        read_task_rows(tmp_path / name)
    assert f"{tmp_path / name}:{line}" in str(err.value) and message in str(err.value)


def test_missing_data_file_is_reported(tmp_path):
    with pytest.raises(TunelabError, match="not found"):
        read_task_rows(tmp_path / "absent.jsonl")


def test_bad_label_value_names_file_line_and_value(tmp_path, tiny):
    data = write_tsv(tmp_path / "dev.tsv", ["label", "sentence"], [["1", "fine"], ["5", "odd"]])
    task = load_task(write_yaml(tmp_path / "t.yaml", {"type": "classification", "data": "dev.tsv", "prompt": "{sentence}", "labels": {"0": "a", "1": "c"}}))
    with pytest.raises(TunelabError) as err:
        run_task(*tiny, task)
    assert f"{data.resolve()}:3" in str(err.value)
    assert "'5'" in str(err.value) and "'label'" in str(err.value)


def test_missing_template_field_names_file_line_and_field(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "2"}, {"query": "2+2?", "answer": "4"}])
    task = load_task("gsm8k", data)
    with pytest.raises(TunelabError) as err:
        task_samples(task, chat=False)
    assert f"{data}:2" in str(err.value) and "'question'" in str(err.value)


@pytest.mark.parametrize(
    ("options", "rows", "message", "located"),
    [
        ({"type": "multiple_choice", "prompt": "{q}"}, [{"q": "x", "choices": ["a", "b"], "answer": "C"}], "neither an index nor a letter", True),
        ({"type": "multiple_choice", "prompt": "{q}"}, [{"q": "x", "choices": ["a"], "answer": "0"}], "at least two choices", True),
        ({"type": "code_pass_at_k", "prompt": "{prompt}"}, [{"prompt": "def f():\n", "entry_point": "f"}], "`program` uses the field 'test'", True),
        ({"type": "json_fields", "prompt": "{q}", "answer": "{a}"}, [{"q": "x", "a": "not json"}], "must be a JSON object", True),
        ({"type": "json_fields", "prompt": "{q}", "answer": "{a}"}, [{"q": "x", "a": "[1, 2]"}], "must be a JSON object", True),
        ({"type": "classification", "labels": {"0": "a"}}, [{"text": "x", "label": "0"}], "needs a `prompt` template", False),
    ],
)
def test_rows_a_task_type_cannot_use_are_refused(tmp_path, options, rows, message, located):
    """Row-level problems name the row's file:line; a task-level one names the task."""
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    task = load_task(write_yaml(tmp_path / "t.yaml", {**options, "data": str(data)}))
    with pytest.raises(TunelabError) as err:
        task_samples(task, chat=False)
    assert message in str(err.value)
    assert (f"{data}:1" in str(err.value)) == located
    assert located or "task 't'" in str(err.value)


@pytest.mark.skipif(not (SHARED / "sst2" / "dev.tsv").is_file(), reason="needs ../shared/data/sst2/dev.tsv")
def test_sst2_reads_glue_order_by_header_and_other_files_by_position(tmp_path):
    """The built-in sst2 reads GLUE's `sentence, label` file by its header, and a file whose header
    does not name both columns (the shared `label, content`) by position."""
    glue = write_tsv(tmp_path / "glue.tsv", ["sentence", "label"], [["a fine film", "1"], ["dull", "0"]])
    other = write_tsv(tmp_path / "other.tsv", ["label", "content"], [["1", "a fine film"], ["0", "dull"]])
    for path in (glue, other):
        samples = task_samples(load_task("sst2", path), chat=False)
        assert [(s.reference, s.row["sentence"]) for s in samples] == [("1", "a fine film"), ("0", "dull")]


def test_sst2_reads_the_shared_dev_file(tiny):
    """Optional: the built-in SST-2 task reads the GLUE dev TSV (label<TAB>sentence)."""
    task = load_task("sst2", SHARED / "sst2" / "dev.tsv", ["max_samples=6"])
    samples = task_samples(task, chat=False)
    assert len(samples) == 6 and {s.reference for s in samples} <= {"0", "1"}
    assert all(s.row["sentence"] in s.prompt for s in samples)
    metrics, records = run_task(*tiny, task)
    assert metrics["accuracy"] == sum(r["predicted"] == r["label"] for r in records) / 6


# ---- Likelihood tasks --------------------------------------------------------------------------

SENTENCES = [
    "a gripping, funny film",
    "dull and far too long",
    "I loved every minute",
    "the plot makes no sense",
    "great acting",
    "boring",
    "what a mess",
    "a delight",
    "zzz",
    "quiet and sad",
]
GOLD = ["0", "1", "2", "0", "1", "2", "0", "1", "1", "2"]
LABELS = {"0": "a", "1": "c", "2": "j"}


def classification_task(tmp_path, **extra):
    write_tsv(tmp_path / "dev.tsv", ["label", "sentence"], [[g, s] for g, s in zip(GOLD, SENTENCES)])
    return load_task(
        write_yaml(
            tmp_path / "cls.yaml",
            {"type": "classification", "data": "dev.tsv", "columns": ["label", "sentence"], "prompt": "{sentence}", "labels": LABELS, "batch_size": 4, **extra},
        )
    )


def test_classification_matches_hand_computed_label_likelihoods(tmp_path, tiny):
    """Each label's log-likelihood after the prompt (with the leading space of plain-text prompts),
    the argmax label, accuracy and macro-F1 all equal what direct forward passes give."""
    model, tokenizer = tiny
    metrics, records = run_task(model, tokenizer, classification_task(tmp_path))
    expected_predictions = []
    for sentence, record in zip(SENTENCES, records):
        scores = {label: hand_logprob(model, tokenizer, sentence, " " + text) for label, text in LABELS.items()}
        assert record["logprobs"] == pytest.approx(scores, abs=1e-4)
        expected_predictions.append(max(scores, key=scores.get))
    assert [r["predicted"] for r in records] == expected_predictions
    assert len(set(expected_predictions)) >= 2, "the model predicts one label only: the check would be weak"
    assert [r["label"] for r in records] == GOLD
    assert metrics["accuracy"] == pytest.approx(sum(p == g for p, g in zip(expected_predictions, GOLD)) / len(GOLD))
    assert metrics["macro_f1"] == pytest.approx(hand_macro_f1(expected_predictions, GOLD, list(LABELS)))


def test_classification_with_a_chat_prompt_scores_after_the_template(tmp_path):
    """With a chat template the prompt is the rendered user turn and the label follows it directly."""
    model, tokenizer, kind = load_target("tiny-random-llama")
    assert kind == "model" and tokenizer.chat_template
    metrics, records = run_task(model, tokenizer, classification_task(tmp_path, max_samples=4))
    assert len(records) == 4
    for sentence, record in zip(SENTENCES, records):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": sentence}], tokenize=False, add_generation_prompt=True)
        scores = {label: hand_logprob(model, tokenizer, rendered, text) for label, text in LABELS.items()}
        assert record["logprobs"] == pytest.approx(scores, abs=1e-4)
        assert record["predicted"] == max(scores, key=scores.get)
    assert metrics["accuracy"] == pytest.approx(sum(r["predicted"] == g for r, g in zip(records, GOLD)) / 4)


MC_ROWS = [
    {"question": "The sky is", "choices": ["blue", "a very long and winding answer", "x", "green grass"], "answer": "0"},
    {"question": "Two plus two", "choices": ["four", "is definitely the number five", "22"], "answer": "B"},
    {"question": "Capital of France", "choices": ["Paris", "Lyon", "the city of Marseille on the coast"], "answer": "c"},
    {"question": "Pick one", "choices": ["a", "bb", "ccc", "dddd", "eeeee"], "answer": "3"},
    {"question": "zzz", "choices": ["q", "some words here"], "answer": "1"},
]


def test_multiple_choice_acc_and_acc_norm_match_hand_computation(tmp_path, tiny):
    """acc: the choice with the highest summed log-likelihood; acc_norm: per character of the choice.
    Answers given as an index or a letter (either case)."""
    model, tokenizer = tiny
    data = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    task = load_task(write_yaml(tmp_path / "mc.yaml", {"type": "multiple_choice", "data": str(data), "prompt": "Q: {question}\nA:", "batch_size": 3}))
    metrics, records = run_task(model, tokenizer, task)
    answers = [0, 1, 2, 3, 1]
    correct = correct_norm = 0
    differ = 0
    for row, record, answer in zip(MC_ROWS, records, answers):
        summed = [hand_logprob(model, tokenizer, f"Q: {row['question']}\nA:", " " + c) for c in row["choices"]]
        normalized = [lp / len(c) for lp, c in zip(summed, row["choices"])]
        chosen, chosen_norm = summed.index(max(summed)), normalized.index(max(normalized))
        assert record["answer"] == answer
        assert record["logprobs"] == pytest.approx(summed, abs=1e-4)
        assert (record["predicted"], record["predicted_norm"]) == (chosen, chosen_norm)
        correct += chosen == answer
        correct_norm += chosen_norm == answer
        differ += chosen != chosen_norm
    assert differ, "acc and acc_norm pick the same choices everywhere: the check would be weak"
    assert metrics == pytest.approx({"acc": correct / len(MC_ROWS), "acc_norm": correct_norm / len(MC_ROWS)})


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "Perplexity is exp of the mean token NLL; 1234567890.",
    "ab",
    "A somewhat longer sentence, so that padding in a batch of texts matters for the scoring code.",
]


def test_perplexity_is_exp_of_the_token_weighted_mean_loss(tmp_path, tiny):
    model, tokenizer = tiny
    data = write_jsonl(tmp_path / "texts.jsonl", [{"title": t.split()[0], "body": t} for t in TEXTS])
    task = load_task(write_yaml(tmp_path / "ppl.yaml", {"type": "perplexity", "data": str(data), "text": "{body}", "batch_size": 2}))
    metrics, records = run_task(model, tokenizer, task)
    perplexity, tokens = hand_perplexity(model, tokenizer, TEXTS)
    assert metrics["tokens"] == tokens == sum(len(tokenizer(t)["input_ids"]) - 1 for t in TEXTS)
    assert metrics["perplexity"] == pytest.approx(perplexity, rel=1e-5)
    assert metrics["nll_per_token"] == pytest.approx(math.log(perplexity), rel=1e-5)
    for text, record in zip(TEXTS, records):
        single, n = hand_perplexity(model, tokenizer, [text])
        assert record["tokens"] == n and record["nll"] == pytest.approx(n * math.log(single), rel=1e-5)


def test_perplexity_of_a_one_token_text_is_an_error(tmp_path, tiny):
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": "fine text"}, {"text": "x"}])
    task = load_task(write_yaml(tmp_path / "ppl.yaml", {"type": "perplexity", "data": str(data)}))
    with pytest.raises(TunelabError, match=f"{data}:2: the text has fewer than two tokens"):
        run_task(*tiny, task)


# ---- Generation tasks (stubbed generation) -----------------------------------------------------

MATH_ROWS = [
    ({"question": "Q1", "answer": "3 + 15 = 18\n#### 18"}, "So she pays 18.0 dollars in total."),  # right
    ({"question": "Q2", "answer": "#### 1,234"}, "Working...\n#### 1234"),  # right
    ({"question": "Q3", "answer": "#### -4"}, "The change is -4."),  # right
    ({"question": "Q4", "answer": "#### 8"}, "I think it is 7"),  # wrong
    ({"question": "Q5", "answer": "#### 0.5"}, "No idea."),  # unanswered
]


def test_math_exact_counts_correct_final_numbers(tmp_path, tiny, monkeypatch):
    data = write_jsonl(tmp_path / "gsm.jsonl", [row for row, _ in MATH_ROWS])
    task = load_task("gsm8k", data)
    predictions = {task.prompt.format(**row): prediction for row, prediction in MATH_ROWS}
    stub = stub_generate(monkeypatch, lambda prompt, _: predictions[prompt])
    metrics, records = run_task(*tiny, task)
    assert metrics == {"accuracy": pytest.approx(3 / 5), "answered": pytest.approx(4 / 5)}
    assert [r["correct"] for r in records] == [True, True, True, False, False]
    assert [r["predicted_answer"] for r in records] == ["18", "1234", "-4", "7", None]
    assert [r["reference_answer"] for r in records] == ["18", "1234", "-4", "8", "0.5"]
    ((prompts, options),) = stub.calls
    assert prompts == list(predictions) and options["max_new_tokens"] == 320 and options["temperature"] == 0.0


def test_math_exact_reference_without_a_number_is_an_error(tmp_path, tiny, monkeypatch):
    data = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "Q", "answer": "no number here"}])
    stub_generate(monkeypatch, lambda prompt, _: "#### 1")
    with pytest.raises(TunelabError, match=f"{data}:1: the reference answer holds no number"):
        run_task(*tiny, load_task("gsm8k", data))


CODE_ROWS = [
    {"task_id": "t/add", "prompt": "def add(a, b):\n", "entry_point": "add", "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"},
    {"task_id": "t/neg", "prompt": "def neg(x):\n", "entry_point": "neg", "test": "def check(f):\n    assert f(2) == -2\n"},
]
COMPLETIONS = {
    "def add(a, b):\n": ["    return a + b", "    return a - b", "    while True:\n        pass"],  # right, wrong, hangs
    "def neg(x):\n": ["    return -x", "    return 0 - x", "    return x"],  # right, right, wrong
}


def test_code_pass_at_k_equals_the_closed_form(tmp_path, tiny, monkeypatch):
    """pass@k = mean over problems of 1 - C(n-c, k) / C(n, k); a hanging completion is a timeout."""
    data = write_jsonl(tmp_path / "code.jsonl", CODE_ROWS)
    task = load_task(
        write_yaml(
            tmp_path / "code.yaml",
            {"type": "code_pass_at_k", "data": str(data), "prompt": "{prompt}", "chat": False, "samples": 3, "k": [1, 2, 3], "temperature": 0.8, "timeout_s": 2.0},
        )
    )
    stub = stub_generate(monkeypatch, lambda prompt, i: COMPLETIONS[prompt][i])
    metrics, records = run_task(*tiny, task)
    correct = [1, 2]
    for k in (1, 2, 3):
        assert metrics[f"pass@{k}"] == pytest.approx(sum(pass_at_k(3, c, k) for c in correct) / 2)
    assert metrics["pass@1"] == pytest.approx(0.5) and metrics["pass@2"] == pytest.approx(5 / 6) and metrics["pass@3"] == 1.0
    assert metrics["sandbox"]["namespaces"] is True and metrics["sandbox"]["landlock_abi"] >= 1
    assert [r["id"] for r in records] == ["t/add", "t/neg"]
    assert records[0]["passed"] == [True, False, False] and records[0]["timed_out"] == [False, False, True]
    assert records[1]["passed"] == [True, True, False] and records[1]["timed_out"] == [False, False, False]
    assert records[0]["errors"][1].startswith("AssertionError") and records[1]["errors"][2].startswith("AssertionError")
    assert records[0]["completions"] == COMPLETIONS["def add(a, b):\n"]
    ((prompts, options),) = stub.calls
    assert prompts == ["def add(a, b):\n"] * 3 + ["def neg(x):\n"] * 3
    assert options["keep_indent"] is True and options["temperature"] == 0.8


def test_a_kernel_without_namespaces_or_landlock_gets_a_warning(tmp_path, tiny, monkeypatch, capsys):
    from tunelab.scoring.sandbox import SandboxResult

    data = write_jsonl(tmp_path / "code.jsonl", CODE_ROWS)
    task = load_task(write_yaml(tmp_path / "code.yaml", {"type": "code_pass_at_k", "data": str(data), "prompt": "{prompt}", "chat": False}))
    stub_generate(monkeypatch, lambda prompt, i: COMPLETIONS[prompt][0])
    bare = {"namespaces": False, "landlock_abi": 0, "rlimits": True}
    monkeypatch.setattr(harness, "run_python", lambda program, limits: SandboxResult(True, 0, False, "", "", 0.1, bare))
    metrics, _ = run_task(*tiny, task)
    assert metrics["sandbox"] == bare
    out = " ".join(capsys.readouterr().err.split())
    assert "could not apply its namespaces and Landlock" in out


def test_humaneval_canonical_solutions_pass_and_stubs_fail(tiny, monkeypatch):
    """The program the harness assembles (prompt + completion + tests + check(entry_point)) passes
    with HumanEval's canonical solutions; a body that returns None fails."""
    task = load_task("humaneval", overrides=["max_samples=4"])
    rows = {s.prompt: s.row for s in task_samples(task, chat=False)}
    order = list(rows)
    stub = stub_generate(monkeypatch, lambda prompt, _: rows[prompt]["canonical_solution"] if order.index(prompt) % 2 == 0 else "    return None")
    metrics, records = run_task(*tiny, task)
    assert [r["passed"] for r in records] == [[True], [False], [True], [False]]
    assert metrics["pass@1"] == pytest.approx(0.5)
    options = stub.calls[0][1]
    assert options["stop"] == BUILTIN["humaneval"]["stop"] and options["keep_indent"] is True


def test_humaneval_chat_runs_the_replys_code_block_after_the_problem(tmp_path, tiny, monkeypatch):
    """humaneval-chat asks for the whole function in a code block; the block runs after the problem's
    prompt, so its imports and helpers exist: HumanEval/38's decode_cyclic calls the prompt's
    encode_cyclic. Prose around the block is ignored; a reply without working code fails."""
    everything = {s.row["task_id"]: s.row for s in task_samples(load_task("humaneval"), chat=False)}
    picked = ["HumanEval/0", "HumanEval/38", "HumanEval/2", "HumanEval/3"]
    rows = {key: everything[key] for key in picked}
    task = load_task("humaneval-chat", write_jsonl(tmp_path / "picked.jsonl", list(rows.values())))
    by_prompt = {}

    def reply(prompt, _):
        row = next(r for r in rows.values() if r["prompt"] in prompt)
        by_prompt[row["task_id"]] = prompt
        signature = row["prompt"] if row["task_id"] == "HumanEval/0" else f"def {row['entry_point']}(s):\n"
        if row["task_id"] in ("HumanEval/0", "HumanEval/38"):
            return f"Here is the function:\n```python\n{signature}{row['canonical_solution']}```\nIt is correct."
        if row["task_id"] == "HumanEval/2":
            return "```python\ndef truncate_number(number):\n    return number\n```"
        return "You should loop over the operations."

    stub = stub_generate(monkeypatch, reply)
    metrics, records = run_task(*tiny, task)
    assert [r["id"] for r in records] == picked
    assert [r["passed"] for r in records] == [[True], [True], [False], [False]]
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert all(by_prompt[key].startswith("Complete the following Python function") and rows[key]["prompt"] in by_prompt[key] for key in picked)
    assert stub.calls[0][1]["stop"] == ["\n```\n"]


MBPP_ROWS = [  # MBPP's layout: a description, the reference code, asserts in a list, setup code
    {
        "task_id": 11,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
        "test_setup_code": "",
    },
    {
        "task_id": 12,
        "text": "Write a function to square a number.",
        "code": "def square(x):\n    return x * x",
        "test_list": ["assert square(3) == 9", "assert square(-2) == square(2) == 4"],
        "test_setup_code": "import math",
    },
]


def test_a_list_field_renders_one_per_line_and_still_indexes():
    from tunelab.eval.tasks import render

    row = {"q": "Capital?", "choices": ["Paris", "London"], "ids": [1, 2]}
    assert render("{q}\n{choices}", row, "f:1", "prompt") == "Capital?\nParis\nLondon"
    assert render("A. {choices[0]} B. {choices[1]}", row, "f:1", "prompt") == "A. Paris B. London"
    assert render("{ids}", row, "f:1", "prompt") == "[1, 2]"  # not strings: as Python writes them


def test_mbpp_style_rows_run_through_a_program_template(tmp_path, tiny, monkeypatch):
    """A task YAML scores MBPP-layout rows: a list of asserts renders one per line, both in the prompt
    and in the program; the reply's code block is the code. Task 12's reply is wrong for x < 0."""
    write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    task = load_task(
        write_yaml(
            tmp_path / "mbpp.yaml",
            {
                "type": "code_pass_at_k",
                "data": "mbpp.jsonl",
                "chat": False,
                "prompt": "{text}\nYour code should pass these tests:\n{test_list}\n",
                "program": "{test_setup_code}\n{completion_code}\n\n{test_list}\n",
            },
        )
    )
    replies = {11: "```python\ndef add(a, b):\n    return a + b\n```", 12: "Sure:\n```python\ndef square(x):\n    return x * abs(x)\n```"}
    stub = stub_generate(monkeypatch, lambda prompt, _: replies[11 if "add two" in prompt else 12])
    metrics, records = run_task(*tiny, task)
    assert [r["id"] for r in records] == ["11", "12"]
    assert [r["passed"] for r in records] == [[True], [False]] and metrics["pass@1"] == 0.5
    assert records[1]["errors"] == ["AssertionError"]
    assert stub.calls[0][0][0] == "Write a function to add two numbers.\nYour code should pass these tests:\nassert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_a_code_row_without_a_field_its_program_uses_names_file_line_and_field(tmp_path, tiny):
    data = write_jsonl(tmp_path / "mbpp.jsonl", [MBPP_ROWS[0], {k: v for k, v in MBPP_ROWS[1].items() if k != "test_list"}])
    task = load_task(write_yaml(tmp_path / "mbpp.yaml", {"type": "code_pass_at_k", "data": str(data), "prompt": "{text}", "program": "{completion_code}\n{test_list}"}))
    with pytest.raises(TunelabError) as err:
        run_task(*tiny, task)
    assert f"{data}:2" in str(err.value) and "'test_list'" in str(err.value) and "`program`" in str(err.value)


def test_json_fields_on_the_quickstart_task(tiny, monkeypatch):
    """Five held-out quickstart records, predicted: exactly; one field wrong; not JSON; with an extra
    key inside prose; a number as a string. Counted by hand over the references' fields."""
    from tunelab.data.records_task import make_splits

    _, rows = make_splits(0, 5, seed=0)
    references = [json.loads(row["messages"][-1]["content"]) for row in rows]
    fields = [len(r) for r in references]
    predictions = [
        json.dumps(references[0]),
        json.dumps(dict(references[1], city="Atlantis")),
        "Sorry, I cannot do that.",
        "Here it is: " + json.dumps(dict(references[3], note="extra")) + " Done.",
        json.dumps(dict(references[4], age=str(references[4]["age"]))),
    ]
    by_prompt = {prompt_key(row["messages"][:-1]): p for row, p in zip(rows, predictions)}
    stub = stub_generate(monkeypatch, lambda prompt, _: by_prompt[prompt_key(prompt)])
    metrics, records = run_task(*tiny, load_task("quickstart", overrides=["max_samples=5"]))
    assert [r["reference"] for r in records] == references
    assert metrics["json_valid"] == pytest.approx(4 / 5)
    assert metrics["json_record_match"] == pytest.approx(1 / 5)
    assert metrics["json_field_accuracy"] == pytest.approx((1 + (fields[1] - 1) / fields[1] + 0 + 1 + (fields[4] - 1) / fields[4]) / 5)
    assert all([m["role"] for m in p] == ["system", "user"] for p in stub.calls[0][0])


def test_exact_match_on_a_template_task_and_a_training_format_file(tmp_path, tiny, monkeypatch):
    """Case and whitespace do not count, anything else does; rows without a `prompt` template are
    read as training data (prompt/completion here)."""
    rows = [{"q": "Capital of France?", "a": "Paris"}, {"q": "Capital of Spain?", "a": "Madrid"}, {"q": "Capital of Italy?", "a": "Rome"}, {"q": "Capital of Peru?", "a": "Lima"}]
    answers = {"Capital of France?": "  PARIS \n", "Capital of Spain?": "Madrid.", "Capital of Italy?": "rome", "Capital of Peru?": "Cusco"}
    stub_generate(monkeypatch, lambda prompt, _: answers[prompt.removeprefix("Q: ")])
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    templated = load_task(write_yaml(tmp_path / "qa.yaml", {"type": "exact_match", "data": str(data), "prompt": "Q: {q}", "answer": "{a}"}))
    metrics, records = run_task(*tiny, templated)
    assert metrics == {"exact_match": pytest.approx(2 / 4)}
    assert [r["correct"] for r in records] == [True, False, True, False]

    plain = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": r["q"], "completion": r["a"]} for r in rows])
    metrics, records = run_task(*tiny, load_task(write_yaml(tmp_path / "pc.yaml", {"type": "exact_match", "data": str(plain)})))
    assert metrics == {"exact_match": pytest.approx(2 / 4)}
    assert [r["reference"] for r in records] == ["Paris", "Madrid", "Rome", "Lima"]


# ---- The CLI and evaluation targets ------------------------------------------------------------


def perplexity_task_file(tmp_path) -> Path:
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    return write_yaml(tmp_path / "ppl.yaml", {"name": "ppl", "type": "perplexity", "data": str(data), "batch_size": 2})


def test_cli_eval_writes_eval_json_and_samples(tmp_path, tiny):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "tiny-random-llama", "--task", str(perplexity_task_file(tmp_path)), "--out", str(out), "--max-samples", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert set(report) >= EVAL_KEYS
    assert (report["task"], report["type"], report["n"], report["samples_file"]) == ("ppl", "perplexity", 4, "eval_samples.jsonl")
    assert report["target_kind"] == "model" and report["seconds"] > 0
    lines = (out / report["samples_file"]).read_text().splitlines()
    assert len(lines) == report["n"] and all(json.loads(line)["tokens"] >= 1 for line in lines)
    # load_target("tiny-random-llama") is the seeded tiny model built here.
    assert report["metrics"]["perplexity"] == pytest.approx(hand_perplexity(*tiny, TEXTS[:4])[0], rel=1e-5)


def test_cli_eval_builtin_without_data_exits_with_a_message(tmp_path):
    result = CliRunner().invoke(app, ["eval", "tiny-random-llama", "--task", "gsm8k", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "--data" in result.output
    assert not (tmp_path / "eval.json").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, module_cache):
    """A 2-step LoRA run of the tiny model and its peft export."""
    from tunelab.export import export_run

    folder = tmp_path_factory.mktemp("trained")
    run = train_tiny_run(folder, {"name": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0}, steps=2, lr=1e-2)
    return run, export_run(run, "peft", folder / "peft")


def test_run_dir_and_peft_adapter_score_like_the_in_memory_model(tmp_path, trained_run):
    """A run directory and its exported peft adapter give the metrics of the run's load_run model,
    and they differ from the untrained base's (the adapter is applied)."""
    from tunelab.runs import load_run

    run, adapter = trained_run
    task = classification_task(tmp_path)
    ppl = load_task(perplexity_task_file(tmp_path))
    loaded = load_run(run)
    expected, expected_records = run_task(loaded.model, loaded.tokenizer, task)
    expected_ppl, _ = run_task(loaded.model, loaded.tokenizer, ppl)

    from_run = evaluate_task(run, task, out=tmp_path / "run-eval")
    from_adapter = evaluate_task(adapter, task, out=tmp_path / "adapter-eval")
    assert (from_run["target_kind"], from_adapter["target_kind"]) == ("run", "peft_adapter")
    for results, folder in ((from_run, tmp_path / "run-eval"), (from_adapter, tmp_path / "adapter-eval")):
        assert results["metrics"] == pytest.approx(expected)
        records = [json.loads(line) for line in (folder / "eval_samples.jsonl").read_text().splitlines()]
        assert [r["logprobs"] for r in records] == [pytest.approx(r["logprobs"], abs=1e-5) for r in expected_records]
    assert evaluate_task(adapter, ppl, out=tmp_path / "adapter-ppl")["metrics"] == pytest.approx(expected_ppl, rel=1e-6)

    # Without --out, a run's results go inside it.
    default = evaluate_task(run, ppl)
    assert default["metrics"] == pytest.approx(expected_ppl, rel=1e-6)
    assert json.loads((run / "eval" / "ppl" / "eval.json").read_text())["n"] == len(TEXTS)

    base_model, base_tokenizer, _ = load_target("tiny-random-llama")
    base_ppl, _ = run_task(base_model, base_tokenizer, ppl)
    assert base_ppl["perplexity"] != pytest.approx(expected_ppl["perplexity"], rel=1e-4)
