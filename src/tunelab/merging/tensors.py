"""The arithmetic of merging, on plain tensors: one weight's task vectors (τ_i = θ_i − θ_base, or an
adapter's ΔW) in, one merged task vector out. No files, no models: `merging/merge.py` feeds these
one weight at a time, `federated/` aggregates clients' updates with them.

Semantics follow mergekit's methods, parameter for parameter (`weight`, `density`, `normalize`,
`rescale`, `lambda`, `t`), with one exception: DARE's `rescale` divides the kept entries by the
density, as the DARE paper (Yu et al. 2023) and peft do, where mergekit matches the L1 norm of
the pruned task vector instead.
"""

from __future__ import annotations

import torch

# Methods whose merged update is linear in the inputs' updates (Σ c_i τ_i): a merge of LoRA
# adapters is then exactly a LoRA adapter of the summed ranks (`stack_lora_factors`).
LINEAR_METHODS = ("linear", "task_arithmetic")
# Methods that combine task vectors over the base (the rest, `linear` and `slerp`, combine weights).
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "magnitude_prune")
METHODS = ("linear", *TASK_VECTOR_METHODS, "slerp")
# How each task-vector method sparsifies its inputs, and whether it elects a sign per entry (TIES).
SPARSIFY = {"task_arithmetic": None, "ties": "magnitude", "dare_ties": "random", "dare_linear": "random", "magnitude_prune": "magnitude"}
ELECTS_SIGN = ("ties", "dare_ties")
# mergekit's defaults: TIES divides by the weight of the agreeing inputs; DARE rescales.
DEFAULT_NORMALIZE = {"linear": True, "ties": True}
DEFAULT_RESCALE = ("dare_ties", "dare_linear")


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its `density` share of largest-magnitude entries zeroed (at least one
    kept while density > 0, as mergekit does)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    keep = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), keep).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune(tensor: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop: each entry kept with probability `density` (drawn from `generator`), the kept
    ones divided by `density` when `rescale` (so the expected update is unchanged)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def merge_task_vectors(
    method: str,
    tasks: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    normalize: bool,
    rescale: bool,
    scale: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The merged task vector of a task-vector method: each τ_i sparsified (by magnitude or DARE's
    random drop, to its density), weighted, then summed over all inputs or, for the TIES family,
    over the inputs whose sign agrees with the elected sign (that of the weighted sum) per entry;
    `normalize` divides by the weights summed the same way; `scale` is mergekit's `lambda`."""
    sparsify = SPARSIFY[method]
    kept = []
    for tau, density in zip(tasks, densities, strict=True):
        if sparsify == "magnitude":
            tau = magnitude_prune(tau, density)
        elif sparsify == "random":
            tau = random_prune(tau, density, rescale, generator)
        kept.append(tau)
    stacked = torch.stack(kept)
    weight = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * weight
    if method in ELECTS_SIGN:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
        agrees = (weighted.sign() == elected).to(stacked.dtype)
        merged, divisor = (weighted * agrees).sum(0), (weight * agrees).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged, divisor = weighted.sum(0), weight.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if normalize:
        merged = merged / divisor
    return merged * scale if scale != 1 else merged


def linear_weights(weights: list[float], normalize: bool) -> list[float]:
    """The coefficients of a `linear` merge: the weights, divided by their sum when `normalize`."""
    total = sum(weights)
    return [w / total for w in weights] if normalize and abs(total) > 1e-8 else list(weights)


def slerp(t: float, start: torch.Tensor, end: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from `start` (t = 0) to `end` (t = 1), the tensors taken as two
    vectors: sin((1−t)θ)/sin θ · start + sin(tθ)/sin θ · end, θ the angle between them; plain
    linear interpolation where they are (anti)parallel within `dot_threshold` (as mergekit)."""
    a, b = start.reshape(-1).double(), end.reshape(-1).double()
    norm_a, norm_b = a.norm(), b.norm()
    dot = (a / (norm_a if norm_a > eps else 1) * (b / (norm_b if norm_b > eps else 1))).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        mixed = (1 - t) * a + t * b
    else:
        theta = torch.acos(dot)
        mixed = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return mixed.reshape(start.shape).to(start.dtype)


def stack_lora_factors(factors: list[tuple[torch.Tensor, torch.Tensor, float]], coefficients: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A = Σ c_i · s_i · B_i·A_i exactly: the A_i stacked along the rank, the B_i
    (times c_i·s_i) side by side, so the rank is the sum of the inputs' (FLoRA's stacking).
    `factors`: (A_i [r_i × in], B_i [out × r_i], s_i) per input."""
    a = torch.cat([a for a, _, _ in factors], dim=0)
    b = torch.cat([b * (c * s) for (_, b, s), c in zip(factors, coefficients, strict=True)], dim=1)
    return a, b


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error) with B·A the best rank-`rank` approximation of `delta` (Eckart–Young),
    the singular values split evenly between the factors; the error is ‖ΔW − BA‖_F / ‖ΔW‖_F."""
    u, singular, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, singular.numel())
    root = singular[:rank].sqrt()
    total = singular.square().sum()
    error = (singular[rank:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return (root[:, None] * vh[:rank]).to(delta.dtype), (u[:, :rank] * root).to(delta.dtype), error
