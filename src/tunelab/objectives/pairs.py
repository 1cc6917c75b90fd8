"""Forward batches of preference pairs: chosen and rejected sequences of a micro-batch in one forward.

A pair's two sequences are prompt + chosen and prompt + rejected (the same prompt ids), with the
completion tokens as targets (ORPO's NLL also reads the chosen prompt's tokens: `whole_chosen`).
They always travel together: a micro-batch is split into forwards by whole pairs, so no pair
straddles two forwards or two micro-batches. The sequences are laid out as every other sample is
(padding-free with per-sample attention, mask-packed or padded), chosen sequences first, then the
rejected ones in the same order; where the layout allows (`BatchLayout.share_prefixes`), each
pair's prompt is computed once and both completions attend to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.data.batching import Batch, BatchLayout, prompt_completion_sample, split_by_tokens
from tunelab.objectives.base import Objective, Summed
from tunelab.objectives.causal_lm import TargetLogProbs, target_log_probs


@dataclass
class PairBatch:
    sequences: Batch  # 2n samples: the n chosen sequences, then the n rejected ones
    rows: list[int]  # each pair's file row (precomputed reference log-probs are keyed by it)
    prompt_lengths: torch.Tensor  # (2n,) prompt tokens of each sequence
    counts: dict[str, int]  # pairs, and the tokens of each kind (the units of token-level terms)

    @property
    def n_pairs(self) -> int:
        return len(self.rows)

    @property
    def n_sequences(self) -> int:
        return 2 * self.n_pairs

    @property
    def n_tokens(self) -> int:
        return self.sequences.n_tokens

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.sequences.to(device), self.rows, self.prompt_lengths.to(device), self.counts)

    def completion_mask(self, targets: TargetLogProbs) -> torch.Tensor:
        """Which targets are completion tokens (the rest: ORPO's chosen prompt tokens)."""
        return targets.position >= self.prompt_lengths[targets.owner]

    def completion_log_probs(self, targets: TargetLogProbs) -> torch.Tensor:
        """Each sequence's summed completion log-probability: all chosen, then all rejected."""
        return targets.sums(self.n_sequences, self.completion_mask(targets))

    @property
    def sequence_keys(self) -> list[str]:
        """Names of the sequences (precomputed reference log-probabilities are stored by them)."""
        return [f"{row}:chosen" for row in self.rows] + [f"{row}:rejected" for row in self.rows]

    def reference_log_probs(self, model) -> torch.Tensor:
        """What a reference policy gives for this batch: each sequence's completion log-probability."""
        return self.completion_log_probs(target_log_probs(model, self.sequences))


def pair_length(sample: dict, shared_prompt: bool = False) -> int:
    """Tokens a pair's forward computes: the prompt once (and its last token per completion) when shared."""
    prompt = len(sample["prompt_ids"])
    return (prompt + 1 if shared_prompt else 2 * prompt) + len(sample["chosen_ids"]) + len(sample["rejected_ids"])


def completion_sample(sample: dict, key: str, whole: bool = False) -> dict:
    """prompt + one completion as a next-token sample whose targets are the completion's tokens
    (`whole`: every token of the sequence)."""
    return prompt_completion_sample(sample["prompt_ids"], sample[key], prompt_targets=whole)


def pair_batches(samples: list[dict], layout: BatchLayout, max_tokens: int, whole_chosen: bool = False) -> list[PairBatch]:
    """The pairs of a micro-batch in forwards of at most `max_tokens` computed tokens; with
    `layout.share_prefixes`, a pair's prompt is computed once for both completions."""
    batches = []
    for group in split_by_tokens(samples, max_tokens, lambda s: pair_length(s, layout.share_prefixes)):
        n = len(group)
        chosen = [completion_sample(s, "chosen_ids", whole_chosen) for s in group]
        sequences = chosen + [completion_sample(s, "rejected_ids") for s in group]
        prompts = [(len(s["prompt_ids"]), [i, n + i]) for i, s in enumerate(group)]
        prompt_lengths = torch.tensor([len(s["prompt_ids"]) for s in group] * 2)
        chosen_tokens, rejected_tokens = (sum(len(s[key]) for s in group) for key in ("chosen_ids", "rejected_ids"))
        counts = {
            "pairs": len(group),
            "chosen_tokens": chosen_tokens,
            "rejected_tokens": rejected_tokens,
            "completion_tokens": chosen_tokens + rejected_tokens,
            # every chosen token after the first: ORPO's NLL is over prompt and completion
            "chosen_sequence_tokens": sum(len(s["prompt_ids"]) + len(s["chosen_ids"]) - 1 for s in group),
        }
        batches.append(PairBatch(layout.shared_prefix_batch(sequences, prompts), [s["row"] for s in group], prompt_lengths, counts))
    return batches


@dataclass
class PairLogProbs:
    """A pair batch's completion log-probabilities, split into chosen and rejected halves."""

    chosen: torch.Tensor  # summed log-probability of each chosen completion
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor  # completion tokens
    rejected_lengths: torch.Tensor
    targets: TargetLogProbs  # every target token (with ORPO's chosen prompt tokens)
    completion: torch.Tensor  # which targets are completion tokens

    def token_metrics(self) -> dict[str, Summed]:
        """What TRL logs of the completions' tokens: mean logits, entropy, the chosen top-1 accuracy."""
        n = len(self.chosen)
        completion_only = TargetLogProbs(self.targets.log_probs, self.targets.owner, self.targets.position, self.targets.stats * self.completion[:, None])
        stats = completion_only.stat_sums(2 * n)
        return {
            "logits/chosen": Summed(stats["mean_logit"][:n].sum(), "chosen_tokens"),
            "logits/rejected": Summed(stats["mean_logit"][n:].sum(), "rejected_tokens"),
            "entropy": Summed(stats["entropy"].sum(), "completion_tokens"),
            "mean_token_accuracy": Summed(stats["top1"][:n].sum(), "chosen_tokens"),
        }


def pair_log_probs(model, batch: PairBatch) -> PairLogProbs:
    n = batch.n_pairs
    targets = target_log_probs(model, batch.sequences)
    completion = batch.completion_mask(targets)
    sums = targets.sums(2 * n, completion)
    lengths = targets.counts(2 * n, completion)
    return PairLogProbs(sums[:n], sums[n:], lengths[:n], lengths[n:], targets, completion)


class PairwiseObjective(Objective):
    """What the preference objectives share: pair batches, chosen sequences as next-token samples,
    TRL's pair metrics."""

    rows = "preference"
    progress_metrics = ("rewards/accuracies", "rewards/margins")

    def forward_batches(self, samples: list[dict], layout, max_tokens: int) -> list[PairBatch]:
        return pair_batches(samples, layout, max_tokens)

    def language_model_samples(self, samples: list[dict]) -> list[dict]:
        return [completion_sample(s, "chosen_ids") for s in samples]


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, Summed]:
    """TRL's rewards/* and logps/* metrics, sums over the batch's pairs."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": Summed(chosen_rewards.sum(), "pairs"),
        "rewards/rejected": Summed(rejected_rewards.sum(), "pairs"),
        "rewards/accuracies": Summed((chosen_rewards > rejected_rewards).float().sum(), "pairs"),
        "rewards/margins": Summed((chosen_rewards - rejected_rewards).sum(), "pairs"),
        "logps/chosen": Summed(chosen_logps.detach().sum(), "pairs"),
        "logps/rejected": Summed(rejected_logps.detach().sum(), "pairs"),
    }
