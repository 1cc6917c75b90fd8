"""Next-token cross-entropy on target positions (SFT and continued pretraining)."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from tunelab.data.batching import IGNORE, Batch

# Logits computed at once (rows x vocabulary): large enough for an efficient matmul (150 rows at
# a 49k vocabulary), small enough (30 MB) to stay under glibc's 32 MiB mmap threshold, so each
# chunk reuses heap memory instead of faulting in fresh pages (see train/allocator.py).
CHUNK_ELEMENTS = 7_500_000

# The target mask (labels != IGNORE, shaped like input_ids) of the forward pass causal_lm_loss is
# running, for method hooks inside the model that must tell prompt positions from targets (ReFT
# intervenes on prompt tokens only); None in every other forward (generation, plain calls).
# Training and eval loss both go through causal_lm_loss, so no signature changes anywhere.
FORWARD_TARGETS: ContextVar[torch.Tensor | None] = ContextVar("forward_targets", default=None)


def causal_lm_loss(model, batch: Batch) -> torch.Tensor:
    """Sum of the cross-entropy over the batch's target tokens (not the mean).

    The output head runs only on target positions (on chat data most positions are prompt
    tokens), a chunk at a time, so the full (tokens x vocabulary) logits never exist.
    """
    targets = batch.labels != IGNORE
    labels = batch.labels[targets]
    inputs = batch.model_inputs()
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    with _visible_targets(targets):
        if backbone is None or backbone is model or head is None or head.bias is not None or _has_logit_postprocessing(model.config):
            logits = model(**inputs, use_cache=False).logits[targets]
            return F.cross_entropy(logits.float(), labels, reduction="sum")
        hidden = backbone(**inputs, use_cache=False).last_hidden_state[targets]
    return LinearCrossEntropy.apply(hidden, head.weight, labels)


@contextmanager
def _visible_targets(targets: torch.Tensor):
    """FORWARD_TARGETS is `targets` inside the block."""
    token = FORWARD_TARGETS.set(targets)
    try:
        yield
    finally:
        FORWARD_TARGETS.reset(token)


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weightᵀ, labels)), computed in row chunks.

    The gradients are worked out in the forward pass, chunk by chunk, while each chunk's
    probabilities are at hand; backward only scales them. Peak memory is one chunk of logits
    instead of three full (tokens x vocabulary) tensors.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        want_grad_hidden, want_grad_weight = hidden.requires_grad, weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows], labels[start : start + rows]
            picked = (torch.arange(len(y), device=y.device), y)
            log_probs = torch.log_softmax((h @ weight.t()).float(), dim=-1)
            total -= log_probs[picked].sum()
            if want_grad_hidden or want_grad_weight:
                grad_logits = log_probs.exp_()  # softmax - one_hot(y): d(loss)/d(logits)
                grad_logits[picked] -= 1
                if want_grad_hidden:
                    grad_hidden[start : start + rows] = grad_logits.to(weight.dtype) @ weight
                if want_grad_weight:
                    grad_weight.addmm_(grad_logits.t(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None


def _has_logit_postprocessing(config) -> bool:
    """Models whose logits are not just head(hidden) (softcapping, scaling) take the full forward."""
    return bool(getattr(config, "final_logit_softcapping", None)) or getattr(config, "logit_scale", 1.0) not in (None, 1.0)
