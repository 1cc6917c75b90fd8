"""Canonical example -> token ids and a target mask (which tokens the loss falls on).

Chat examples are rendered with the tokenizer's own chat template. An assistant turn's targets are
its content plus the end-of-turn token the template emits after it, so a trained model learns to
stop. Plain examples (prompt/completion, text) are tokenized segment by segment, ending in EOS.
"""

from __future__ import annotations

from tunelab.errors import TunelabError


def tokenize_example(example: dict, tokenizer, train_on: str = "assistant") -> dict:
    if example.get("messages"):
        ids, mask = _tokenize_chat(example["messages"], tokenizer)
    else:
        ids, mask = _tokenize_segments(example["segments"], tokenizer)
    if train_on == "all":
        mask = [1] * len(ids)
    return {"input_ids": ids, "target_mask": mask}


def render_prompt(messages: list[dict], tokenizer) -> str:
    """The chat text that asks the model for the next assistant turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of the assistant turns inside `text`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_prompt(messages[:i], tokenizer)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(before) or not text.startswith(through):
            raise TunelabError(
                "the tokenizer's chat template renders earlier turns differently once later turns follow; "
                "assistant-only loss needs a template whose renderings of a conversation's prefixes are prefixes"
            )
        # The turn runs to the end-of-turn token; whitespace the template adds after it is not a target.
        spans.append((len(before), len(through.rstrip())))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= s < end for start, end in spans)) for s, _ in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), mask


def _tokenize_segments(segments: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    mask: list[int] = []
    for i, segment in enumerate(segments):
        piece = tokenizer(segment["text"], add_special_tokens=(i == 0))["input_ids"] if segment["text"] else []
        ids += piece
        mask += [int(segment["train"])] * len(piece)
    ids.append(tokenizer.eos_token_id)
    mask.append(1)
    return ids, mask
