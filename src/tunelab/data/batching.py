"""Turn tokenized samples into model inputs: padded rows, or packed rows with per-sample attention.

Labels are shifted here: `labels[t]` is the token to predict at position t (-100 where nothing is
predicted), so a row can hold several samples without any sample predicting its neighbour's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tunelab.models.attention import PREFIX_SPANS

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, length)
    labels: torch.Tensor  # (rows, length), already shifted; IGNORE where there is no target
    position_ids: torch.Tensor  # (rows, length), restarting at 0 for each sample
    # (rows, 1, length, length) bool, True where a query may attend; None for a padding-free row
    attention_mask: torch.Tensor | None
    # Padding-free rows: cumulative sample lengths (0, n1, n1+n2, ...), for packed attention
    cu_seq_lens: torch.Tensor | None
    n_tokens: int  # real (non-padding) tokens
    n_targets: int  # tokens the loss falls on
    # (rows, length): the position's sample, as its index in the list given to make_batch; -1 on padding
    sample_index: torch.Tensor
    # Shared-prefix rows (`make_shared_prefix_batch`): for each segment of cu_seq_lens, the span
    # (start, end) of the shared prefix it also attends to, or None.
    prefix_spans: list[tuple[int, int] | None] | None = None

    def to(self, device: torch.device) -> Batch:
        # cu_seq_lens stays on the CPU: the attention reads it as Python ints, without a device sync.
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) and k != "cu_seq_lens" else v for k, v in self.__dict__.items()}
        return Batch(**moved)

    @property
    def counts(self) -> dict[str, int]:
        return {"target_tokens": self.n_targets}

    def model_inputs(self) -> dict:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}
        if self.cu_seq_lens is not None:
            inputs["cu_seq_lens_q"] = self.cu_seq_lens
        if self.prefix_spans is not None:
            inputs[PREFIX_SPANS] = self.prefix_spans
        return inputs


@dataclass(frozen=True)
class BatchLayout:
    """How a run lays samples out in forward batches (see `make_batch`)."""

    max_length: int
    packing: bool
    pad_id: int
    padding_free: bool = False
    # Sequences that start alike (a preference pair's prompt) may share one computation of their
    # common prefix (`make_shared_prefix_batch`): padding-free rows and a method that computes each
    # token alike wherever its sample starts (not prompt tuning's virtual tokens, not ReFT).
    share_prefixes: bool = False

    def batch(self, samples: list[dict]) -> Batch:
        return make_batch(samples, self.max_length, self.packing, self.pad_id, self.padding_free)

    def shared_prefix_batch(self, samples: list[dict], groups: list[tuple[int, list[int]]]) -> Batch:
        """`groups` (prefix length, sample indices): see `make_shared_prefix_batch`; without
        share_prefixes, the samples laid out one by one as `batch` does."""
        if not self.share_prefixes:
            return self.batch(samples)
        return make_shared_prefix_batch(samples, groups)


def make_batch(samples: list[dict], max_length: int, packing: bool, pad_id: int, padding_free: bool = False) -> Batch:
    """Padded rows (no packing), packed rows of at most max_length tokens with a block-causal mask
    (packing), or all samples in one row with no padding and no mask (padding_free: the model's
    attention must read the sample boundaries, see models/attention.py)."""
    if padding_free:
        rows = [list(range(len(samples)))]
    elif packing:
        rows = pack_rows([len(s["input_ids"]) for s in samples], max_length)
    else:
        rows = [[i] for i in range(len(samples))]
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment = torch.zeros(shape, dtype=torch.long)  # 0 = padding, k = k-th sample of the row
    sample_index = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row, start=1):
            ids = torch.tensor(samples[i]["input_ids"], dtype=torch.long)
            mask = torch.tensor(samples[i]["target_mask"], dtype=torch.bool)
            n = len(ids)
            input_ids[r, start : start + n] = ids
            labels[r, start : start + n - 1] = next_token_labels(ids, mask)
            position_ids[r, start : start + n] = torch.arange(n)
            segment[r, start : start + n] = k
            sample_index[r, start : start + n] = i
            start += n
    attention = cu_seq_lens = None
    if padding_free:
        lengths = torch.tensor([0] + [len(s["input_ids"]) for s in samples])
        cu_seq_lens = lengths.cumsum(0).to(torch.int32)
    else:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same_sample = segment[:, :, None] == segment[:, None, :]
        # Padding queries attend to themselves only: a row of all -inf would make softmax NaN.
        attention = ((same_sample & causal & (segment[:, None, :] > 0)) | torch.eye(width, dtype=torch.bool))[:, None]
    return Batch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        attention_mask=attention,
        cu_seq_lens=cu_seq_lens,
        n_tokens=int((segment > 0).sum()),
        n_targets=int((labels != IGNORE).sum()),
        sample_index=sample_index,
    )


def make_shared_prefix_batch(samples: list[dict], groups: list[tuple[int, list[int]]]) -> Batch:
    """One padding-free row where each group of samples that begin with the same `prefix` tokens
    computes those tokens once. A group is laid out as its shared part (the prefix but its last
    token) and then, per member, the member's tokens from the prefix's last token on, which attend
    to the shared part and causally to themselves (models/attention.py, through `prefix_spans`).
    Repeating that one token gives every member the prediction of its first own token in its own
    segment; every target is the same next-token prediction as in `make_batch`'s layout. The
    shared part's targets belong to the group's first member (the others may have none there).
    `n_tokens` counts each sample whole, as if laid out alone."""
    input_ids, labels, position_ids, sample_index, bounds, spans = [], [], [], [], [0], []

    def add_segment(ids: torch.Tensor, segment_labels: torch.Tensor, first_position: int, owner: int, span) -> None:
        input_ids.append(ids)
        labels.append(segment_labels)
        position_ids.append(torch.arange(first_position, first_position + len(ids)))
        sample_index.append(torch.full((len(ids),), owner))
        bounds.append(bounds[-1] + len(ids))
        spans.append(span)

    for prefix, members in groups:
        shared = max(prefix - 1, 0)
        span = (bounds[-1], bounds[-1] + shared) if shared else None
        if shared:
            owner = samples[members[0]]
            if any(any(samples[i]["target_mask"][1 : shared + 1]) for i in members[1:]) or any(samples[i]["input_ids"][:prefix] != owner["input_ids"][:prefix] for i in members):
                raise ValueError("shared-prefix members must start with the same prefix and have no targets in it but the first's")
            # The shared part predicts up to the prefix's last token, which its members repeat.
            ids = torch.tensor(owner["input_ids"][: shared + 1])
            add_segment(ids[:shared], next_token_labels(ids, torch.tensor(owner["target_mask"][: shared + 1], dtype=torch.bool)), 0, members[0], None)
        for i in members:
            ids = torch.tensor(samples[i]["input_ids"][shared:])
            own_labels = next_token_labels(ids, torch.tensor(samples[i]["target_mask"][shared:], dtype=torch.bool))
            add_segment(ids, torch.cat([own_labels, torch.tensor([IGNORE])]), shared, i, span)
    label_row = torch.cat(labels)[None]
    return Batch(
        input_ids=torch.cat(input_ids)[None],
        labels=label_row,
        position_ids=torch.cat(position_ids)[None],
        attention_mask=None,
        cu_seq_lens=torch.tensor(bounds, dtype=torch.int32),
        n_tokens=sum(len(s["input_ids"]) for s in samples),
        n_targets=int((label_row != IGNORE).sum()),
        sample_index=torch.cat(sample_index)[None],
        prefix_spans=spans,
    )


def prompt_completion_sample(prompt: list[int], completion: list[int], prompt_targets: bool = False, completion_targets: bool = True) -> dict:
    """prompt + completion as a next-token sample: the completion's tokens are its targets
    (`prompt_targets`: the prompt's too; `completion_targets` False: none of them)."""
    return {"input_ids": prompt + completion, "target_mask": [int(prompt_targets)] * len(prompt) + [int(completion_targets)] * len(completion)}


def next_token_labels(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What each position but the last predicts: the next token where it is a target, else IGNORE."""
    return torch.where(targets[1:], ids[1:], IGNORE)


def split_by_tokens(samples: list, max_tokens: int, length: Callable[[dict], int] | None = None) -> list[list]:
    """Group samples so each group holds at most max_tokens tokens (a longer sample goes alone); 0: one
    group. `length`: a sample's tokens (default: its input_ids), for samples that are several sequences."""
    if not max_tokens:
        return [samples]
    lengths = [length(s) if length else len(s["input_ids"]) for s in samples]
    return [[samples[i] for i in group] for group in pack_rows(lengths, max_tokens)]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices grouped into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows
