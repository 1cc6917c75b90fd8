"""Next-token cross-entropy on target positions (SFT and continued pretraining)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.batching import IGNORE, Batch


def causal_lm_loss(model, batch: Batch) -> torch.Tensor:
    """Sum of the cross-entropy over the batch's target tokens (not the mean).

    The output head runs only on target positions: on chat data most positions are prompt tokens,
    and the vocabulary projection is a large part of a small model's compute.
    """
    targets = batch.labels != IGNORE
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    if backbone is None or backbone is model or head is None or _has_logit_postprocessing(model.config):
        logits = model(**inputs, use_cache=False).logits[targets]
    else:
        logits = head(backbone(**inputs, use_cache=False).last_hidden_state[targets])
    return F.cross_entropy(logits.float(), batch.labels[targets], reduction="sum")


def _has_logit_postprocessing(config) -> bool:
    """Models whose logits are not just head(hidden) (softcapping, scaling) take the full forward."""
    return bool(getattr(config, "final_logit_softcapping", None)) or getattr(config, "logit_scale", 1.0) not in (None, 1.0)
