"""Next-token objectives: supervised fine-tuning (`sft`, the loss on each row's targets) and continued
pretraining (`pretrain`, text rows with the loss on every token)."""

from __future__ import annotations

import math
from typing import Literal

from tunelab.data.batching import Batch, BatchLayout, split_by_tokens
from tunelab.objectives.base import Objective, ObjectiveOptions, ObjectiveOutput, Summed
from tunelab.objectives.causal_lm import causal_lm_loss


class SftOptions(ObjectiveOptions):
    name: Literal["sft"] = "sft"


class PretrainOptions(ObjectiveOptions):
    name: Literal["pretrain"] = "pretrain"


class Sft(Objective):
    """Next-token cross-entropy on each row's target tokens (data.train_on), summed over target tokens."""

    name = "sft"
    Options = SftOptions

    def forward_batches(self, samples: list[dict], layout: BatchLayout, max_tokens: int) -> list[Batch]:
        return [layout.batch(group) for group in split_by_tokens(samples, max_tokens)]

    def output(self, model, batch: Batch, reference=None) -> ObjectiveOutput:
        return ObjectiveOutput(terms={"nll_loss": Summed(causal_lm_loss(model, batch), "target_tokens")}, metrics={})

    def eval_summary(self, means: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        return {"ppl": math.exp(min(means["loss"], 50.0)), "target_tokens": counts["target_tokens"]}


class Pretrain(Sft):
    """Continued pretraining: plain text rows, the loss on every token (a long text is split into
    data.max_length pieces, not truncated)."""

    name = "pretrain"
    Options = PretrainOptions
    rows = "text"
