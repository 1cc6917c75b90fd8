"""Completions sampled during training, for the objectives that learn from them (GRPO, RAFT,
on-policy distillation).

Training runs in rounds of `objective.round_steps` steps. At a round's first step, the objective
says which prompts of its `objective.prompt_steps` data steps (in their micro-batches) need
completions, how many and from which model (`round_request`: the policy, or a distillation's
teacher); they are sampled at once under the current weights (generation.sample_completions, seeded
by the run's seed and the step, so a resumed run samples the same ones), and the objective turns
them into the round's training samples (`round_batches`: scored, filtered, given advantages).
Where the loss reads the sampling policy's log-probabilities (GRPO reusing samples), they are
computed once, before the first update. A checkpoint inside a round keeps the round's samples
(TrainState.rollout).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from tunelab.data.batching import prompt_completion_sample
from tunelab.files import write_text_atomic
from tunelab.generation import sample_completions, stop_token_ids
from tunelab.objectives.reference import without_randomness

# Where a run keeps what each round chose to train on (RAFT's kept completions), one file a round.
ROUNDS_DIR = "rounds"


@dataclass
class Rollout:
    round: int
    steps: list[list[list[dict]]]  # for each step of the round, its micro-batches of samples
    metrics: dict[str, float] = field(default_factory=dict)


class Rollouts:
    """The current round's samples (see the module docstring)."""

    def __init__(self) -> None:
        self.current: Rollout | None = None

    def checkpoint_state(self, step: int, round_steps: int) -> dict | None:
        """What a checkpoint after `step` keeps: the round's samples, if later steps train on them."""
        if self.current is None or step % round_steps == 0:
            return None
        return {"round": self.current.round, "steps": self.current.steps, "metrics": self.current.metrics}

    def restore(self, saved: dict | None) -> None:
        self.current = None if saved is None else Rollout(saved["round"], saved["steps"], saved["metrics"])

    def step_samples(self, run, step: int) -> tuple[list[list[dict]], dict[str, float]]:
        """The step's micro-batches, and the sampling metrics when this step sampled them."""
        round_steps = run.objective.round_steps
        round_, position = divmod(step - 1, round_steps)
        if self.current is not None and self.current.round == round_ + 1:
            return self.current.steps[position], {"generation_seconds": 0.0, "generated_tokens": 0}
        self.current = sample_round(run, round_ + 1, step)
        return self.current.steps[position], self.current.metrics


def sample_round(run, round_: int, step: int) -> Rollout:
    objective, tokenizer = run.objective, run.tokenizer
    first = (round_ - 1) * objective.prompt_steps + 1
    prompt_steps = [run.micro_batches(data_step) for data_step in range(first, first + objective.prompt_steps)]
    request = objective.round_request(prompt_steps, round_)
    started = time.perf_counter()
    completions, truncated = [], []
    if request.prompts:
        model = objective.teacher if request.by_teacher else run.model
        seed = int(np.random.SeedSequence([run.config.train.seed, step]).generate_state(1)[0])
        # The policy samples as its training forwards compute (on the bf16 copies of its frozen weights, if any).
        completions, truncated = generate(model, tokenizer, request.prompts, request.num_generations, request.options, seed, training_weights=not request.by_teacher)
    seconds = time.perf_counter() - started
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    steps, metrics, records = objective.round_batches(prompt_steps, request, completions, texts, truncated)
    if records and run.ranks.is_writer:
        folder = Path(run.config.output) / ROUNDS_DIR
        folder.mkdir(exist_ok=True)
        write_text_atomic(folder / f"round-{round_}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if objective.needs_sampling_log_probs:
        keep_sampling_log_probs(run, steps[0])
    return Rollout(round_, steps, metrics | {"generation_seconds": seconds, "generated_tokens": sum(len(c) for c in completions)})


def generate(
    model, tokenizer, prompts: list[list[int]], n: int, options, seed: int, temperature: float | None = None, training_weights: bool = False
) -> tuple[list[list[int]], list[bool]]:
    """sample_completions with an objective's generation options (`temperature`: in their stead)."""
    return sample_completions(
        model,
        prompts,
        n,
        options.max_completion_length,
        stop_token_ids(model, tokenizer),
        tokenizer.pad_token_id,
        seed=seed,
        temperature=options.temperature if temperature is None else temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        stop=options.stop,
        tokenizer=tokenizer,
        training_weights=training_weights,
    )


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


def greedy_completions(model, tokenizer, prompts: list[list[int]], options, batch_size: int = 64) -> list[list[int]]:
    """One greedy completion of each prompt, in batches of `batch_size` prompts."""
    completions = []
    for start in range(0, len(prompts), batch_size):
        completions += generate(model, tokenizer, prompts[start : start + batch_size], 1, options, seed=0, temperature=0.0)[0]
    return completions


def teacher_completed(objective, tokenizer, prompts: Dataset) -> Dataset:
    """Prompt rows as completion samples, each completed by the objective's teacher (greedy: the
    same on every run): a distillation's held-out set, where the data gives prompts only."""
    prompt_ids = prompts["prompt_ids"]
    completions = greedy_completions(objective.teacher, tokenizer, prompt_ids, objective.options)
    return Dataset.from_list([prompt_completion_sample(p, c) for p, c in zip(prompt_ids, completions)])


def evaluate_rewards(run) -> dict[str, float]:
    """One greedy completion per held-out prompt, scored by the run's rewards: `eval_reward`,
    `eval_rewards/<function>/mean`, `eval_completions/mean_length`."""
    rows = [run.data.eval[i] for i in range(len(run.data.eval))]
    completions = greedy_completions(run.model, run.tokenizer, [r["prompt_ids"] for r in rows], run.objective.options)
    texts = run.tokenizer.batch_decode(completions, skip_special_tokens=True)
    return {f"eval_{name}": value for name, value in run.objective.eval_figures(rows, completions, texts).items()}
