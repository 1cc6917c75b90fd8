"""DiaBlo (Gurses et al. 2025, "DiaBlo: Diagonal Blocks Are Sufficient For Finetuning"): each
targeted weight W (d_out × d_in) is cut into an N×N grid of blocks and only its diagonal blocks
are trained, as an additive update:

    W' = W + blockdiag(D_1, …, D_N),  D_i of shape (d_out/N × d_in/N)   (`diablo_D`, (N, d_out/N, d_in/N))
    y = W x + b + [D_1 x_1; …; D_N x_N],  x_i the i-th slice of d_in/N inputs

The update is one batched matmul over the blocks; the dense ΔW is formed only to merge. D starts
at zeros (the paper: no special init is needed; the official code), so the model starts unchanged.
The paper writes Y = XW + XD with W (d_in × d_out); its blocks are the transposes of these.
A layer costs d_out·d_in/N parameters.

Defaults: the paper's targets, queries, keys, values, up and down projections (the official
`qkvud`). N = 32, where the paper and its code use 64 (64×64 blocks on Llama-2-7B): 64 does not
divide the 32 outputs of tiny-random-llama's key and value projections, and 32 divides every
projection of SmolLM2-135M as well. The official code pads a dimension N does not divide;
tunelab refuses it instead.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import AdapterLayer, LinearAdapterMethod, LinearTargetOptions

PAPER_TARGET = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


class DiabloOptions(LinearTargetOptions):
    name: Literal["diablo"] = "diablo"
    target: Literal["all-linear"] | list[str] = Field(default_factory=lambda: list(PAPER_TARGET))
    # N: the grid is N×N blocks, so N must divide both the inputs and the outputs of every target.
    blocks: int = Field(default=32, ge=1)


class DiabloLinear(AdapterLayer):
    """y = W x + b + blockdiag(D) x, computed block by block."""

    def __init__(self, base_layer: nn.Linear, blocks: int):
        super().__init__(base_layer)
        shape = (blocks, base_layer.out_features // blocks, base_layer.in_features // blocks)
        # fp32 even on a half-precision base: small updates would round away in bf16.
        self.diablo_D = nn.Parameter(torch.zeros(shape, device=base_layer.weight.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        blocks = self.diablo_D
        slices = x.to(blocks.dtype).unflatten(-1, (blocks.shape[0], blocks.shape[2]))
        update = torch.einsum("...nj,nij->...ni", slices, blocks).flatten(-2)
        # Sum in fp32, then back to the base's dtype.
        return (y + update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return torch.block_diag(*self.diablo_D)


class Diablo(LinearAdapterMethod):
    """DiaBlo: trains only the diagonal blocks of an N×N grid over each weight (zeros at init)."""

    name = "diablo"
    Options = DiabloOptions

    def wrap(self, name: str, base: nn.Linear) -> DiabloLinear:
        blocks = self.options.blocks
        if base.in_features % blocks or base.out_features % blocks:
            raise TunelabError(
                f"method.blocks={blocks} must divide both dimensions of {name} ({base.out_features} outputs × {base.in_features} inputs) to cut it into a {blocks}×{blocks} grid"
            )
        return DiabloLinear(base, blocks)
