"""Bradley-Terry reward models, as TRL 1.16's RewardTrainer trains them: a scalar head reads each
sequence's last token, and the loss is −log σ(r_chosen − r_rejected), plus
`center_rewards_coefficient` · mean((r_chosen + r_rejected)²) when set (Eisenstein et al. 2023).

The head (`score`, hidden → 1, no bias, as transformers' `*ForSequenceClassification` has it) is
the objective's own trainable tensor, beside the method's: it is saved with the run's weights,
and `export --format merged` writes a checkpoint `AutoModelForSequenceClassification` loads.
The reward is read at each sequence's last real token, known from the sequence boundaries: a
tokenizer whose pad token is its EOS (where transformers and TRL, looking for the last non-pad
token, read the token before the final EOS) still gets the reward at the EOS itself.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import visible_targets
from tunelab.objectives.base import ObjectiveOptions, ObjectiveOutput, Summed
from tunelab.objectives.pairs import PairBatch, PairwiseObjective

HEAD = "score"  # the head's name, as transformers' sequence-classification models call it


class RewardOptions(ObjectiveOptions):
    name: Literal["reward"] = "reward"
    center_rewards_coefficient: float | None = Field(default=None, ge=0, description="weight of mean((r_c + r_r)^2); none: off")


class Reward(PairwiseObjective):
    """A Bradley-Terry reward model: a scalar head on the last token, chosen scored above rejected."""

    name = "reward"
    Options = RewardOptions
    progress_metrics = ("accuracy", "margin")

    def attach(self, model: nn.Module) -> None:
        """Add the reward head (transformers' initialization: normal, std initializer_range)."""
        config = model.config
        head = nn.Linear(config.hidden_size, 1, bias=False, device=model.device, dtype=model.dtype)
        nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
        self.head = head

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{HEAD}.weight": self.head.weight.detach()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.head.weight.copy_(state[f"{HEAD}.weight"])

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{HEAD}.weight": self.head.weight}

    def merged_model(self, model: nn.Module, tokenizer) -> nn.Module:
        """The merged policy as a transformers sequence-classification model with this head as its
        `score`, loadable with AutoModelForSequenceClassification. transformers reads the last token
        that is not the pad token: with a pad token distinct from EOS that is the EOS, as in training;
        where pad is EOS the config gets no pad token, so an unpadded sequence is read at its last
        token (padded batches then need a separate pad token)."""
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(model.config)
        config.num_labels = 1
        config.architectures = None
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id != tokenizer.eos_token_id else None
        classifier = AutoModelForSequenceClassification.from_config(config, torch_dtype=model.dtype)
        prefix = model.base_model_prefix
        backbone = {name: t for name, t in model.state_dict().items() if name.startswith(f"{prefix}.")}
        missing, unexpected = classifier.load_state_dict({**backbone, **self.state_dict()}, strict=False)
        if missing or unexpected:
            raise TunelabError(f"reward model export: the weights do not fit {type(classifier).__name__} (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return classifier

    def rewards(self, model, batch: PairBatch) -> torch.Tensor:
        """The reward of each of the batch's sequences: chosen ones, then rejected ones."""
        sequences = batch.sequences
        backbone = getattr(model, model.base_model_prefix)
        # No position is a target: hooks that edit prompt positions (ReFT) treat the whole sequence as prompt.
        with visible_targets(torch.zeros_like(sequences.input_ids, dtype=torch.bool)):
            hidden = backbone(**sequences.model_inputs(), use_cache=False).last_hidden_state
        last = last_token_positions(sequences.sample_index, batch.n_sequences)
        return self.head(hidden[last]).squeeze(-1).float()

    def output(self, model, batch: PairBatch, reference=None) -> ObjectiveOutput:
        n = batch.n_pairs
        rewards = self.rewards(model, batch)
        chosen, rejected = rewards[:n], rewards[n:]
        terms = {"reward_loss": Summed(-F.logsigmoid(chosen - rejected).sum(), "pairs")}
        coefficient = self.options.center_rewards_coefficient
        if coefficient is not None:
            terms["centering"] = Summed(coefficient * ((chosen + rejected) ** 2).sum(), "pairs")
        detached = rewards.detach()
        metrics = {
            "accuracy": Summed((detached[:n] > detached[n:]).float().sum(), "pairs"),
            "margin": Summed((detached[:n] - detached[n:]).sum(), "pairs"),
            "mean_reward": Summed(detached.sum() / 2, "pairs"),  # a mean over all 2n sequences
        }
        return ObjectiveOutput(terms=terms, metrics=metrics)


def last_token_positions(sample_index: torch.Tensor, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each sample's last token in a batch (its `sample_index` map)."""
    rows, columns = torch.nonzero(sample_index >= 0, as_tuple=True)
    owners = sample_index[rows, columns]
    flat = rows * sample_index.shape[1] + columns
    last = torch.full((n_samples,), -1, dtype=flat.dtype, device=flat.device).scatter_reduce(0, owners, flat, reduce="amax")
    return last // sample_index.shape[1], last % sample_index.shape[1]
