"""Rejection-sampling fine-tuning: RAFT (Dong et al. 2023), the scheme of ReST and STaR.

Rounds of: sample `num_generations` completions for each prompt of `steps_per_round` data steps
(at once, under the current weights), score them with the reward functions, keep each prompt's
best completion if its reward is above `threshold`, and fine-tune on the kept ones with the SFT
loss on their completion tokens. Step i of a round trains on the kept completions of data step i's
prompts, in their micro-batches, so a step may train on fewer samples than its prompts, or on none
(then it updates nothing). Each round's choices are written to OUTPUT/rounds/round-N.jsonl (every
prompt, its best completion and reward, and whether it was kept).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunelab.data.batching import Batch, BatchLayout, prompt_completion_sample, split_by_tokens
from tunelab.data.prompts import row_prompt
from tunelab.objectives.base import ObjectiveOutput, Summed
from tunelab.objectives.causal_lm import causal_lm_loss
from tunelab.objectives.sampled import SampledObjective, SamplingOptions, completion_metrics, reward_metrics


class RaftOptions(SamplingOptions):
    name: Literal["raft"] = "raft"
    num_generations: int = Field(default=4, ge=1, description="completions sampled per prompt (k)")
    threshold: float = Field(default=0.0, description="a prompt's best completion is kept if its reward is above this")
    steps_per_round: int = Field(default=4, ge=1, description="training steps per round of sampling")


class Raft(SampledObjective):
    name = "raft"
    Options = RaftOptions
    progress_metrics = ("reward", "raft/acceptance")

    @property
    def round_steps(self) -> int:
        return self.options.steps_per_round

    @property
    def prompt_steps(self) -> int:
        return self.options.steps_per_round

    def forward_batches(self, samples: list[dict], layout: BatchLayout, max_tokens: int) -> list[Batch]:
        return [layout.batch(group) for group in split_by_tokens(samples, max_tokens)] if samples else []

    def output(self, model, batch: Batch, reference=None) -> ObjectiveOutput:
        return ObjectiveOutput(terms={"nll_loss": Summed(causal_lm_loss(model, batch), "target_tokens")}, metrics={})

    def round_batches(self, prompt_steps, request, completions, texts, truncated):
        group = self.options.num_generations
        prompts = [p for batches in prompt_steps for batch in batches for p in batch]
        rewards, per_function = self.score([p for p in prompts for _ in range(group)], completions, texts)
        best = rewards.view(len(prompts), group).max(dim=1)
        chosen = [i * group + int(k) for i, k in enumerate(best.indices)]
        kept = [bool(r > self.options.threshold) for r in best.values]
        records = [{"where": p["where"], "prompt": row_prompt(p), "completion": texts[c], "reward": rewards[c].item(), "kept": keep} for p, c, keep in zip(prompts, chosen, kept)]
        samples = iter(prompt_completion_sample(p["prompt_ids"], completions[c]) if keep else None for p, c, keep in zip(prompts, chosen, kept))
        steps = [[[s for s in (next(samples) for _ in batch) if s is not None] for batch in batches] for batches in prompt_steps]
        metrics = {
            "raft/acceptance": sum(kept) / len(kept),
            "raft/kept_reward": best.values[torch.tensor(kept)].mean().item() if any(kept) else 0.0,
        }
        return steps, reward_metrics(rewards, per_function, self.rewards.labels) | metrics | completion_metrics(completions, truncated), records
