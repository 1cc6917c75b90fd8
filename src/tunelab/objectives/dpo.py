"""Direct Preference Optimization and its pairwise variants (IPO, hinge, robust), as TRL 1.16's
DPOTrainer computes them.

For each pair, with log-ratios c = log π(chosen) − log π_ref(chosen) and r likewise (sums over the
completion tokens) and δ = c − r:
- sigmoid (DPO, Rafailov et al. 2023): −log σ(β·δ)
- hinge (SLiC): max(0, 1 − β·δ)
- ipo (Azar et al. 2023): (c/|chosen| − r/|rejected| − 1/(2β))², the log-ratios averaged per
  completion token, as TRL does (its comment: confirmed with the IPO authors)
- robust (Chowdhury et al. 2024): ((1−ε)·(−log σ(β·δ)) − ε·(−log σ(−β·δ))) / (1 − 2ε), ε = label_smoothing
The loss is the mean over the step's pairs. `reference_free: true` compares with a uniform
reference (log π_ref = 0), as TRL's DPOTrainer did before 1.x removed the option.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from tunelab.objectives.base import ObjectiveOutput, Summed
from tunelab.objectives.pairs import PairBatch, PairwiseObjective, pair_log_probs, reward_metrics
from tunelab.objectives.reference import ReferenceOptions


class DpoOptions(ReferenceOptions):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="robust only: the assumed share of flipped labels")
    reference_free: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> DpoOptions:
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError("objective.label_smoothing applies to loss_type: robust only (as in TRL 1.16)")
        if self.reference_free and (self.reference or self.precompute_reference):
            raise ValueError("objective.reference_free uses no reference model: drop objective.reference / precompute_reference")
        return self


class Dpo(PairwiseObjective):
    """DPO and its pairwise family (IPO, hinge, robust) against a frozen reference policy."""

    name = "dpo"
    Options = DpoOptions

    @property
    def needs_reference(self) -> bool:
        return not self.options.reference_free

    def output(self, model, batch: PairBatch, reference=None) -> ObjectiveOutput:
        n = batch.n_pairs
        # The reference's no-grad forward first, while no activations are held for backward.
        ref = torch.zeros(2 * n) if self.options.reference_free else reference.log_probs(batch)
        policy = pair_log_probs(model, batch)
        ref_chosen, ref_rejected = ref[:n].to(policy.chosen), ref[n:].to(policy.chosen)
        chosen_ratio, rejected_ratio = policy.chosen - ref_chosen, policy.rejected - ref_rejected
        losses = self.pair_losses(chosen_ratio, rejected_ratio, policy.chosen_lengths, policy.rejected_lengths)
        beta = self.options.beta
        metrics = {**reward_metrics(beta * chosen_ratio, beta * rejected_ratio, policy.chosen, policy.rejected), **policy.token_metrics()}
        return ObjectiveOutput(terms={"dpo_loss": Summed(losses.sum(), "pairs")}, metrics=metrics)

    def pair_losses(self, chosen_ratio, rejected_ratio, chosen_lengths, rejected_lengths) -> torch.Tensor:
        beta, smoothing = self.options.beta, self.options.label_smoothing
        delta = chosen_ratio - rejected_ratio
        if self.options.loss_type == "sigmoid":
            return -F.logsigmoid(beta * delta)
        if self.options.loss_type == "hinge":
            return torch.relu(1 - beta * delta)
        if self.options.loss_type == "ipo":
            per_token = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
            return (per_token - 1 / (2 * beta)) ** 2
        clean = -(1 - smoothing) * F.logsigmoid(beta * delta)
        flipped = -smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * smoothing)
