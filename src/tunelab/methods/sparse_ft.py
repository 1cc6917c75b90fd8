"""SpIEL (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models"): each targeted
linear layer trains k of its weights, and which k moves during training.

Each adapted layer holds k (index, delta) pairs: `sparse_ft_indices` (a buffer of flat indices
into W, saved with the weights) and `sparse_ft_delta` (a parameter, zeros at init); with
ΔW = scatter(Δ at the indices),

    y = W x + b + ΔW x          W' = W + ΔW

k = round(density · d_out · d_in) per layer (or `k`), the initial indices drawn at random (seeded).
The backward computes ∂L/∂Δ_j = Σ_t g[t, row_j] x[t, col_j] for the k entries only: no dense
gradient of W, except in the steps that collect one for regrowth (below). ΔW is scattered into a
dense temporary (W's size) for the forward and input-gradient GEMMs.

Every `update_every` steps (after the optimizer step, `after_step`), SpIEL-AG (the variant with
accumulated gradients; SpIEL-MA's SM3 momenta are not implemented):
- drop: the n slots with the smallest |Δ|, n = ⌊k · ζ_t⌋, ζ_t = regrow_fraction · (1 − t/T) (the
  reference implementation's linear decay; t the step, T the run's steps);
- grow: the n positions, among those not kept, with the largest |G|, where G is ∂L/∂W summed over
  the `accumulation_steps` steps ending at this one (the backward adds gᵀx into `gradient_sum`
  in those steps only). A dropped index that is grown again keeps its slot untouched; every other
  dropped slot takes a new index with Δ = 0 and its optimizer moments zeroed (every optimizer
  state tensor of Δ's shape: AdamW's exp_avg and exp_avg_sq), so no moment of an old index
  carries over. The reference code instead starts the moments from the accumulated gradient
  and keeps a per-slot age for Adam's bias correction; torch's AdamW has one step count per
  tensor, so a regrown slot is bias-corrected as an old one.

The loop hands methods no optimizer, so the method finds it with torch's process-wide optimizer
step hook (registered in `param_groups`, removed once the optimizer holding Δ has stepped).
The gradient sums of a phase in progress are training state: checkpoints hold them (exact resume).
"""

from __future__ import annotations

import math
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from tunelab.errors import TunelabError
from tunelab.methods.base import AdapterLayer, LinearTargetOptions
from tunelab.methods.s2ft import BufferedAdapterMethod

# Checkpoint keys of the gradient sums of an accumulation phase, followed by the layer's name.
GRADIENT_SUM = "sparse_ft_gradient_sum."


class SparseFtOptions(LinearTargetOptions):
    name: Literal["sparse_ft"] = "sparse_ft"
    # Trained entries per layer: a fraction of the matrix, or `k` entries in every layer.
    density: float = Field(default=0.01, gt=0.0, le=1.0)
    k: int | None = Field(default=None, ge=1)
    # Steps between two regrowths, and how many steps (ending at a regrowth) sum the gradient.
    update_every: int = Field(default=20, ge=1)
    accumulation_steps: int = Field(default=5, ge=1)
    # The fraction of each layer's entries replaced at the first regrowth (decays linearly to 0).
    regrow_fraction: float = Field(default=0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> SparseFtOptions:
        if self.k is not None and "density" in self.model_fields_set:
            raise ValueError("set k or density, not both")
        if self.accumulation_steps > self.update_every:
            raise ValueError(f"accumulation_steps={self.accumulation_steps} exceeds update_every={self.update_every}")
        return self


def scatter_dense(delta: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """ΔW: `delta` at the flat `indices` of a zero matrix of `shape`."""
    return delta.new_zeros(shape[0] * shape[1]).index_copy(0, indices, delta).view(shape)


class SparseDeltaProduct(torch.autograd.Function):
    """x ΔWᵀ for ΔW = scatter(Δ at the flat indices), with the gradient of Δ computed for the k
    entries only; when `gradient_sum` is given, the backward also adds the dense ∂L/∂W = gᵀx to it."""

    @staticmethod
    def forward(ctx, x, delta, indices, shape, gradient_sum):
        ctx.save_for_backward(x, delta, indices)
        ctx.shape, ctx.gradient_sum = shape, gradient_sum
        return F.linear(x.to(delta.dtype), scatter_dense(delta, indices, shape))

    @staticmethod
    def backward(ctx, grad):
        x, delta, indices = ctx.saved_tensors
        d_in = ctx.shape[1]
        flat_x, flat_grad = x.reshape(-1, d_in).to(delta.dtype), grad.reshape(-1, ctx.shape[0])
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ scatter_dense(delta, indices, ctx.shape)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            rows, cols = indices // d_in, indices % d_in
            grad_delta = (flat_grad[:, rows] * flat_x[:, cols]).sum(0)
        if ctx.gradient_sum is not None:
            ctx.gradient_sum.add_(flat_grad.T @ flat_x)
        return grad_x, grad_delta, None, None, None


class SparseFtLinear(AdapterLayer):
    """y = W x + b + scatter(Δ at `sparse_ft_indices`) x, with W frozen."""

    def __init__(self, base_layer: nn.Linear, k: int):
        super().__init__(base_layer)
        device, size = base_layer.weight.device, base_layer.out_features * base_layer.in_features
        if device.type == "meta":  # no values to draw on a skeleton (parameter counts only)
            indices = torch.empty(k, dtype=torch.long, device=device)
        else:
            indices = torch.randperm(size)[:k].sort().values.to(device)
        self.register_buffer("sparse_ft_indices", indices)
        # fp32 even on a half-precision base: tiny updates vanish in bf16.
        self.sparse_ft_delta = nn.Parameter(torch.zeros(k, device=device, dtype=torch.float32))
        # ∂L/∂W summed over the steps of an accumulation phase (d_out × d_in); None outside one.
        self.gradient_sum: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        update = SparseDeltaProduct.apply(x, self.sparse_ft_delta, self.sparse_ft_indices, self.shape, self.gradient_sum)
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return scatter_dense(self.sparse_ft_delta, self.sparse_ft_indices, self.shape)

    @torch.no_grad()
    def regrow(self, count: int) -> torch.Tensor:
        """Drop the `count` smallest |Δ|, grow the `count` largest |gradient_sum| among the positions
        not kept; return the slots that now hold a new index (their Δ is zero)."""
        indices, delta = self.sparse_ft_indices, self.sparse_ft_delta
        dropped = torch.topk(delta.abs(), count, largest=False, sorted=True).indices
        kept = torch.ones_like(indices, dtype=torch.bool)
        kept[dropped] = False
        scores = self.gradient_sum.abs().flatten()
        scores[indices[kept]] = -math.inf
        grown = torch.topk(scores, count, sorted=True).indices
        freed = dropped[~torch.isin(indices[dropped], grown)]
        indices[freed] = grown[~torch.isin(grown, indices[dropped])]
        delta[freed] = 0.0
        return freed


class SparseFt(BufferedAdapterMethod):
    """SpIEL: sparse fine-tuning of k entries per matrix, pruned by |Δ| and regrown by accumulated gradients."""

    name = "sparse_ft"
    Options = SparseFtOptions
    whole_tensors_reason = "its prune-and-regrow step ranks the entries of whole weight matrices and gradients"
    single_process_reason = "it regrows entries by the dense gradients each process accumulates of its own samples, so the ranks would choose different entries"

    def __init__(self, options: SparseFtOptions):
        super().__init__(options)
        self._optimizer: weakref.ReferenceType | None = None

    def wrap(self, name: str, base: nn.Linear) -> SparseFtLinear:
        size = base.out_features * base.in_features
        k = self.options.k if self.options.k is not None else round(self.options.density * size)
        key = "k" if self.options.k is not None else "density"
        if not 1 <= k <= size:
            raise TunelabError(f"method.{key}: gives k={k} trained entries for {name} ({base.out_features} x {base.in_features})")
        return SparseFtLinear(base, k)

    # ---- training

    def collects_gradients(self, step: int, total_steps: int | None = None) -> bool:
        """Whether `step` adds ∂L/∂W to the gradient sums: it is one of the accumulation_steps
        steps that end at a regrowth step (one before the run's last step, where ζ_t > 0)."""
        every = self.options.update_every
        regrowth = math.ceil(step / every) * every
        return regrowth - step < self.options.accumulation_steps and (total_steps is None or regrowth < total_steps)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Training starts: watch for the optimizer, and collect gradients in step 1 if it is due."""
        self._watch_for_optimizer(self.trainable_parameters(model).values())
        self._collect_gradients(model, self.collects_gradients(1))
        return super().param_groups(model)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        layers = self.adapter_layers(model).values()
        if step % self.options.update_every == 0:
            fraction = self.options.regrow_fraction * (1 - step / total_steps)
            for layer in layers:
                count = int(layer.sparse_ft_delta.numel() * fraction)
                if layer.gradient_sum is not None and count > 0:
                    self._reset_moments(layer.sparse_ft_delta, layer.regrow(count))
                layer.gradient_sum = None
        self._collect_gradients(model, self.collects_gradients(step + 1, total_steps))

    def _collect_gradients(self, model: nn.Module, collect: bool) -> None:
        for layer in self.adapter_layers(model).values():
            if not collect:
                layer.gradient_sum = None
            elif layer.gradient_sum is None:
                layer.gradient_sum = torch.zeros(layer.shape, device=layer.sparse_ft_delta.device)

    def _watch_for_optimizer(self, params) -> None:
        """Remember the optimizer that steps `params` (torch's process-wide step hook; the loop
        gives methods no optimizer). The hook removes itself once it has found it."""
        method, ids = weakref.ref(self), {id(p) for p in params}

        def find(optimizer, args, kwargs):
            found = method()
            if found is None or any(id(p) in ids for group in optimizer.param_groups for p in group["params"]):
                if found is not None:
                    found._optimizer = weakref.ref(optimizer)
                handle.remove()

        handle = register_optimizer_step_post_hook(find)

    def _reset_moments(self, delta: nn.Parameter, slots: torch.Tensor) -> None:
        """Zero the optimizer's per-entry state (AdamW: exp_avg, exp_avg_sq) of `slots`."""
        optimizer = self._optimizer() if self._optimizer is not None else None
        if optimizer is None:  # not stepped by an optimizer (yet): no state to carry over
            return
        for value in optimizer.state.get(delta, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == delta.shape:
                value[slots] = 0

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights and indices, plus the gradient sums of an accumulation phase in progress."""
        sums = {GRADIENT_SUM + n: layer.gradient_sum for n, layer in self.adapter_layers(model).items() if layer.gradient_sum is not None}
        return {**self.state_dict(model), **sums}

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        layers = self.adapter_layers(model)
        for key in state:
            if key.startswith(GRADIENT_SUM) and key.removeprefix(GRADIENT_SUM) not in layers:
                raise TunelabError(f"{source}: gradient sum '{key}' fits no sparse_ft layer of this model")
        self.load_state_dict(model, {k: v for k, v in state.items() if not k.startswith(GRADIENT_SUM)}, source)
        for name, layer in layers.items():
            saved = state.get(GRADIENT_SUM + name)
            if saved is not None and saved.shape != layer.shape:
                raise TunelabError(f"{source}: '{GRADIENT_SUM + name}' has shape {tuple(saved.shape)}, the layer is {layer.shape}")
            layer.gradient_sum = None if saved is None else saved.clone().to(layer.sparse_ft_delta.device)
