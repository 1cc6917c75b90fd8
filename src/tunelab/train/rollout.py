"""Completions sampled during training, for the objectives that learn from them (GRPO).

At the first step of each round (a round is `objective.num_iterations` steps), the round's prompts
(the data's samples of step `round`, in their micro-batches) get `num_generations` completions
each, sampled under the current weights (generation.sample_completions, seeded by the run's seed
and the step, so a resumed run samples the same ones), scored by the objective's rewards. The
round's steps all train on them; with more than one step per round, the sampling policy's
log-probabilities are computed once, before the first update, for the importance ratio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tunelab.generation import sample_completions, stop_token_ids
from tunelab.objectives.reference import without_randomness


@dataclass
class Rollout:
    round: int
    micro_batches: list[list[dict]]  # the scored completion samples, by micro-batch
    metrics: dict[str, float] = field(default_factory=dict)


class Rollouts:
    """The current round's samples (see the module docstring)."""

    def __init__(self) -> None:
        self.current: Rollout | None = None

    def checkpoint_state(self, step: int, iterations: int) -> dict | None:
        """What a checkpoint after `step` keeps: the round's samples, if later steps train on them."""
        if self.current is None or step % iterations == 0:
            return None
        return {"round": self.current.round, "micro_batches": self.current.micro_batches, "metrics": self.current.metrics}

    def restore(self, saved: dict | None) -> None:
        self.current = None if saved is None else Rollout(saved["round"], saved["micro_batches"], saved["metrics"])

    def step_samples(self, run, step: int) -> tuple[list[list[dict]], dict[str, float]]:
        """The step's micro-batches, and the sampling metrics when this step sampled them."""
        round_ = (step - 1) // run.objective.options.num_iterations + 1
        if self.current is not None and self.current.round == round_:
            return self.current.micro_batches, {"generation_seconds": 0.0, "generated_tokens": 0}
        self.current = sample_round(run, round_, step)
        return self.current.micro_batches, self.current.metrics


def sample_round(run, round_: int, step: int) -> Rollout:
    options, tokenizer = run.objective.options, run.tokenizer
    prompt_batches = run.micro_batches(round_)
    prompts = [p for batch in prompt_batches for p in batch]
    started = time.perf_counter()
    completions, truncated = sample_completions(
        run.model,
        [p["prompt_ids"] for p in prompts],
        options.num_generations,
        options.max_completion_length,
        stop_token_ids(run.model, tokenizer),
        tokenizer.pad_token_id,
        seed=int(np.random.SeedSequence([run.config.train.seed, step]).generate_state(1)[0]),
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        stop=options.stop,
        tokenizer=tokenizer,
    )
    seconds = time.perf_counter() - started
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    samples, metrics = run.objective.scored_samples(prompts, completions, texts, truncated)
    group = options.num_generations
    micro_batches, start = [], 0
    for batch in prompt_batches:
        micro_batches.append(samples[start : start + len(batch) * group])
        start += len(batch) * group
    if options.num_iterations > 1:
        keep_sampling_log_probs(run, micro_batches)
    return Rollout(round_, micro_batches, metrics | {"generation_seconds": seconds, "generated_tokens": sum(len(c) for c in completions)})


@torch.no_grad()
def keep_sampling_log_probs(run, micro_batches: list[list[dict]]) -> None:
    """Each completion token's log-probability under the weights that sampled it (`old_log_probs`),
    computed as the policy's first update will compute it (training mode, no dropout)."""
    with without_randomness(run.model):
        for samples in micro_batches:
            for batch in run.objective.forward_batches(samples, run.layout, run.tokens_per_forward):
                batch = batch.to(run.device)
                targets = batch.log_probs(run.model)
                for sample in batch.samples:
                    sample["old_log_probs"] = [0.0] * len(sample["completion_ids"])
                for value, i, j in zip(targets.log_probs.tolist(), targets.owner.tolist(), batch.completion_index(targets).tolist()):
                    batch.samples[i]["old_log_probs"][j] = value


def evaluate_rewards(run) -> dict[str, float]:
    """One greedy completion per held-out prompt, scored by the run's rewards: `eval_reward`,
    `eval_rewards/<function>/mean`, `eval_completions/mean_length`."""
    options, tokenizer = run.objective.options, run.tokenizer
    rows = [run.data.eval[i] for i in range(len(run.data.eval))]
    completions, _ = sample_completions(
        run.model,
        [r["prompt_ids"] for r in rows],
        1,
        options.max_completion_length,
        stop_token_ids(run.model, tokenizer),
        tokenizer.pad_token_id,
        seed=0,
        temperature=0.0,
        stop=options.stop,
        tokenizer=tokenizer,
    )
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return {f"eval_{name}": value for name, value in run.objective.eval_figures(rows, completions, texts).items()}
