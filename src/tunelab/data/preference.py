"""Preference rows, as TRL takes them: read, validate and tokenize.

Paired rows (DPO family, reward models): `{prompt, chosen, rejected}` with strings (plain text) or
message lists (conversational: `prompt` the turns before the answer, `chosen`/`rejected` the
answer turns), or `{chosen, rejected}` message lists whose shared leading turns are the prompt.
Unpaired rows (KTO): `{prompt, completion, label}` with `label` a bool; a paired row there counts as
a desirable (chosen) and an undesirable (rejected) example.

The prompt is tokenized once and shared by every completion of the row; each completion is
tokenized on its own, so no token merges across the prompt/completion boundary and the prompt a
completion is scored after is exactly the prompt the model is given. Completions end with the
end-of-turn token (the chat template's, or EOS for plain text).
"""

from __future__ import annotations

from tunelab.data.formats import read_rows
from tunelab.data.tokenize import render_prompt
from tunelab.errors import TunelabError, shown

COMPLETIONS = {"preference": ("chosen", "rejected"), "unpaired": ("completion",)}
ROLES = ("system", "user", "assistant", "tool")


def load_preference_examples(path: str, kind: str) -> tuple[str, list[dict], int]:
    """(format, canonical rows, rows whose chosen equals rejected) of a preference or unpaired file."""
    examples, formats, identical = [], set(), 0
    for where, row in read_rows(path):
        if kind == "preference" or "completion" not in row:
            pair = _paired(row, where)
            identical += pair["chosen"] == pair["rejected"]
            # Unpaired objectives (KTO) read a pair as a desirable and an undesirable example, as TRL does.
            found = [pair] if kind == "preference" else [_unpaired_from(pair, key) for key in ("chosen", "rejected")]
        else:
            found = [_unpaired(row, where)]
        formats.add("conversational" if isinstance(found[0]["prompt"], list) else "plain")
        if len(formats) > 1:
            raise TunelabError(f"{where}: rows mix plain-text and conversational preference rows; use one kind per file")
        examples.extend(found)
    if not examples:
        raise TunelabError(f"{path}: the data set is empty")
    return f"{kind}:{formats.pop()}", examples, identical


def _paired(row: dict, where: str) -> dict:
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise TunelabError(f"{where}: missing field '{key}' (preference rows are {{prompt, chosen, rejected}})")
    if row.get("prompt") is None:
        if not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
            raise TunelabError(f"{where}: missing field 'prompt' (only message-list rows may leave the prompt implicit)")
        return _split_shared_prompt(row, where)
    prompt = parse_prompt(row["prompt"], where)
    return {"prompt": prompt, **{key: _completion(row[key], key, prompt, where) for key in ("chosen", "rejected")}}


def _unpaired(row: dict, where: str) -> dict:
    for key in ("prompt", "completion", "label"):
        if key not in row or row[key] is None:
            raise TunelabError(f"{where}: missing field '{key}' (unpaired rows are {{prompt, completion, label}})")
    if not isinstance(row["label"], bool):
        raise TunelabError(f"{where}: field 'label' must be true or false, got {shown(row['label'])}")
    prompt = parse_prompt(row["prompt"], where)
    return {"prompt": prompt, "completion": _completion(row["completion"], "completion", prompt, where), "label": row["label"]}


def _unpaired_from(pair: dict, key: str) -> dict:
    return {"prompt": pair["prompt"], "completion": pair[key], "label": key == "chosen"}


def parse_prompt(value, where: str) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise TunelabError(f"{where}: field 'prompt' is empty")
        return value
    if isinstance(value, list) and value:
        return _messages(value, "prompt", where)
    raise TunelabError(f"{where}: field 'prompt' must be a string or a non-empty list of messages")


def _completion(value, key: str, prompt, where: str) -> str | list[dict]:
    if isinstance(prompt, str):
        if not isinstance(value, str):
            raise TunelabError(f"{where}: field '{key}' must be a string (the prompt is plain text), got {shown(value)}")
        if not value.strip():
            raise TunelabError(f"{where}: field '{key}' is empty")
        return value
    if not isinstance(value, list) or not value:
        raise TunelabError(f"{where}: field '{key}' must be a non-empty list of messages (the prompt is a message list)")
    messages = _messages(value, key, where)
    if messages[-1]["role"] != "assistant":
        raise TunelabError(f"{where}: field '{key}' must end with an assistant message")
    if not messages[-1]["content"].strip():
        raise TunelabError(f"{where}: field '{key}' has an empty assistant message")
    return messages


def _messages(value: list, key: str, where: str) -> list[dict]:
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise TunelabError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content'")
        if message["role"] not in ROLES:
            raise TunelabError(f"{where}: {key}[{i}] has unknown role {shown(message['role'])} (expected one of {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_shared_prompt(row: dict, where: str) -> dict:
    """`{chosen, rejected}` full conversations: the prompt is their shared leading turns (as TRL's
    extract_prompt), which must end before an assistant answer in both."""
    chosen, rejected = _messages(row["chosen"], "chosen", where), _messages(row["rejected"], "rejected", where)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1  # the answers start at the first assistant turn after the shared user turns
    if shared == 0:
        raise TunelabError(f"{where}: 'chosen' and 'rejected' share no leading turns to use as the prompt; give a 'prompt' field")
    prompt = chosen[:shared]
    return {"prompt": prompt, **{key: _completion(turns[shared:], key, prompt, where) for key, turns in (("chosen", chosen), ("rejected", rejected))}}


def tokenize_preference(example: dict, tokenizer, kind: str) -> dict:
    """`prompt_ids` and one id list per completion (`chosen_ids`, `rejected_ids` or `completion_ids`)."""
    tokens = {"prompt_ids": prompt_ids(example["prompt"], tokenizer)}
    for key in COMPLETIONS[kind]:
        tokens[f"{key}_ids"] = _completion_ids(example["prompt"], example[key], tokenizer)
    return tokens


def prompt_ids(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]  # with the tokenizer's BOS, if it adds one
    return tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=False)["input_ids"]


def _completion_ids(prompt, completion, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    before = render_prompt(prompt, tokenizer)
    through = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not through.startswith(before):
        raise TunelabError(
            "the tokenizer's chat template renders the prompt differently once an answer follows; "
            "preference training needs a template whose rendering of the prompt is a prefix of the conversation's"
        )
    # The answer runs to its end-of-turn token; whitespace the template adds after it is not part of it.
    return tokenizer(through[len(before) :].rstrip(), add_special_tokens=False)["input_ids"]


def fit_to_length(tokens: dict, max_length: int) -> tuple[dict, bool]:
    """Cut a row so prompt + its longest completion fit `max_length`: the prompt from the left first
    (keeping at least one token, the one that predicts the answer's first), then the completions
    from the right. Returns the row and whether it was cut."""
    completions = [key for key in tokens if key != "prompt_ids"]
    longest = max(len(tokens[key]) for key in completions)
    prompt = tokens["prompt_ids"]
    if len(prompt) + longest <= max_length:
        return tokens, False
    kept = prompt[len(prompt) - max(1, min(len(prompt), max_length - longest)) :]
    room = max_length - len(kept)
    return {"prompt_ids": kept, **{key: tokens[key][:room] for key in completions}}, True
