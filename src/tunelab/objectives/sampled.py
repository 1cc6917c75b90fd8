"""What the objectives that train on completions sampled during training share (GRPO, RAFT,
on-policy distillation): the sampling options and the round seam; and what the reward-driven ones
(GRPO, RAFT) add: prompt rows, the reward functions, and the held-out figures.

A round of training (train/rollout.py) asks the objective which prompts of its `prompt_steps` data
steps need completions, how many and from which model (`round_request`), samples them at once, and
has the objective's `round_batches` turn them into the samples of the round's `round_steps`
training steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field

from tunelab.data.prompts import row_fields, row_prompt
from tunelab.objectives.base import Objective, ObjectiveOptions
from tunelab.scoring.rewards import Rewards, RewardSpec


class GenerationOptions(ObjectiveOptions):
    max_completion_length: int = Field(default=256, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="0: no top-k cut")
    stop: list[str] = Field(default_factory=list, description="strings that end a completion (besides the EOS tokens)")


class SamplingOptions(GenerationOptions):
    rewards: list[RewardSpec] = Field(min_length=1, description="the weighted reward functions (scoring/rewards.py)")
    num_generations: int = Field(default=8, ge=2, description="completions sampled per prompt")


@dataclass
class CompletionRequest:
    """What a round samples: `num_generations` completions of each of `prompts` (token ids), from
    the policy being trained or from the teacher (distillation), with the objective's options."""

    prompts: list[list[int]]
    num_generations: int
    options: GenerationOptions
    by_teacher: bool = False


class GeneratingObjective(Objective):
    """An objective whose steps train on completions sampled during training (see the module docstring)."""

    samples_completions = True
    # Whether the loss reads the sampling policy's log-probabilities (kept once, before the first
    # update of the round: train/rollout.py).
    needs_sampling_log_probs: ClassVar[bool] = False

    @property
    def round_steps(self) -> int:
        """Training steps each round of samples serves."""
        return 1

    @property
    def prompt_steps(self) -> int:
        """Data steps whose prompts a round samples completions for."""
        return 1

    def round_request(self, prompt_steps: list[list[list[dict]]], round_: int) -> CompletionRequest:
        """The completions round `round_` (1-based) samples for `prompt_steps`, the samples of each
        of its data steps by micro-batch: by default num_generations for every prompt, from the policy."""
        prompts = [p["prompt_ids"] for batches in prompt_steps for batch in batches for p in batch]
        return CompletionRequest(prompts, self.options.num_generations, self.options)

    def round_batches(
        self, prompt_steps: list[list[list[dict]]], request: CompletionRequest, completions: list[list[int]], texts: list[str], truncated: list[bool]
    ) -> tuple[list[list[list[dict]]], dict[str, float], list[dict]]:
        """The round's training samples: for each of its `round_steps` steps, the step's micro-batches.
        `completions` (their texts, and whether max_completion_length cut them): those `request`
        asked for, num_generations per prompt, in prompt order. Also the round's metrics and the
        records to keep (RAFT's kept set)."""
        raise NotImplementedError


class SampledObjective(GeneratingObjective):
    """GRPO and RAFT: completions of prompt rows, scored by reward functions."""

    rows = "prompt"

    def __init__(self, options: SamplingOptions):
        super().__init__(options)
        self.rewards = Rewards(options.rewards)  # a user's function that does not import fails here

    def score(self, rows: list[dict], completions: list[list[int]], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted reward, each function's reward) of each completion of its row."""
        scores = self.rewards.score([row_prompt(r) for r in rows], texts, completions, [row_fields(r) for r in rows], [r["where"] for r in rows])
        per_function = torch.tensor(scores, dtype=torch.float64).T  # (completions, functions)
        weights = torch.tensor([s.weight for s in self.rewards.specs], dtype=torch.float64)
        return per_function @ weights, per_function

    def eval_figures(self, rows: list[dict], completions: list[list[int]], texts: list[str]) -> dict[str, float]:
        """The held-out figures of one greedy completion per prompt: rewards and lengths."""
        rewards, per_function = self.score(rows, completions, texts)
        figures = {"reward": rewards.mean().item(), "completions/mean_length": sum(len(c) for c in completions) / len(completions)}
        return figures | {f"rewards/{label}/mean": per_function[:, k].mean().item() for k, label in enumerate(self.rewards.labels)}

    def language_model_samples(self, samples: list[dict]) -> list[dict]:
        """The prompts, every token a target (what a method's data-driven choice reads: Method.prepare)."""
        return [{"input_ids": s["prompt_ids"], "target_mask": [1] * len(s["prompt_ids"])} for s in samples]


def reward_metrics(rewards: torch.Tensor, per_function: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """TRL's reward metrics of a round's samples: the weighted reward's and each function's mean
    and std (unbiased; 0 for a single completion)."""

    def std(values: torch.Tensor) -> float:
        return values.std().item() if len(values) > 1 else 0.0

    metrics = {"reward": rewards.mean().item(), "reward_std": std(rewards)}
    for k, label in enumerate(labels):
        metrics[f"rewards/{label}/mean"] = per_function[:, k].mean().item()
        metrics[f"rewards/{label}/std"] = std(per_function[:, k])
    return metrics


def completion_metrics(completions: list[list[int]], truncated: list[bool]) -> dict[str, float]:
    """TRL's completions/* metrics of a round's samples."""
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
    ended = lengths[~torch.tensor(truncated)]
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(truncated) / len(truncated),
        "completions/mean_terminated_length": ended.mean().item() if len(ended) else 0.0,
        "completions/min_terminated_length": ended.min().item() if len(ended) else 0.0,
        "completions/max_terminated_length": ended.max().item() if len(ended) else 0.0,
    }
