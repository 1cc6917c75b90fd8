"""Log-likelihood scoring: how likely the model finds given token sequences (choices, labels, texts).

Multiple-choice and classification tasks score each candidate continuation after the prompt;
perplexity scores whole texts. One batched forward pass per group of sequences (right-padded,
sorted by length); only the scored positions' log-softmax is computed.
"""

from __future__ import annotations

import torch

from tunelab.eval.generation import prompt_text


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


def continuation_logprobs(model, tokenizer, pairs: list[tuple[list[dict] | str, str]], batch_size: int = 16, progress=None) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each continuation after its prompt. The continuation
    is tokenized on its own and appended, so every candidate is scored after the same prompt tokens."""
    sequences = []
    for prompt, continuation in pairs:
        context = prompt_ids(prompt, tokenizer)
        tokens = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"the continuation {continuation!r} has no tokens")
        sequences.append((context + tokens, len(context)))
    return sequence_logprobs(model, sequences, tokenizer.pad_token_id, batch_size, progress)
