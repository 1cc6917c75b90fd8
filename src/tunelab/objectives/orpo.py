"""ORPO (Hong et al. 2024) as TRL 1.16's ORPOTrainer computes it: the NLL of the chosen sequence plus
β times an odds-ratio term, no reference model.

With c and r the chosen and rejected completions' log-probabilities averaged per token,
log_odds = (c − r) − (log(1 − e^c) − log(1 − e^r)), and the loss is NLL − β·mean(log σ(log_odds)).
TRL 1.16's NLL (since 0.8.2) covers the chosen prompt and completion, every token after the first,
as a mean over those tokens; β is the paper's λ.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.objectives.base import ObjectiveOptions, ObjectiveOutput, Summed
from tunelab.objectives.pairs import PairBatch, PairwiseObjective, pair_batches, pair_log_probs, reward_metrics


class OrpoOptions(ObjectiveOptions):
    name: Literal["orpo"] = "orpo"
    beta: float = Field(default=0.1, gt=0, description="λ, the weight of the odds-ratio term")


class Orpo(PairwiseObjective):
    """ORPO: NLL on the chosen sequence plus λ times the log odds ratio of chosen over rejected."""

    name = "orpo"
    Options = OrpoOptions
    progress_metrics = ("rewards/accuracies", "log_odds_ratio")

    def forward_batches(self, samples: list[dict], layout, max_tokens: int) -> list[PairBatch]:
        return pair_batches(samples, layout, max_tokens, whole_chosen=True)

    def output(self, model, batch: PairBatch, reference=None) -> ObjectiveOutput:
        beta, n = self.options.beta, batch.n_pairs
        policy = pair_log_probs(model, batch)
        chosen, rejected = policy.chosen / policy.chosen_lengths, policy.rejected / policy.rejected_lengths
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = -policy.targets.sums(2 * n)[:n].sum()  # every target of the chosen sequences
        terms = {"nll": Summed(nll, "chosen_sequence_tokens"), "odds_ratio": Summed(-beta * ratio.sum(), "pairs")}
        metrics = {
            **reward_metrics(beta * chosen, beta * rejected, chosen, rejected),
            "nll_loss": Summed(nll.detach(), "chosen_sequence_tokens"),
            "log_odds_ratio": Summed(ratio.detach().sum(), "pairs"),
            "log_odds_chosen": Summed(log_odds.detach().sum(), "pairs"),
            **policy.token_metrics(),
        }
        return ObjectiveOutput(terms=terms, metrics=metrics)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, accurate on both sides of −ln 2 (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
