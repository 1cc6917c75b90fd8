"""Group Relative Policy Optimization (GRPO: Shao et al. 2024, DeepSeekMath) and its corrections
(Dr. GRPO: Liu et al. 2025; DAPO: Yu et al. 2025), as TRL 1.16's GRPOTrainer computes them.

Each prompt gets `num_generations` sampled completions (train/rollout.py samples them under the
current weights), each scored by the weighted reward functions (scoring/rewards.py). A
completion's advantage is its reward minus its group's mean, divided by the group's std (or the
batch's, or not: `scale_rewards`). The loss on each completion token t, with the importance ratio
ρ = exp(log π(t) − log π_old(t)) (π_old: the policy that sampled, so ρ = 1 unless
`num_iterations` reuses the samples), is

    −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·KL(t),   KL(t) = exp(r − l) − (r − l) − 1

(k3 estimator; r, l the reference's and the policy's log-probabilities; TRL 1.16 multiplies it by
ρ, `use_bias_correction_kl`). Log-probabilities are those of the logits divided by the sampling
temperature. How the token losses become one number is `loss_type`:
- grpo: each completion's mean over its tokens, averaged over completions;
- bnpo: the mean over the tokens of each micro-batch (so it depends on the micro-batching, by
  definition: it is the one loss exempt from gradient-accumulation invariance);
- dr_grpo: the sum over tokens divided by (completions × max_completion_length);
- dapo: the sum over tokens divided by the step's completion tokens.
A completion's tokens run to its first end-of-sequence token (kept) or to max_completion_length.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from tunelab.data.batching import Batch, BatchLayout, prompt_completion_sample, split_by_tokens
from tunelab.objectives.base import ObjectiveOutput, Summed
from tunelab.objectives.causal_lm import TargetLogProbs, target_log_probs
from tunelab.objectives.reference import ReferenceOptions
from tunelab.objectives.sampled import SampledObjective, SamplingOptions, completion_metrics, reward_metrics


class GrpoOptions(SamplingOptions, ReferenceOptions):
    name: Literal["grpo"] = "grpo"
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: float = Field(default=0.2, gt=0)
    epsilon_high: float | None = Field(default=None, gt=0, description="the upper clip (DAPO's clip-higher); default: epsilon")
    num_iterations: int = Field(default=1, ge=1, description="optimizer steps each batch of samples serves (μ)")
    beta: float = Field(default=0.0, ge=0, description="weight of the KL to the reference policy")
    use_bias_correction_kl: bool = Field(default=True, description="multiply the KL term by the importance ratio (TRL 1.16)")
    mask_truncated_completions: bool = Field(default=False, description="no loss on completions cut at max_completion_length")

    @model_validator(mode="after")
    def _consistent(self) -> GrpoOptions:
        if self.beta == 0 and (self.reference or self.precompute_reference):
            raise ValueError("objective.reference applies with beta > 0 only (beta 0 uses no reference policy)")
        if self.precompute_reference:
            raise ValueError("objective.precompute_reference: GRPO's completions are sampled during training, so its reference runs live")
        return self


@dataclass
class CompletionBatch:
    """Sampled completions of one forward: prompt + completion sequences, the completion tokens as
    targets, and what the loss reads of each (its advantage, the sampling policy's log-probs)."""

    sequences: Batch
    prompt_lengths: torch.Tensor  # (n,)
    advantages: torch.Tensor  # (n,)
    old_log_probs: torch.Tensor | None  # (n, longest completion), or None: the policy sampled them (ρ = 1)
    micro_batch_tokens: int  # bnpo divides by the completion tokens of the whole micro-batch
    temperature: float  # log-probabilities are those of the sampling distribution
    counts: dict[str, int]
    samples: list[dict]  # the samples, in the batch's order

    @property
    def n_tokens(self) -> int:
        return self.sequences.n_tokens

    def to(self, device: torch.device) -> CompletionBatch:
        old = None if self.old_log_probs is None else self.old_log_probs.to(device)
        return CompletionBatch(
            self.sequences.to(device), self.prompt_lengths.to(device), self.advantages.to(device), old, self.micro_batch_tokens, self.temperature, self.counts, self.samples
        )

    def completion_index(self, targets: TargetLogProbs) -> torch.Tensor:
        """Each target's index within its completion."""
        return targets.position - self.prompt_lengths[targets.owner]

    def log_probs(self, model) -> TargetLogProbs:
        return target_log_probs(model, self.sequences, self.temperature)

    def reference_log_probs(self, model) -> torch.Tensor:
        """What a reference policy gives for this batch: each target token's log-probability."""
        return self.log_probs(model).log_probs


def completion_batches(samples: list[dict], layout: BatchLayout, max_tokens: int, temperature: float) -> list[CompletionBatch]:
    """A micro-batch of scored completions (train/rollout.py) in forwards of at most `max_tokens`
    computed tokens, a prompt's completions never apart; with `layout.share_prefixes`, each
    prompt is computed once for all its completions."""
    micro_batch_tokens = sum(len(s["completion_ids"]) for s in samples if s["trained"])
    groups = [list(group) for _, group in itertools.groupby(samples, key=lambda s: s["prompt_ids"])]

    def computed(group: list[dict]) -> int:
        prompt, completions = len(group[0]["prompt_ids"]), sum(len(s["completion_ids"]) for s in group)
        return prompt + len(group) + completions if layout.share_prefixes else prompt * len(group) + completions

    batches = []
    for k, forward in enumerate(split_by_tokens(groups, max_tokens, computed)):
        group = [s for members in forward for s in members]
        sequences = [prompt_completion_sample(s["prompt_ids"], s["completion_ids"], completion_targets=s["trained"]) for s in group]
        starts = list(itertools.accumulate((len(members) for members in forward), initial=0))
        prefixes = [(len(members[0]["prompt_ids"]), list(range(start, start + len(members)))) for members, start in zip(forward, starts)]
        old = None
        if group[0].get("old_log_probs") is not None:
            width = max(len(s["completion_ids"]) for s in group)
            old = torch.zeros(len(group), width)
            for i, s in enumerate(group):
                old[i, : len(s["old_log_probs"])] = torch.tensor(s["old_log_probs"])
        tokens = sum(len(s["completion_ids"]) for s in group if s["trained"])
        counts = {"completions": len(group), "completion_tokens": tokens, "micro_batches": int(k == 0)}
        batches.append(
            CompletionBatch(
                sequences=layout.shared_prefix_batch(sequences, prefixes),
                prompt_lengths=torch.tensor([len(s["prompt_ids"]) for s in group]),
                advantages=torch.tensor([s["advantage"] for s in group], dtype=torch.float32),
                old_log_probs=old,
                micro_batch_tokens=micro_batch_tokens,
                temperature=temperature,
                counts=counts,
                samples=group,
            )
        )
    return batches


class Grpo(SampledObjective):
    name = "grpo"
    Options = GrpoOptions
    progress_metrics = ("reward", "reward_std")

    @property
    def needs_sampling_log_probs(self) -> bool:
        return self.options.num_iterations > 1

    @property
    def round_steps(self) -> int:
        return self.options.num_iterations

    @property
    def needs_reference(self) -> bool:
        return self.options.beta > 0

    def forward_batches(self, samples: list[dict], layout, max_tokens: int) -> list[CompletionBatch]:
        return completion_batches(samples, layout, max_tokens, self.options.temperature)

    # ---- The samples: scored completions with their advantages (train/rollout.py calls this)

    def round_batches(self, prompt_steps, request, completions, texts, truncated):
        """The completions (num_generations per prompt, grouped by prompt) with their advantages, in
        their prompts' micro-batches, for each of the num_iterations steps; TRL's rollout metrics."""
        group = self.options.num_generations
        prompt_batches = prompt_steps[0]
        rows = [p for batch in prompt_batches for p in batch for _ in range(group)]
        rewards, per_function = self.score(rows, completions, texts)
        advantages, std = group_advantages(rewards, group, self.options.scale_rewards)
        samples = [
            {"prompt_ids": row["prompt_ids"], "completion_ids": ids, "advantage": float(a), "trained": not (self.options.mask_truncated_completions and cut)}
            for row, ids, a, cut in zip(rows, completions, advantages.tolist(), truncated)
        ]
        micro_batches, start = [], 0
        for batch in prompt_batches:
            micro_batches.append(samples[start : start + len(batch) * group])
            start += len(batch) * group
        metrics = reward_metrics(rewards, per_function, self.rewards.labels) | completion_metrics(completions, truncated)
        # the share of groups whose completions all scored alike: they teach nothing
        metrics["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).double().mean().item()
        return [micro_batches] * self.options.num_iterations, metrics, []

    # ---- The loss

    def output(self, model, batch: CompletionBatch, reference=None) -> ObjectiveOutput:
        o = self.options
        # The reference's no-grad forward first, while no activations are held for backward.
        ref = reference.log_probs(batch) if o.beta else None
        targets = batch.log_probs(model)
        log_probs, owner = targets.log_probs, targets.owner
        if batch.old_log_probs is None:
            old = log_probs.detach()
        else:
            old = batch.old_log_probs[owner, batch.completion_index(targets)]
        advantages = batch.advantages[owner]
        ratio = torch.exp(log_probs - old)
        high = o.epsilon_high or o.epsilon
        clipped = torch.clamp(ratio, 1 - o.epsilon, 1 + high)
        token_loss = -torch.min(ratio * advantages, clipped * advantages)
        metrics = {"entropy": Summed(targets.stats[:, 1].sum(), "completion_tokens")}
        if o.beta:
            ref = ref.to(log_probs)
            kl = torch.exp(ref - log_probs) - (ref - log_probs) - 1
            if o.use_bias_correction_kl:
                kl = kl * ratio
            token_loss = token_loss + o.beta * kl
            metrics["kl"] = Summed(kl.detach().sum(), "completion_tokens")
        metrics.update(clip_metrics(ratio.detach(), advantages, o.epsilon, high))
        n = len(batch.prompt_lengths)
        if o.loss_type == "grpo":
            per_completion = token_loss.new_zeros(n).index_add(0, owner, token_loss)
            lengths = targets.counts(n).clamp(min=1)
            term = Summed((per_completion / lengths).sum(), "completions")
        elif o.loss_type == "bnpo":
            term = Summed(token_loss.sum() / max(1, batch.micro_batch_tokens), "micro_batches")
        elif o.loss_type == "dr_grpo":
            term = Summed(token_loss.sum() / o.max_completion_length, "completions")
        else:
            term = Summed(token_loss.sum(), "completion_tokens")
        return ObjectiveOutput(terms={"policy_loss": term}, metrics=metrics)


def group_advantages(rewards: torch.Tensor, group: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, the std each was scaled by) of rewards grouped by prompt, as TRL computes them:
    reward − group mean, over (std + 1e-4) of the group (`group`) or of the batch (`batch`), or
    not scaled (`none`); stds are unbiased."""
    grouped = rewards.view(-1, group)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        std = grouped.std(dim=1).repeat_interleave(group)
    return (centered if scale == "none" else centered / (std + 1e-4)), std


def clip_metrics(ratio: torch.Tensor, advantages: torch.Tensor, low: float, high: float) -> dict[str, Summed]:
    """The share of completion tokens whose ratio the clip cut off (TRL's clip_ratio/*)."""
    low_clipped = ((ratio < 1 - low) & (advantages < 0)).float()
    high_clipped = ((ratio > 1 + high) & (advantages > 0)).float()
    return {
        "clip_ratio/low_mean": Summed(low_clipped.sum(), "completion_tokens"),
        "clip_ratio/high_mean": Summed(high_clipped.sum(), "completion_tokens"),
        "clip_ratio/region_mean": Summed(torch.maximum(low_clipped, high_clipped).sum(), "completion_tokens"),
    }
