"""Scores for generated answers against known references: exact match, JSON fields, final numbers,
fenced code, macro-F1."""

from __future__ import annotations

import json
import re


def normalize_text(text: str) -> str:
    """Case-folded, whitespace-collapsed, stripped: formatting noise does not count as an error."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_text(prediction) == normalize_text(reference)


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in `text` (models often wrap it in prose or code fences), or None."""
    decoder = json.JSONDecoder()
    for start in [m.start() for m in re.finditer(r"\{", text)]:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def fenced_code(text: str) -> str:
    """The first fenced code block's content (```python, ```py or a bare fence; an unclosed one runs
    to the end), or the whole text when it has no fence. A reply that opens with code and only
    closes a fence (common from small instruct models) is the code before that fence."""
    fences = list(re.finditer(r"^[ \t]*```[ \t]*(\w*)[ \t]*$", text, re.MULTILINE))
    if len(fences) == 1 and not fences[0].group(1) and text[: fences[0].start()].strip() and not text[fences[0].end() :].strip():
        return text[: fences[0].start()].rstrip("\n")
    match = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", text, re.DOTALL)
    return match.group(1) if match else text


def values_equal(predicted, reference) -> bool:
    if isinstance(reference, bool) or isinstance(predicted, bool):
        return predicted is reference
    if isinstance(reference, (int, float)) and isinstance(predicted, (int, float)):
        return abs(predicted - reference) <= 1e-6 * max(1.0, abs(reference))
    if isinstance(reference, str) and isinstance(predicted, str):
        return normalize_text(predicted) == normalize_text(reference)
    return predicted == reference


def json_scores(prediction: str, reference: dict) -> dict:
    """record_match: the prediction holds exactly the reference's keys with equal values;
    field_accuracy: the fraction of reference fields predicted right."""
    predicted = parse_json_object(prediction)
    if predicted is None:
        return {"json_valid": 0.0, "json_record_match": 0.0, "json_field_accuracy": 0.0}
    right = [key in predicted and values_equal(predicted[key], value) for key, value in reference.items()]
    record = set(predicted) == set(reference) and all(right)
    return {
        "json_valid": 1.0,
        "json_record_match": float(record),
        "json_field_accuracy": sum(right) / len(right) if right else float(record),
    }


def score_prediction(prediction: str, reference: str) -> dict:
    """Every score that applies: exact match always, JSON scores when the reference is a JSON object."""
    scores = {"exact_match": float(exact_match(prediction, reference))}
    reference_object = parse_json_object(reference) if reference.lstrip().startswith("{") else None
    if reference_object is not None:
        scores.update(json_scores(prediction, reference_object))
    return scores


# ---- Math: the final number of a worked answer

# A minus sign right after a word or a bracket is a range or a subtraction ("pages 3-4"), not a sign.
NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def final_number(text: str) -> str | None:
    """The answer of a GSM8K-style solution: the number after the last `####` if there is one,
    else the last number in the text; commas, `$` and a trailing `.` or `.0…` removed."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = NUMBER.findall(tail.replace("$", ""))
    if not numbers:
        return None
    number = numbers[0] if "####" in text else numbers[-1]
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number or "0"


def numbers_equal(predicted: str | None, reference: str | None) -> bool:
    if predicted is None or reference is None:
        return False
    try:
        return abs(float(predicted) - float(reference)) <= 1e-9 * max(1.0, abs(float(reference)))
    except ValueError:
        return False


# ---- Classification


def macro_f1(predicted: list, gold: list, labels: list) -> float:
    """The unweighted mean over `labels` of each label's F1 (a label never predicted nor present counts 0)."""
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)
