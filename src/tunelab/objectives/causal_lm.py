"""Next-token log-probabilities on target positions: the cross-entropy sum (SFT, continued
pretraining) and each sequence's log-probability (the preference objectives)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from tunelab.data.batching import IGNORE, Batch
from tunelab.methods.base import visible_targets

# Logits computed at once (rows x vocabulary): large enough for an efficient matmul (150 rows at
# a 49k vocabulary), small enough (30 MB) to stay under glibc's 32 MiB mmap threshold, so each
# chunk reuses heap memory instead of faulting in fresh pages (see train/allocator.py).
CHUNK_ELEMENTS = 7_500_000
# TokenLogProbs holds four tensors of a chunk's size at once (logits, log-probabilities and the
# entropy's two temporaries), cross-entropy one or two: a third of the chunk keeps its peak alike.
TOKEN_CHUNK_ELEMENTS = CHUNK_ELEMENTS // 3


def causal_lm_loss(model, batch: Batch) -> torch.Tensor:
    """Sum of the cross-entropy over the batch's target tokens (not the mean).

    The output head runs only on target positions (on chat data most positions are prompt
    tokens), a chunk at a time, so the full (tokens x vocabulary) logits never exist.
    """
    hidden, head_weight, labels = at_targets(model, batch)
    if head_weight is None:  # `hidden` holds the logits
        return F.cross_entropy(hidden.float(), labels, reduction="sum")
    return LinearCrossEntropy.apply(hidden, head_weight, labels)


@dataclass
class TargetLogProbs:
    """Each target token's log-probability (with its graph), the sample it belongs to (its index in
    the list the batch was made from), the position in that sample of the token it predicts, and the
    statistics TRL logs (`mean_logit`, `entropy`, `top1`: the label is the argmax; no gradient)."""

    log_probs: torch.Tensor
    owner: torch.Tensor
    position: torch.Tensor
    stats: torch.Tensor  # (targets, len(TOKEN_STATS))

    def sums(self, n_samples: int, where: torch.Tensor | None = None) -> torch.Tensor:
        """Per sample: the summed log-probability of its targets (those `where` marks, if given)."""
        values = self.log_probs if where is None else self.log_probs * where
        return values.new_zeros(n_samples).index_add(0, self.owner, values)

    def counts(self, n_samples: int, where: torch.Tensor | None = None) -> torch.Tensor:
        weights = None if where is None else where.to(torch.float32)
        return torch.bincount(self.owner, weights=weights, minlength=n_samples)

    def stat_sums(self, n_samples: int) -> dict[str, torch.Tensor]:
        sums = self.stats.new_zeros(n_samples, len(TOKEN_STATS)).index_add(0, self.owner, self.stats)
        return {name: sums[:, k] for k, name in enumerate(TOKEN_STATS)}


def target_log_probs(model, batch: Batch, temperature: float = 1.0) -> TargetLogProbs:
    """The log-probabilities of the batch's target tokens, chunked like `causal_lm_loss`: the
    (tokens x vocabulary) logits never exist at once. `temperature` divides the logits first (the
    distribution completions were sampled from, as GRPO reads it)."""
    hidden, head_weight, labels = at_targets(model, batch)
    if temperature != 1.0:
        hidden = hidden / temperature  # (h/T)·W = (h·W)/T, and logits/T when `hidden` holds them
    if head_weight is None:  # `hidden` holds the logits
        log_probs = torch.log_softmax(hidden.float(), dim=-1)
        token_log_probs = log_probs.gather(1, labels[:, None]).squeeze(1)
        token_stats = _token_stats(hidden.detach().float(), log_probs.detach(), labels)
    else:
        token_log_probs, token_stats = TokenLogProbs.apply(hidden, head_weight, labels)
    targets = batch.labels != IGNORE
    return TargetLogProbs(token_log_probs, batch.sample_index[targets], batch.position_ids[targets] + 1, token_stats)


TOKEN_STATS = ("mean_logit", "entropy", "top1")


def _token_stats(logits: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(rows, 3): each row's mean logit, entropy of its distribution, and whether its label is the argmax."""
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    top1 = (logits.argmax(dim=-1) == labels).float()
    return torch.stack([logits.mean(dim=-1), entropy, top1], dim=1)


def at_targets(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The forward every objective's loss runs: (final hidden states at target positions, the
    output head's weight, labels), or, for models whose logits are not just head(hidden) (a head
    bias, softcapping, scaling), (logits at target positions, None, labels). Method hooks inside the
    model see the target mask (FORWARD_TARGETS) for its duration."""
    targets = batch.labels != IGNORE
    labels = batch.labels[targets]
    inputs = batch.model_inputs()
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    with visible_targets(targets):
        if backbone is None or backbone is model or head is None or head.bias is not None or _has_logit_postprocessing(model.config):
            return model(**inputs, use_cache=False).logits[targets], None, labels
        if isinstance(model, FSDPModule):
            # Sharded (FSDP2): the model's own forward gathers the embeddings and head, which it keeps
            # whole until backward (the root unit is not resharded after forward); no logits.
            output = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long))
            return output.hidden_states[-1][targets], _head_weight(head), labels
        return backbone(**inputs, use_cache=False).last_hidden_state[targets], _head_weight(head), labels


def store_head_weight(model, dtype: torch.dtype) -> bool:
    """Give training a copy of the output head's weight in `dtype` (a faster matmul dtype: the
    frozen layers' training copies, Method.store_frozen_weights), if the head is frozen; True if
    done. Evaluation, and training once the weight trains or changes, use the weight itself."""
    head = model.get_output_embeddings()
    if head is None or head.weight.requires_grad or head.weight.dtype == dtype:
        return False
    head.compute_weight = (head.weight.detach().to(dtype), head.weight._version)
    return True


def _head_weight(head) -> torch.Tensor:
    weight = head.weight
    copy, version = getattr(head, "compute_weight", (None, None))
    if head.training and copy is not None and not weight.requires_grad and weight._version == version:
        return copy
    return weight


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
            log_probs = torch.log_softmax((h.to(weight.dtype) @ weight.t()).float(), dim=-1)
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


class TokenLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weightᵀ)[labels] per row, and each row's `_token_stats`, in row chunks.

    Unlike the cross-entropy sum, each token's log-probability gets its own gradient (a DPO pair
    weighs its sequences differently), so backward recomputes each chunk's probabilities instead of
    keeping (tokens x vocabulary) of them: one more head matmul for a chunk's memory.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
        log_probs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        stats = torch.empty(hidden.shape[0], len(TOKEN_STATS), dtype=torch.float32, device=hidden.device)
        for rows, h, y in row_chunks(hidden, weight, labels):
            logits = (h.to(weight.dtype) @ weight.t()).float()
            chunk_log_probs = torch.log_softmax(logits, dim=-1)
            log_probs[rows] = chunk_log_probs.gather(1, y[:, None]).squeeze(1)
            stats[rows] = _token_stats(logits, chunk_log_probs, y)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.mark_non_differentiable(stats)
        return log_probs, stats

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor, _grad_stats):
        hidden, weight, labels = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for rows, h, y in row_chunks(hidden, weight, labels):
            # d log p(y) / d logits = one_hot(y) - softmax, times each row's upstream gradient
            grad_logits = torch.softmax((h.to(weight.dtype) @ weight.t()).float(), dim=-1).neg_()
            grad_logits[torch.arange(len(y), device=y.device), y] += 1
            grad_logits *= grad_log_probs[rows, None]
            if want_hidden:
                grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
            if want_weight:
                grad_weight.addmm_(grad_logits.t(), h.float())
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None


def row_chunks(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """(row slice, hidden rows, labels) chunks of about TOKEN_CHUNK_ELEMENTS logits each."""
    step = max(1, TOKEN_CHUNK_ELEMENTS // weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        yield rows, hidden[rows], labels[rows]


def _has_logit_postprocessing(config) -> bool:
    """Models whose logits are not just head(hidden) (softcapping, scaling) take the full forward."""
    return bool(getattr(config, "final_logit_softcapping", None)) or getattr(config, "logit_scale", 1.0) not in (None, 1.0)
