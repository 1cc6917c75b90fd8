"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection"): AdamW whose moments live in a rank-r projection of each targeted matrix's gradient.

For a targeted weight with gradient G (m × n), every T optimizer steps (steps 1, T+1, 2T+1, ...):

    P = U[:, :r]       (m × r, the top-r left singular vectors of G)   if m ≤ n: R = Pᵀ G   (r × n)
    P = V[:, :r]       (n × r, the top-r right singular vectors of G)  if m > n: R = G P   (m × r)

and every step, with t the step and Adam's moments M, V of R's shape:

    M ← β₁ M + (1 − β₁) R,   V ← β₂ V + (1 − β₂) R²
    N = (M / (1 − β₁ᵗ)) / (√(V / (1 − β₂ᵗ)) + ε)
    W ← W − lr · wd · W − lr · scale · (P N  or  N Pᵀ)

so a matrix keeps r·(m or n) numbers per moment instead of m·n. Weight decay is decoupled and
applied first, as torch's AdamW does; ε is added to the bias-corrected √V, as torch's AdamW does
(the authors' code adds it before the correction). The moments are kept across a refresh of P,
as in the authors' code. A targeted matrix with r ≥ min(m, n) is not projected (P would be a
square rotation: no memory saved, and Adam's per-coordinate scaling lost): it gets AdamW's update
times `scale`, so with scale 1 it is AdamW. Every other parameter gets plain AdamW.

Why not the authors' `galore-torch` package: it requires bitsandbytes and keeps its projector as
a Python object in the optimizer state, which our checkpoints (safetensors and JSON only, never
pickles; see train/checkpoint.py) cannot hold. Here the state is tensors only: `step`,
`projector` (P), `exp_avg` (M) and `exp_avg_sq` (V), so resume is bitwise exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import name_matches

# The paper's choice (its code's `target_modules_list`): linear layers of attention and MLP blocks.
ATTENTION_MLP = ("attn", "mlp")


def galore_param_groups(model: nn.Module, groups: list[dict], target: str | list[str], rank: int, update_every: int, scale: float) -> list[dict]:
    """The method's optimizer groups, each split into its GaLore-targeted matrices (with the GaLore
    keys) and the rest (plain AdamW); every other group key (`lr_scale`) is kept on both."""
    targeted = {id(p) for p in target_matrices(model, target)}
    galore = {"galore_rank": rank, "galore_update_every": update_every, "galore_scale": scale}
    split = []
    for group in groups:
        projected = [p for p in group["params"] if id(p) in targeted]
        plain = [p for p in group["params"] if id(p) not in targeted]
        split += [{**group, "params": projected, **galore}] if projected else []
        split += [{**group, "params": plain}] if plain else []
    return split


def target_matrices(model: nn.Module, target: str | list[str]) -> list[nn.Parameter]:
    """Trainable weights of the linear layers `target` selects: `attention-mlp` (those whose module
    name contains `attn` or `mlp`) or module-name patterns as `method.target` takes them."""

    def selected(name: str) -> bool:
        if target == "attention-mlp":
            return any(part in name for part in ATTENTION_MLP)
        return name_matches(name, list(target))

    chosen = [module.weight for name, module in model.named_modules() if isinstance(module, nn.Linear) and module.weight.requires_grad and selected(name)]
    if not chosen:
        raise TunelabError(f"train.galore_target: no trainable linear weight matches {target!r} on this model and method")
    return chosen


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore's gradient projection on the groups that carry `galore_rank`."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            # Groups without GaLore's keys are plain AdamW.
            "galore_rank": None,
            "galore_update_every": 1,
            "galore_scale": 1.0,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, param.grad, group)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        state["step"] += 1
        t = int(state["step"])
        rank = group["galore_rank"]
        if rank is not None and rank < min(grad.shape) and (t - 1) % group["galore_update_every"] == 0:
            state["projector"] = top_singular_vectors(grad, rank)
        projector = state.get("projector")
        low_rank = grad if projector is None else project(grad, projector)
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low_rank), torch.zeros_like(low_rank)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        exp_avg.lerp_(low_rank, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low_rank, low_rank, value=1 - beta2)
        denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        normalized = exp_avg / denominator  # Adam's step direction before its 1/(1 − β₁ᵗ)
        update = normalized if projector is None else project_back(normalized, projector, grad.shape)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update, alpha=-group["lr"] * group["galore_scale"] / (1 - beta1**t))


def top_singular_vectors(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """P: the top-`rank` left singular vectors of G (m × r) if m ≤ n, else its right ones (n × r).
    The SVD runs in fp32 (as the authors' code); P is kept in the gradient's dtype."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    vectors = u[:, :rank] if grad.shape[0] <= grad.shape[1] else vh[:rank].T
    return vectors.to(grad.dtype).contiguous()


def project(grad: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """R = Pᵀ G (r × n) or G P (m × r)."""
    return projector.T @ grad if grad.shape[0] <= grad.shape[1] else grad @ projector


def project_back(low_rank: torch.Tensor, projector: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """P N (m × n) or N Pᵀ (m × n)."""
    return projector @ low_rank if shape[0] <= shape[1] else low_rank @ projector.T
