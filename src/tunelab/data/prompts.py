"""Prompt-only rows, for the objectives that sample their own completions (GRPO, RAFT).

A row is `{prompt, ...}`: `prompt` is plain text or a list of messages (the turns before the answer,
rendered with the chat template's generation prompt); every other field of the row (an `answer`,
a program's `tests`) travels with it unchanged, for the reward functions to read. The fields are
kept as one JSON string per row, so rows of any shape fit one table.
"""

from __future__ import annotations

import json

from tunelab.data.formats import read_rows
from tunelab.data.preference import parse_prompt, prompt_ids
from tunelab.errors import TunelabError


def load_prompt_examples(path: str) -> tuple[str, list[dict]]:
    """(format, rows as {prompt, fields}) of a prompt-only file."""
    examples, formats = [], set()
    for where, row in read_rows(path):
        if row.get("prompt") is None:
            raise TunelabError(f"{where}: missing field 'prompt' (prompt rows are {{prompt, ...fields the rewards read}})")
        prompt = parse_prompt(row["prompt"], where)
        formats.add("conversational" if isinstance(prompt, list) else "plain")
        if len(formats) > 1:
            raise TunelabError(f"{where}: rows mix plain-text and conversational prompts; use one kind per file")
        fields = {key: value for key, value in row.items() if key != "prompt"}
        try:
            fields_json = json.dumps(fields)
        except TypeError as err:  # a parquet cell of a type JSON has none of (bytes, a timestamp)
            raise TunelabError(f"{where}: the row's fields must be JSON values: {err}") from None
        examples.append({"prompt": json.dumps(prompt), "fields": fields_json, "where": where})
    if not examples:
        raise TunelabError(f"{path}: the data set is empty")
    return f"prompt:{formats.pop()}", examples


def tokenize_prompt(example: dict, tokenizer, max_length: int) -> dict:
    """`prompt_ids` (cut from the left to max_length), the row's prompt and fields, `full_length`."""
    ids = prompt_ids(json.loads(example["prompt"]), tokenizer)
    return {"prompt_ids": ids[-max_length:], "prompt": example["prompt"], "fields": example["fields"], "where": example["where"], "full_length": len(ids)}


def row_fields(sample: dict) -> dict:
    """The fields of a tokenized prompt row besides its prompt (what reward functions read)."""
    return json.loads(sample["fields"])


def row_prompt(sample: dict) -> str | list[dict]:
    return json.loads(sample["prompt"])
