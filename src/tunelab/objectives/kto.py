"""KTO (Ethayarajh et al. 2024) as TRL 1.16's KTOTrainer computes it: unpaired examples, each labelled
desirable or not, against a reference policy and a KL reference point.

With ρ = log π(y|x) − log π_ref(y|x) (summed over the completion tokens) and z the KL point:
desirable examples lose w_d·(1 − σ(β(ρ − z))), undesirable ones w_u·(1 − σ(β(z − ρ))), and the loss
is their mean over the examples (not over the weights). z is estimated, without gradient, from
mismatched pairs: the micro-batch's prompts each with the previous example's completion (TRL
rotates completions by one within each per-device batch), as mean(log π − log π_ref), clamped at
0. So z is defined per micro-batch, as in TRL: gradient accumulation changes it (the only
objective here where it does). `loss_type: apo_zero_unpaired` drops z: 1 − σ(βρ) and σ(βρ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from tunelab.data.batching import Batch, BatchLayout
from tunelab.objectives.base import Objective, ObjectiveOutput, Summed
from tunelab.objectives.causal_lm import target_log_probs
from tunelab.objectives.pairs import completion_sample
from tunelab.objectives.reference import ReferenceOptions


class KtoOptions(ReferenceOptions):
    name: Literal["kto"] = "kto"
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float = Field(default=1.0, gt=0)
    undesirable_weight: float = Field(default=1.0, gt=0)

    def check_train(self, train) -> None:
        if self.loss_type == "kto" and train.batch_size < 2:
            raise ValueError("objective kto needs train.batch_size >= 2: its KL point comes from mismatched pairs within a micro-batch")


@dataclass
class KtoBatch:
    """A whole micro-batch (its KL point is the micro-batch's): its examples, and the same prompts
    each with the previous example's completion (the KL sequences, run without gradient)."""

    examples: Batch
    kl_sequences: Batch
    rows: list[int]
    kl_rows: list[int]  # the row each KL sequence's completion comes from
    labels: torch.Tensor  # (n,) True where desirable
    counts: dict[str, int]

    @property
    def n_examples(self) -> int:
        return len(self.rows)

    @property
    def n_tokens(self) -> int:
        return self.examples.n_tokens + self.kl_sequences.n_tokens

    def to(self, device: torch.device) -> KtoBatch:
        return KtoBatch(self.examples.to(device), self.kl_sequences.to(device), self.rows, self.kl_rows, self.labels.to(device), self.counts)

    @property
    def sequence_keys(self) -> list[str]:
        return [f"{row}" for row in self.rows] + [f"{row}:kl:{other}" for row, other in zip(self.rows, self.kl_rows)]

    def reference_log_probs(self, model) -> torch.Tensor:
        """Each example's completion log-probability, then each KL sequence's."""
        n = self.n_examples
        return torch.cat([target_log_probs(model, self.examples).sums(n), target_log_probs(model, self.kl_sequences).sums(n)])


def kto_batch(samples: list[dict], layout: BatchLayout) -> KtoBatch:
    n = len(samples)
    previous = [samples[(i - 1) % n] for i in range(n)]
    mismatched = [{"prompt_ids": s["prompt_ids"], "completion_ids": p["completion_ids"]} for s, p in zip(samples, previous)]
    labels = torch.tensor([bool(s["label"]) for s in samples])
    tokens = [len(s["completion_ids"]) for s in samples]
    counts = {
        "examples": n,
        "desirable": int(labels.sum()),
        "undesirable": int((~labels).sum()),
        "kto_batches": 1,
        "desirable_tokens": sum(t for t, good in zip(tokens, labels.tolist()) if good),
        "undesirable_tokens": sum(t for t, good in zip(tokens, labels.tolist()) if not good),
        "completion_tokens": sum(tokens),
    }
    examples = layout.batch([completion_sample(s, "completion_ids") for s in samples])
    kl_sequences = layout.batch([completion_sample(s, "completion_ids") for s in mismatched])
    return KtoBatch(examples, kl_sequences, [s["row"] for s in samples], [p["row"] for p in previous], labels, counts)


class Kto(Objective):
    """KTO: unpaired desirable/undesirable examples against a reference policy and a KL point."""

    name = "kto"
    Options = KtoOptions
    rows = "unpaired"
    progress_metrics = ("kl", "rewards/chosen", "rewards/rejected")

    @property
    def needs_reference(self) -> bool:
        return True

    def forward_batches(self, samples: list[dict], layout, max_tokens: int) -> list[KtoBatch]:
        # The KL point is a statistic of the whole micro-batch: it is one forward batch, whatever max_tokens.
        return [kto_batch(samples, layout)]

    def language_model_samples(self, samples: list[dict]) -> list[dict]:
        return [completion_sample(s, "completion_ids") for s in samples if s["label"]]

    def output(self, model, batch: KtoBatch, reference=None) -> ObjectiveOutput:
        opts, n = self.options, batch.n_examples
        # The no-grad forwards (reference, KL point) first, while no activations are held for backward.
        reference_values = reference.log_probs(batch)
        if opts.loss_type == "kto":
            with torch.no_grad():
                kl_log_probs = target_log_probs(model, batch.kl_sequences).sums(n)
        policy = target_log_probs(model, batch.examples)
        log_probs = policy.sums(n)
        ratio = log_probs - reference_values[:n]
        if opts.loss_type == "kto":
            kl = (kl_log_probs - reference_values[n:]).mean().clamp(min=0)
            desirable_losses = 1 - torch.sigmoid(opts.beta * (ratio - kl))
            undesirable_losses = 1 - torch.sigmoid(opts.beta * (kl - ratio))
        else:
            kl = torch.zeros(())
            desirable_losses = 1 - torch.sigmoid(opts.beta * ratio)
            undesirable_losses = torch.sigmoid(opts.beta * ratio)
        good = batch.labels
        losses = torch.where(good, opts.desirable_weight * desirable_losses, opts.undesirable_weight * undesirable_losses)
        rewards = opts.beta * ratio.detach()
        stats = policy.stat_sums(n)
        metrics = {
            "kl": Summed(kl.detach(), "kto_batches"),
            "rewards/chosen": Summed(rewards[good].sum(), "desirable"),
            "rewards/rejected": Summed(rewards[~good].sum(), "undesirable"),
            "logps/chosen": Summed(log_probs.detach()[good].sum(), "desirable"),
            "logps/rejected": Summed(log_probs.detach()[~good].sum(), "undesirable"),
            "logits/chosen": Summed(stats["mean_logit"][good].sum(), "desirable_tokens"),
            "logits/rejected": Summed(stats["mean_logit"][~good].sum(), "undesirable_tokens"),
            "entropy": Summed(stats["entropy"].sum(), "completion_tokens"),
        }
        return ObjectiveOutput(terms={"kto_loss": Summed(losses.sum(), "examples")}, metrics=metrics)

    def derived(self, means: dict[str, float]) -> dict[str, float]:
        if "rewards/chosen" in means and "rewards/rejected" in means:
            return {"rewards/margins": means["rewards/chosen"] - means["rewards/rejected"]}
        return {}
