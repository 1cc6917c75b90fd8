"""Loss and perplexity of a model on a tokenized next-token split."""

from __future__ import annotations

from tunelab.data.batching import BatchLayout
from tunelab.models.attention import uses_packed_attention
from tunelab.objectives.base import evaluate_objective
from tunelab.objectives.sft import Sft, SftOptions


def evaluate_loss(model, dataset, batch_size: int, max_length: int, packing: bool, pad_id: int) -> dict:
    """eval_loss, eval_ppl and eval_target_tokens of the SFT objective."""
    layout = BatchLayout(max_length, packing, pad_id, packing and uses_packed_attention(model))
    return evaluate_objective(Sft(SftOptions()), model, dataset, batch_size, layout)
