"""The seam every training objective plugs into.

An objective says which rows it reads (`rows`, built by `data/`), how one micro-batch of samples
becomes forward batches (keeping together the units it must: a chosen/rejected pair, a KTO batch
and its mismatched pairs), and its loss as one or more terms. Each term is a SUM over its own unit
(target tokens, sequences, pairs) in one forward batch; the loop divides each by the count of its
unit over the whole accumulated step. So gradient accumulation stays exact even for objectives that
mix units (ORPO and CPO add a token-level NLL to a pair-level term). Metrics are sums over a unit
as well, so the logged means are those of the whole step whatever the accumulation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict


class ObjectiveOptions(BaseModel):
    """Options every objective has; each objective subclasses this with its own (unknown keys fail)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


@dataclass
class Summed:
    """A sum over `unit`s of one forward batch: a loss term (with its graph) or a metric."""

    total: torch.Tensor
    unit: str


@dataclass
class ObjectiveOutput:
    terms: dict[str, Summed]  # the loss is sum(total / step count of unit) over the terms
    metrics: dict[str, Summed]  # logged as total / step count of unit (a term to show goes here too)


class ForwardBatch(Protocol):
    counts: dict[str, int]  # how many of each unit the batch holds (target_tokens, pairs, ...)
    n_tokens: int  # real (non-padding) tokens, for throughput

    def to(self, device: torch.device) -> ForwardBatch: ...


class Objective(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[ObjectiveOptions]]
    # Which rows data/ builds for it: "sft" (chat / prompt-completion / text), "text" (every token a
    # target), "preference" ({prompt, chosen, rejected}), "unpaired" ({prompt, completion, label}),
    # "prompt" ({prompt, ...fields its rewards read}), "sft_or_prompt" (a file of either).
    rows: ClassVar[str] = "sft"
    # Metrics shown on the progress bar besides the loss (all of them go to metrics.jsonl).
    progress_metrics: ClassVar[tuple[str, ...]] = ()
    # Whether it trains on completions sampled during training (GRPO, RAFT, distillation): then the
    # steps' samples come from its `round_batches` (objectives/sampled.py, train/rollout.py).
    samples_completions: ClassVar[bool] = False

    def __init__(self, options: ObjectiveOptions):
        self.options = options

    @property
    def needs_reference(self) -> bool:
        """Whether `output` reads a reference policy's log-probabilities."""
        return False

    def teacher_source(self) -> tuple[str, str] | None:
        """(model, dtype) of a frozen teacher the objective learns from (distillation), which the
        loop loads (train/loop.load_teacher) and sets as its `teacher` before training; None: none."""
        return None

    # The objective's own trainable tensors, beside the method's (a reward model's head): added by
    # `attach` after the method's, optimized, checkpointed and saved with the run's weights.

    def attach(self, model) -> None:
        """Add the objective's own modules for `model` (kept on the objective, not in the model)."""

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` gave."""

    def merged_model(self, model, tokenizer):
        """The model `export --format merged` writes, from the merged policy (a reward model: a
        sequence-classification model with its head)."""
        return model

    @abstractmethod
    def forward_batches(self, samples: list[dict], layout, max_tokens: int) -> list[ForwardBatch]:
        """One micro-batch's samples as forward batches of at most `max_tokens` tokens each (0: one
        batch); the units the objective keeps together are never split across two."""

    @abstractmethod
    def output(self, model, batch: ForwardBatch, reference=None) -> ObjectiveOutput:
        """The loss terms and metrics of one forward batch (`reference`: see objectives/reference.py)."""

    def derived(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics computed from other metrics' step means (KTO's reward margin)."""
        return {}

    def eval_summary(self, means: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Figures derived from the eval means (perplexity), added to the eval metrics."""
        return {}

    def language_model_samples(self, samples: list[dict]) -> list[dict]:
        """The samples as next-token samples (input_ids, target_mask), for what scores a model by its
        loss on the training targets (Method.prepare: LoFiT's heads, SubTuning's layers)."""
        return samples


def step_loss(output: ObjectiveOutput, step_counts: dict[str, int]) -> torch.Tensor:
    """The forward batch's share of the step's loss: each term's sum over the step's count of its unit."""
    terms = iter(output.terms.values())
    first = next(terms)
    loss = first.total / step_counts[first.unit]
    for term in terms:
        loss = loss + term.total / step_counts[term.unit]
    return loss


class StepTotals:
    """Sums of the loss terms and metrics over a step's (or an eval pass's) forward batches. They stay
    on the device (float64, as Python's floats) until `figures`: one synchronization per step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.units: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.terms: list[str] = []

    def add_counts(self, counts: dict[str, int]) -> None:
        for unit, count in counts.items():
            self.counts[unit] = self.counts.get(unit, 0) + count

    def add(self, output: ObjectiveOutput) -> None:
        for name, summed in (*output.terms.items(), *output.metrics.items()):
            total = summed.total.detach().double()
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            self.units[name] = summed.unit
        self.terms = self.terms or list(output.terms)

    def sums_share(self) -> dict:
        """The sums as plain numbers, for another process to add (`add_sums`): a step's forwards
        spread over several processes add up to the step's totals."""
        return {"sums": {name: float(total) for name, total in self.sums.items()}, "units": dict(self.units), "terms": list(self.terms)}

    def add_sums(self, share: dict) -> None:
        for name, total in share["sums"].items():
            value = torch.tensor(total, dtype=torch.float64)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.units[name] = share["units"][name]
        self.terms = self.terms or share["terms"]

    def figures(self, objective: Objective) -> dict[str, float]:
        """`loss` (the sum of the terms' means, as the step's loss is), every metric's mean (but those
        whose unit did not occur: KTO's rewards of a step without an undesirable example), and the
        objective's derived metrics."""
        sums = dict(zip(self.sums, torch.stack(list(self.sums.values())).tolist())) if self.sums else {}
        means = {name: total / self.counts[self.units[name]] for name, total in sums.items() if self.counts[self.units[name]]}
        figures = {"loss": sum(means[name] for name in self.terms), **{name: means[name] for name in means if name not in self.terms}}
        return figures | objective.derived(figures)


def eval_batches(objective: Objective, dataset, batch_size: int, layout) -> Iterator[ForwardBatch]:
    """The forward batches of an eval split: micro-batches of `batch_size` rows in file order."""
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield from objective.forward_batches(samples, layout, 0)


@torch.no_grad()
def evaluate_objective(objective: Objective, model, dataset, batch_size: int, layout, reference=None) -> dict:
    """The objective's loss and metrics over a tokenized split, each as `eval_<name>`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = StepTotals()
    for batch in eval_batches(objective, dataset, batch_size, layout):
        totals.add_counts(batch.counts)
        totals.add(objective.output(model, batch.to(device), reference))
    model.train(was_training)
    figures = totals.figures(objective)
    figures.update(objective.eval_summary(figures, totals.counts))
    return {f"eval_{name}": value for name, value in figures.items()}
