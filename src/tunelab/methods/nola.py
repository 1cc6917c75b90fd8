"""NOLA (Koohpayegani et al., ICLR 2024, "NOLA: Compressing LoRA using Linear Combination of Random
Basis"): LoRA's two factors, each a trained linear combination of frozen random matrices.

For each adapted linear layer W (d_out × d_in):

    A = Σ_{i=1..k} α_i A_i  (r × d_in),   B = Σ_{j=1..l} β_j B_j  (d_out × r),
    y = W x + s · B A x,   ΔW = s · B A,   s = alpha / r.

Only the coefficients train: α (k numbers) and β (l), k + l per layer whatever r and the layer's size.

Choices where the paper leaves room:
- The bases have entries U(−1, 1)/√k (A_i) and U(−1, 1)/√l (B_j), as the official code draws them.
  They are drawn once from a CPU generator seeded with `seed` (A's stack k × r × max d_in first,
  then B's l × max d_out × r), sized for the largest adapted input and output; each layer uses the
  top-left slice, as VeRA's projections. All layers share them (the official ViT code, too, draws
  the same bases in every layer from one seed); each layer's coefficients make its own ΔW. So the
  memory is one pair of stacks, not one per layer.
- β starts at zero, so ΔW = 0 at init. The official LLM code zeroes α as well but adds a frozen
  Kaiming-initialized offset to A (A = A₀ + Σ α_i A_i); without A₀, α = β = 0 would be a saddle
  with zero gradients, so α starts random: α_i ~ U(−√(3/d_in), √(3/d_in)) (torch's seeded
  generator), which gives A the entry variance of LoRA's Kaiming-uniform A, 1/(3·d_in).
- The adapter stores the seed (in its options), not the bases: the paper's point is that seed and
  coefficients are the whole adapter. A reload regenerates the bases from torch's seeded CPU
  generator and checks them against `nola_basis_check` (the first entries of both stacks, saved
  with the coefficients), so bases that came out differently fail the load instead of silently
  changing the model.
- Defaults from the paper's LLaMA-2 runs: r = 16, k = l = 512, alpha = 4 (s = 0.25), every linear
  layer (QLoRA's targets, on which the official LLaMA code builds).

Tensor names: `nola_alpha` (k) and `nola_beta` (l) on each layer, fp32 on any base.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import AdapterLayer, LinearAdapterMethod, LinearTargetOptions, find_target_linears

CHECK = "nola_basis_check"
CHECK_ENTRIES = 8  # from each stack


class NolaOptions(LinearTargetOptions):
    name: Literal["nola"] = "nola"
    r: int = Field(default=16, ge=1)
    num_basis_a: int = Field(default=512, ge=1, description="k, the number of random matrices A is combined from")
    num_basis_b: int = Field(default=512, ge=1, description="l, the number of random matrices B is combined from")
    alpha: float = Field(default=4.0, gt=0)
    seed: int = Field(default=0, ge=0, lt=2**63, description="seeds the generator of the random bases")


def random_basis(shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """shape[0] matrices with entries U(−1, 1)/√shape[0], drawn on the CPU from `generator`."""
    return torch.empty(shape, device="cpu").uniform_(-1.0, 1.0, generator=generator) / math.sqrt(shape[0])


class NolaBases(nn.Module):
    """The frozen stacks every adapted layer shares: A_i (k × r × max d_in) and B_j (l × max d_out × r).

    Buffers outside the model's state_dict: they are regenerated from the seed, never saved.
    """

    def __init__(self, options: NolaOptions, max_in: int, max_out: int, device: torch.device):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(options.seed)
        basis_a = random_basis((options.num_basis_a, options.r, max_in), generator)
        basis_b = random_basis((options.num_basis_b, max_out, options.r), generator)
        self.register_buffer("nola_basis_a", basis_a.to(device), persistent=False)
        self.register_buffer("nola_basis_b", basis_b.to(device), persistent=False)

    def check(self) -> torch.Tensor:
        """The first entries of both stacks: what a reload must regenerate."""
        return torch.cat([self.nola_basis_a.flatten()[:CHECK_ENTRIES], self.nola_basis_b.flatten()[:CHECK_ENTRIES]])


class NolaLinear(AdapterLayer):
    """y = W x + s · B (A x), with A = Σ α_i A_i and B = Σ β_j B_j sliced from the shared bases."""

    def __init__(self, base_layer: nn.Linear, bases: NolaBases, scaling: float):
        super().__init__(base_layer)
        self.nola_bases = bases
        self.scaling = scaling
        num_a, num_b = bases.nola_basis_a.shape[0], bases.nola_basis_b.shape[0]
        device = base_layer.weight.device
        # fp32 even on a half-precision base; α drawn on the CPU (the same init on every device).
        bound = math.sqrt(3.0 / base_layer.in_features)
        self.nola_alpha = nn.Parameter(torch.empty(num_a, device="cpu").uniform_(-bound, bound).to(device))
        self.nola_beta = nn.Parameter(torch.zeros(num_b, device=device, dtype=torch.float32))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): r × d_in and d_out × r, each one matmul of its coefficients with its whole stack."""
        basis_a, basis_b = self.nola_bases.nola_basis_a, self.nola_bases.nola_basis_b
        num_a, r, max_in = basis_a.shape
        a = (self.nola_alpha @ basis_a.view(num_a, -1)).view(r, max_in)[:, : self.in_features]
        b = (self.nola_beta @ basis_b.view(basis_b.shape[0], -1)).view(-1, r)[: self.out_features]
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        y = self.base_layer(x)
        update = F.linear(F.linear(x.to(a.dtype), a), b) * self.scaling
        return (y + update).to(y.dtype)  # sum in fp32, then the base's dtype

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.scaling * (b @ a)


class Nola(LinearAdapterMethod):
    """NOLA: LoRA's factors as trained combinations of frozen seeded random bases (k + l per layer)."""

    name = "nola"
    Options = NolaOptions

    def attach(self, model: nn.Module) -> None:
        targets = [model.get_submodule(name) for name in find_target_linears(model, self.options)]
        if not targets:
            raise TunelabError("method.target: this model has no linear layer for NOLA to adapt")
        max_in, max_out = max(t.in_features for t in targets), max(t.out_features for t in targets)
        self._bases = NolaBases(self.options, max_in, max_out, targets[0].weight.device)
        super().attach(model)

    def wrap(self, name: str, base: nn.Linear) -> NolaLinear:
        return NolaLinear(base, self._bases, self.options.alpha / self.options.r)

    def bases(self, model: nn.Module) -> NolaBases:
        layers = self.adapter_layers(model)
        if not layers:
            raise TunelabError("method 'nola' is not attached to this model")
        return next(iter(layers.values())).nola_bases

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The coefficients, plus the check of the bases they were trained with."""
        return {**super().state_dict(model), CHECK: self.bases(model).check()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        if CHECK not in state:
            raise TunelabError(f"{source}: no {CHECK} among the weights (not a tunelab NOLA adapter?)")
        regenerated = self.bases(model).check()
        if not torch.equal(state[CHECK].to(regenerated.device), regenerated):
            raise TunelabError(
                f"{source}: the random bases drawn from seed {self.options.seed} differ from those the adapter was trained with (another seed, or another torch random generator)"
            )
        super().load_state_dict(model, {k: v for k, v in state.items() if k != CHECK}, source)
