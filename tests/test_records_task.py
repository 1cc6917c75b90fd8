import json
import random
import re
from datetime import date

import pytest

from tunelab.data.records_task import (
    CITIES,
    FIELDS,
    FIRST_NAMES,
    LAST_NAMES,
    MONTH_NAMES,
    SENTENCE_TEMPLATES,
    SYSTEM_PROMPT,
    make_record,
    make_splits,
    record_to_json,
    render_sentence,
)

N_TRAIN, N_EVAL = 400, 100


@pytest.fixture(scope="module")
def splits():
    return make_splits(N_TRAIN, N_EVAL, seed=0)


def _sentence(row: dict) -> str:
    return row["messages"][1]["content"]


def _record(row: dict) -> dict:
    return json.loads(row["messages"][2]["content"])


def _occurs_as_word(phrase: str, text: str) -> bool:
    """Whole-word match, so "Ana" misses "Anaheim" and "1 May 2020" misses "21 May 2020"."""
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


def _words_found(words, text: str) -> list[str]:
    return [word for word in words if _occurs_as_word(word, text)]


def _template_regex(template: str) -> re.Pattern:
    literal_parts = re.split(r"\{\w+\}", template)
    return re.compile("(.+)".join(map(re.escape, literal_parts)))


def test_sizes_and_chat_format(splits):
    train, eval_ = splits
    assert (len(train), len(eval_)) == (N_TRAIN, N_EVAL)
    for row in train + eval_:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SYSTEM_PROMPT


def test_same_seed_same_rows_and_different_seed_different_rows(splits):
    assert make_splits(N_TRAIN, N_EVAL, seed=0) == splits
    assert make_splits(N_TRAIN, N_EVAL, seed=1) != splits


def test_eval_split_does_not_depend_on_train_size(splits):
    assert make_splits(10, N_EVAL, seed=0)[1] == splits[1]


def test_train_and_eval_share_no_person_record_or_sentence(splits):
    train, eval_ = splits
    train_names = {_record(row)["name"] for row in train}
    eval_names = [_record(row)["name"] for row in eval_]
    assert len(set(eval_names)) == N_EVAL
    assert not train_names & set(eval_names)

    train_targets = [row["messages"][2]["content"] for row in train]
    eval_targets = {row["messages"][2]["content"] for row in eval_}
    assert len(set(train_targets)) == N_TRAIN
    assert not set(train_targets) & eval_targets
    assert not {_sentence(row) for row in train} & {_sentence(row) for row in eval_}


def test_targets_are_canonical_json_with_typed_fields(splits):
    for row in splits[0] + splits[1]:
        target = row["messages"][2]["content"]
        record = json.loads(target)
        assert tuple(record) == FIELDS
        assert record_to_json(record) == target
        assert isinstance(record["name"], str) and isinstance(record["city"], str)
        assert type(record["age"]) is int and 18 <= record["age"] <= 90
        day = date.fromisoformat(record["date"])
        assert date(2015, 1, 1) <= day <= date(2025, 12, 31)
        amount = record["amount"]
        assert type(amount) in (int, float) and amount > 0
        if isinstance(amount, float):
            assert not amount.is_integer() and round(amount, 2) == amount


def _date_surface_forms(day: date) -> set[str]:
    month = MONTH_NAMES[day.month - 1]
    return {
        day.isoformat(),
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month} {day.year}",
        f"{month[:3]} {day.day}, {day.year}",
        f"{day.day} {month[:3]} {day.year}",
    }


def test_every_field_is_recoverable_from_its_sentence(splits):
    for row in splits[0] + splits[1]:
        sentence, record = _sentence(row), _record(row)
        first, last = record["name"].split(" ")
        # Exactly one person and one city are mentioned, so the mapping is unambiguous.
        assert _words_found(FIRST_NAMES, sentence) == [first]
        assert _words_found(LAST_NAMES, sentence) == [last]
        assert _words_found(CITIES, sentence) == [record["city"]]
        assert record["name"] in sentence
        assert re.search(rf"(?<![\d.,]){record['age']}(?!\d)", sentence)
        day = date.fromisoformat(record["date"])
        assert any(_occurs_as_word(form, sentence) for form in _date_surface_forms(day))
        numbers = [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d{1,2})?", sentence)]
        assert record["amount"] in numbers
        assert len(sentence.split()) < 40


def test_variety_of_templates_and_surface_forms(splits):
    sentences = [_sentence(row) for row in splits[0]]
    templates_used = {template for template in SENTENCE_TEMPLATES if any(_template_regex(template).fullmatch(sentence) for sentence in sentences)}
    assert len(SENTENCE_TEMPLATES) >= 12
    assert templates_used == set(SENTENCE_TEMPLATES)
    joined = "\n".join(sentences)
    assert re.search(r"\d,\d{3}", joined), "thousands separators should appear"
    assert "$" in joined and "EUR" in joined
    assert re.search(r"\b\d{4}-\d{2}-\d{2}\b", joined) and any(m in joined for m in MONTH_NAMES)
    amounts = [_record(row)["amount"] for row in splits[0]]
    assert any(type(a) is int for a in amounts) and any(type(a) is float for a in amounts)


def test_make_record_and_render_sentence_are_deterministic():
    record = make_record(random.Random(7))
    assert record == make_record(random.Random(7))
    assert tuple(record) == FIELDS
    assert render_sentence(record, random.Random(3)) == render_sentence(record, random.Random(3))


def test_record_to_json_orders_keys_by_fields():
    record = {"amount": 120.5, "date": "2023-05-14", "city": "Lisbon", "age": 34, "name": "Maria Lopez"}
    assert record_to_json(record) == ('{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "date": "2023-05-14", "amount": 120.5}')


@pytest.mark.parametrize("n_train, n_eval", [(-1, 5), (5, -1), (1, len(FIRST_NAMES) * len(LAST_NAMES))])
def test_impossible_sizes_raise(n_train, n_eval):
    with pytest.raises(ValueError):
        make_splits(n_train, n_eval)


def test_eval_may_use_every_name_when_no_training_rows_are_asked_for():
    train, eval_ = make_splits(0, len(FIRST_NAMES) * len(LAST_NAMES))
    assert train == [] and len(eval_) == len(FIRST_NAMES) * len(LAST_NAMES)
