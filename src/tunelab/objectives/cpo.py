"""Reference-free pairwise objectives as TRL 1.16's CPOTrainer computes them: CPO and SimPO.

With z = log π(chosen) − log π(rejected) (summed over the completion tokens; averaged per token for
`ipo` and for SimPO):
- cpo, loss_type sigmoid (Xu et al. 2024): −(1−ε)·log σ(β·z) − ε·log σ(−β·z), ε = label_smoothing
- cpo, hinge: max(0, 1 − β·z); ipo: (z − 1/(2β))²
- simpo (Meng et al. 2024): the sigmoid loss of z − γ/β, i.e. −log σ(β·(avg_c − avg_r) − γ)
plus `cpo_alpha` times the NLL of the chosen completions (a mean over their tokens). TRL 1.16's
default cpo_alpha is 1.0 for both, so its SimPO is CPO-SimPO; `cpo_alpha: 0` is the paper's SimPO.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from tunelab.objectives.base import ObjectiveOptions, ObjectiveOutput, Summed
from tunelab.objectives.pairs import PairBatch, PairwiseObjective, pair_log_probs, reward_metrics


class CpoOptions(ObjectiveOptions):
    name: Literal["cpo"] = "cpo"
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    cpo_alpha: float = Field(default=1.0, ge=0, description="weight of the NLL term on the chosen completions")

    @model_validator(mode="after")
    def _smoothing_with_sigmoid(self):
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"objective.label_smoothing applies to the sigmoid loss, not loss_type: {self.loss_type}")
        return self


class SimpoOptions(ObjectiveOptions):
    name: Literal["simpo"] = "simpo"
    beta: float = Field(default=0.1, gt=0)
    gamma: float = Field(default=0.5, description="the target reward margin (TRL's simpo_gamma)")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    cpo_alpha: float = Field(default=1.0, ge=0, description="weight of the NLL term; 0 is the paper's SimPO")


class Cpo(PairwiseObjective):
    """CPO: a reference-free pairwise loss plus the NLL of the chosen completions."""

    name = "cpo"
    Options = CpoOptions

    def loss_type(self) -> str:
        return self.options.loss_type

    def averaged(self) -> bool:
        """Whether log-probabilities are averaged per completion token."""
        return self.options.loss_type == "ipo"

    def margin(self) -> float:
        return 0.0

    def output(self, model, batch: PairBatch, reference=None) -> ObjectiveOutput:
        opts = self.options
        policy = pair_log_probs(model, batch)
        if self.averaged():
            chosen, rejected = policy.chosen / policy.chosen_lengths, policy.rejected / policy.rejected_lengths
        else:
            chosen, rejected = policy.chosen, policy.rejected
        z = chosen - rejected - self.margin() / opts.beta
        if self.loss_type() == "hinge":
            losses = torch.relu(1 - opts.beta * z)
        elif self.loss_type() == "ipo":
            losses = (z - 1 / (2 * opts.beta)) ** 2
        else:
            losses = -(1 - opts.label_smoothing) * F.logsigmoid(opts.beta * z) - opts.label_smoothing * F.logsigmoid(-opts.beta * z)
        terms = {"pair_loss": Summed(losses.sum(), "pairs")}
        nll = -policy.chosen.sum()  # the chosen completions' tokens
        if opts.cpo_alpha:
            terms["nll"] = Summed(opts.cpo_alpha * nll, "chosen_tokens")
        metrics = {
            **reward_metrics(opts.beta * chosen, opts.beta * rejected, chosen, rejected),
            "nll_loss": Summed(nll.detach() if opts.cpo_alpha else torch.zeros(()), "chosen_tokens"),
            **policy.token_metrics(),
        }
        return ObjectiveOutput(terms=terms, metrics=metrics)


class Simpo(Cpo):
    """SimPO: length-normalized log-probabilities with a target margin γ (TRL: CPO with loss_type simpo)."""

    name = "simpo"
    Options = SimpoOptions

    def loss_type(self) -> str:
        return "sigmoid"

    def averaged(self) -> bool:
        return True

    def margin(self) -> float:
        return self.options.gamma
