"""Loss and perplexity of a model on a tokenized split."""

from __future__ import annotations

import math

import torch

from tunelab.data.batching import make_batch
from tunelab.models.attention import uses_packed_attention
from tunelab.objectives import causal_lm_loss


@torch.no_grad()
def evaluate_loss(model, dataset, batch_size: int, max_length: int, packing: bool, pad_id: int) -> dict:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n_targets = 0.0, 0
    padding_free = packing and uses_packed_attention(model)
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = make_batch(samples, max_length, packing, pad_id, padding_free)
        total += causal_lm_loss(model, batch.to(device)).item()
        n_targets += batch.n_targets
    model.train(was_training)
    loss = total / n_targets
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_target_tokens": n_targets}
