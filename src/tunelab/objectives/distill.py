"""Knowledge distillation: the student matches a frozen teacher's next-token distribution on
completions' tokens, as TRL 1.16's GKDTrainer measures it (Agarwal et al. 2024, generalized JSD):
sequence-level KD on the data's completions (Hinton et al. 2015, Kim & Rush 2016), on completions
the student samples itself (on-policy, GKD), or on the teacher's (label-free data).

On each completion token, with the student's and the teacher's log-probabilities s and t of the
logits divided by `temperature`:
- forward_kl: KL(teacher ‖ student) = Σ pₜ (t − s)            (GKD's beta = 0)
- reverse_kl: KL(student ‖ teacher) = Σ pₛ (s − t)            (GKD's beta = 1)
- jsd:        β·KL(teacher ‖ m) + (1 − β)·KL(student ‖ m),  m = (1 − β)·pₛ + β·pₜ
The loss is `alpha` × the divergence + (1 − alpha) × the SFT cross-entropy of the completions,
each summed over the completion tokens and divided by the step's completion tokens (those the
student generated, on an on-policy step).

Which completions: a share `on_policy_fraction` λ of the steps (steps k where ⌊kλ⌋ > ⌊(k−1)λ⌋: the
share is exact and needs no random draw) trains on completions the student samples for the step's
prompts (at `temperature`, as GKD does); the other steps on the data's completions. The data may be
prompts only (`{prompt}` rows, label-free distillation): the other steps then train on completions
the teacher samples. A row with a completion gives as its prompt the tokens before its last
completion span (a chat row's last assistant turn).

The teacher (train/loop.py loads it: a model, a run directory or a peft adapter) must share the
student's vocabulary. The divergence runs on target rows in chunks, like the SFT head
(causal_lm.py): the (tokens × vocabulary) logits of neither model ever exist at once, and the
gradient is worked out in the forward pass, chunk by chunk.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from tunelab.data.batching import Batch, BatchLayout, prompt_completion_sample, split_by_tokens
from tunelab.errors import TunelabError
from tunelab.objectives.base import ObjectiveOutput, Summed
from tunelab.objectives.causal_lm import LinearCrossEntropy, at_targets, row_chunks
from tunelab.objectives.sampled import CompletionRequest, GeneratingObjective, GenerationOptions, completion_metrics


class DistillOptions(GenerationOptions):
    name: Literal["distill"] = "distill"
    teacher: str = Field(description="the teacher: a model (alias | local dir | hub id), a tunelab run directory or a peft adapter directory")
    teacher_dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="the teacher's weights (bf16 halves its memory)")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "jsd"
    beta: float = Field(default=0.5, gt=0, lt=1, description="jsd only: the teacher's share of the mixture")
    temperature: float = Field(default=1.0, gt=0, description="divides both models' logits in the divergence; samples the completions")
    alpha: float = Field(default=1.0, ge=0, le=1, description="the divergence's weight; 1 − alpha weighs the SFT loss")
    on_policy_fraction: float = Field(default=0.0, ge=0, le=1, description="the share of steps that train on the student's own completions (GKD's lambda)")
    max_completion_length: int = Field(default=128, ge=1, description="the longest completion the student or the teacher samples")

    @model_validator(mode="after")
    def _consistent(self) -> DistillOptions:
        if self.loss != "jsd" and "beta" in self.model_fields_set:
            raise ValueError("objective.beta applies to loss: jsd only (forward_kl is GKD's beta 0, reverse_kl its beta 1)")
        return self


def on_policy_step(step: int, fraction: float) -> bool:
    """Whether 1-based `step` is one of the on-policy share `fraction` of the steps."""
    return math.floor(step * fraction) > math.floor((step - 1) * fraction)


def completion_prompt(sample: dict) -> list[int]:
    """What a sample's completion answers: a prompt row's prompt, else the tokens before the last
    run of target tokens."""
    if "prompt_ids" in sample:
        return sample["prompt_ids"]
    mask = sample["target_mask"]
    start = len(mask)
    while start > 0 and not mask[start - 1]:
        start -= 1
    while start > 0 and mask[start - 1]:
        start -= 1
    return sample["input_ids"][:start]


class Distill(GeneratingObjective):
    name = "distill"
    Options = DistillOptions
    rows = "sft_or_prompt"
    progress_metrics = ("divergence",)

    def __init__(self, options: DistillOptions):
        super().__init__(options)
        self.teacher = None  # set by the loop before training (train/loop.py)

    def teacher_source(self) -> tuple[str, str]:
        return self.options.teacher, self.options.teacher_dtype

    @property
    def beta(self) -> float:
        """GKD's beta of the chosen divergence."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.options.loss, self.options.beta)

    def round_request(self, prompt_steps: list[list[list[dict]]], round_: int) -> CompletionRequest:
        """An on-policy step: the student completes every prompt; else the teacher completes the
        prompt rows (none where every row has its completion)."""
        on_policy = on_policy_step(round_, self.options.on_policy_fraction)
        samples = [s for batches in prompt_steps for batch in batches for s in batch]
        prompts = [completion_prompt(s) for s in samples if on_policy or "prompt_ids" in s]
        if on_policy and not all(prompts):
            raise TunelabError("objective.on_policy_fraction: on-policy steps need a prompt before each row's completion (data.train_on: all leaves none)")
        return CompletionRequest(prompts, 1, self.options, by_teacher=not on_policy)

    def round_batches(self, prompt_steps, request, completions, texts, truncated):
        on_policy = not request.by_teacher
        completed = iter(zip(request.prompts, completions))  # in the order round_request chose them

        def trained(sample: dict) -> dict:
            return prompt_completion_sample(*next(completed)) if on_policy or "prompt_ids" in sample else sample

        steps = [[[trained(s) for s in batch] for batch in batches] for batches in prompt_steps]
        metrics = {"on_policy": float(on_policy)} | (completion_metrics(completions, truncated) if completions else {})
        return steps, metrics, []

    def forward_batches(self, samples: list[dict], layout: BatchLayout, max_tokens: int) -> list[Batch]:
        return [layout.batch(group) for group in split_by_tokens(samples, max_tokens)]

    def language_model_samples(self, samples: list[dict]) -> list[dict]:
        """Prompt rows with every prompt token a target (what a method's data-driven choice reads)."""
        return [{"input_ids": s["prompt_ids"], "target_mask": [1] * len(s["prompt_ids"])} if "prompt_ids" in s else s for s in samples]

    def output(self, model, batch: Batch, reference=None) -> ObjectiveOutput:
        o = self.options
        with torch.no_grad():
            teacher_hidden, teacher_weight, _ = at_targets(self.teacher, batch)
        hidden, weight, labels = at_targets(model, batch)
        if weight is None or teacher_weight is None:
            raise NotImplementedError("distillation needs models whose logits are their output head's product (no softcapping or head bias)")
        divergence = LinearDivergence.apply(hidden, weight, teacher_hidden, teacher_weight, self.beta, o.temperature)
        terms = {"distill_loss": Summed(o.alpha * divergence, "target_tokens")}
        if o.alpha < 1:
            terms["nll_loss"] = Summed((1 - o.alpha) * LinearCrossEntropy.apply(hidden, weight, labels), "target_tokens")
        return ObjectiveOutput(terms=terms, metrics={"divergence": Summed(divergence.detach(), "target_tokens")})

    def eval_summary(self, means: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        return {"target_tokens": counts["target_tokens"]}


def divergence_and_gradient(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: KL(teacher ‖ student) at beta 0, KL(student ‖ teacher) at 1, else the generalized
    JSD β·KL(teacher ‖ m) + (1 − β)·KL(student ‖ m), m = (1 − β)·student + β·teacher; and its
    gradient with respect to the student's logits: pₛ − pₜ (forward KL), else pₛ ⊙ (g − Σ pₛ g)
    with g = log pₛ − log pₜ (reverse KL) or (1 − β)(log pₛ − log m) (jsd)."""
    s, t = torch.log_softmax(student_logits, dim=-1), torch.log_softmax(teacher_logits, dim=-1)
    p_s = s.exp()
    if beta == 0:
        p_t = t.exp()
        return (p_t * (t - s)).sum(-1), p_s - p_t
    if beta == 1:
        g = s - t
        value = (p_s * g).sum(-1)
    else:
        m = torch.logaddexp(s + torch.log1p(torch.tensor(-beta)), t + torch.log(torch.tensor(beta)))
        value = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (p_s * (s - m)).sum(-1)
        g = (1 - beta) * (s - m)
    return value, p_s * (g - (p_s * g).sum(-1, keepdim=True))


class LinearDivergence(torch.autograd.Function):
    """Σ over rows of the divergence of the student's logits hidden·Wₛᵀ / T from the teacher's
    (divergence_and_gradient), in row chunks, the student's gradient worked out in the forward pass
    (backward scales it, as LinearCrossEntropy's does)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, beta: float, temperature: float):
        want_hidden, want_weight = hidden.requires_grad, weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for rows, h, h_teacher in row_chunks(hidden, weight, teacher_hidden):
            student = (h.to(weight.dtype) @ weight.t()).float() / temperature
            teacher = (h_teacher.to(teacher_weight.dtype) @ teacher_weight.t()).float() / temperature
            value, grad = divergence_and_gradient(student, teacher, beta)
            total += value.sum()
            grad /= temperature  # d/d(raw logits)
            if want_hidden:
                grad_hidden[rows] = grad.to(weight.dtype) @ weight
            if want_weight:
                grad_weight.addmm_(grad.t(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, _ = LinearCrossEntropy.backward(ctx, grad_total)  # the same saved gradients
        return grad_hidden, grad_weight, None, None, None, None
