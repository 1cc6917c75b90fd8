"""Log-likelihood scoring: how likely the model finds given token sequences (choices, labels, texts).

Multiple-choice and classification tasks score each candidate continuation after the prompt;
perplexity scores whole texts. One batched forward pass per group of sequences (right-padded,
sorted by length); only the scored positions' log-softmax is computed.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tunelab.generation import prompt_text
from tunelab.methods.base import cache_argument


def prompt_ids(prompt: list[dict] | str, tokenizer) -> list[int]:
    """The prompt's tokens exactly as generation encodes them (chat prompts carry their own BOS)."""
    return tokenizer(prompt_text(prompt, tokenizer), add_special_tokens=not isinstance(prompt, list))["input_ids"]


@torch.no_grad()
def sequence_logprobs(model, sequences: list[tuple[list[int], int]], pad_id: int, batch_size: int = 16, progress=None) -> list[tuple[float, int]]:
    """For each (ids, start): the summed log p(ids[t] | ids[:t]) over t >= start, and the number of
    scored tokens (start >= 1: the first token has no prediction)."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        width = max(len(sequences[i][0]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = sequences[i][0]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, i in enumerate(chunk):
            ids, start = sequences[i]
            if not 1 <= start <= len(ids):
                raise ValueError(f"sequence {i}: start {start} outside 1..{len(ids)}")
            predicted = logits[row, start - 1 : len(ids) - 1].float().log_softmax(-1)
            targets = torch.tensor(ids[start:], device=predicted.device)
            results[i] = (predicted.gather(-1, targets[:, None]).sum().item(), len(ids) - start)
        if progress is not None:
            progress(len(chunk))
    return results


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[list[dict] | str, str]], batch_size: int = 16, progress=None) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each continuation after its prompt. The continuation
    is tokenized on its own and appended, so every candidate is scored after the same prompt tokens.

    Each distinct prompt runs once (left-padded, `batch_size` prompts a pass) and its KV cache serves
    all of its continuations: a two-label classification costs one prompt pass, not two. Only the
    scored positions go through the LM head."""
    model.eval()
    device = next(model.parameters()).device
    prompt_rows: dict[tuple[bool, str], list[int]] = {}  # (chat?, text) of a prompt -> the pairs continuing it
    for i, (prompt, _) in enumerate(pairs):
        prompt_rows.setdefault((isinstance(prompt, list), prompt_text(prompt, tokenizer)), []).append(i)
    contexts = {key: prompt_ids(pairs[rows[0]][0], tokenizer) for key, rows in prompt_rows.items()}
    continuations = []
    for prompt, continuation in pairs:
        tokens = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"the continuation {continuation!r} has no tokens")
        continuations.append(tokens)
    order = sorted(prompt_rows, key=lambda key: len(contexts[key]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    cache_key = cache_argument(model)
    pad_id = tokenizer.pad_token_id
    for begin in range(0, len(order), batch_size):
        keys = order[begin : begin + batch_size]
        # The prompts, left-padded so that each one's next-token distribution is the last column.
        width = max(len(contexts[key]) for key in keys)
        input_ids = torch.full((len(keys), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(keys), width), dtype=torch.long)
        for row, key in enumerate(keys):
            input_ids[row, width - len(contexts[key]) :] = torch.tensor(contexts[key])
            attention_mask[row, width - len(contexts[key]) :] = 1
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # as generate() sets them
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=positions.to(device), use_cache=True, logits_to_keep=1, **{cache_key: cache}
        )
        after_prompt = out.logits[:, -1].float().log_softmax(-1)
        # One row per continuation, on a copy of its prompt's cache; its first token is scored by
        # the prompt's last logits, each further token by the continuation's own columns.
        prompt_of = [row for row, key in enumerate(keys) for _ in prompt_rows[key]]
        pair_of = [i for key in keys for i in prompt_rows[key]]
        scored = [after_prompt[row, continuations[i][0]].item() for row, i in zip(prompt_of, pair_of)]
        rest = max(len(continuations[i]) for i in pair_of) - 1
        if rest > 0:
            cache.batch_select_indices(torch.tensor(prompt_of, device=device))
            fed = torch.full((len(pair_of), rest), pad_id, dtype=torch.long)
            fed_mask = torch.zeros((len(pair_of), rest), dtype=torch.long)
            for j, i in enumerate(pair_of):
                fed[j, : len(continuations[i]) - 1] = torch.tensor(continuations[i][:-1])
                fed_mask[j, : len(continuations[i]) - 1] = 1
            starts = attention_mask.sum(-1)[prompt_of]
            logits = model(
                input_ids=fed.to(device),
                attention_mask=torch.cat([attention_mask[prompt_of], fed_mask], 1).to(device),
                position_ids=(starts[:, None] + torch.arange(rest)).to(device),
                use_cache=True,
                **{cache_key: cache},
            ).logits
            for j, i in enumerate(pair_of):
                targets = torch.tensor(continuations[i][1:], device=logits.device)
                if len(targets):
                    scored[j] += logits[j, : len(targets)].float().log_softmax(-1).gather(-1, targets[:, None]).sum().item()
        for j, i in enumerate(pair_of):
            results[i] = (scored[j], len(continuations[i]))
        if progress is not None:
            progress(len(pair_of))
    return results
