"""Orthogonal finetuning as peft implements it: the input of a frozen linear layer is rotated by a
trainable orthogonal matrix R, y = (x R) Wᵀ + b with x a row (so W' = W Rᵀ), which keeps the
angles between W's rows. R starts at the identity (the model is unchanged at init).

- `oft` (OFT, Qiu et al. 2023): R = diag(R_1, …, R_D), blocks of side b, each the Cayley transform
  of a skew-symmetric Q_i stored as its strict upper triangle (`oft_R.weight`, (D, b(b−1)/2)).
  peft has two transforms, and they turn opposite ways for the same Q:
  exact, R_i = (I − Q)(I + Q)⁻¹; and `cayley_neumann` (peft's default, no matrix inverse),
  R_i = (I + Q)(I + Q + … + Q^k), the Cayley transform of −Q with (I − Q)⁻¹ cut after Q^k,
  k = max(neumann_terms − 2, 2) (peft always keeps the Q² term, so 3 and 4 terms agree).
  `coft` (constrained OFT) keeps each Q within Frobenius radius eps/√D of 0; `block_share` uses
  one Q for every block.
- `boft` (BOFT, Liu et al. 2024): R = M_{m−1} ⋯ M_0, m butterfly factors, each
  M_j = P_j diag(R_j1, …, R_jD) P_jᵀ with P_j the butterfly permutation of level j (P_0 = I, so
  m = 1 is OFT); its blocks are exact Cayley transforms of the skew part of full b×b tensors
  (`boft_R`, (m, D, b, b)), and a vector `boft_s` (d_out, 1) scales the outputs:
  y = s ⊙ ((x R) Wᵀ) + b.

Both have peft's multiplicative dropout, in training only: blocks replaced by the identity for one
forward (`module_dropout` of OFT: int(p·D) of them; `dropout` of BOFT: int(p·D) of one random
factor, with the random draws of peft's layer). peft 0.21 builds OFT's dropout layer but never
calls it; tunelab applies it.

The forward rotates x block by block (O(m·d_in·b) per token) instead of forming R: BOFT in peft
builds R from m dense d_in×d_in products every forward.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import (
    PEFT_TARGETING_DEFAULTS,
    AdapterLayer,
    LinearAdapterMethod,
    PeftDefaultTargetOptions,
    reject_peft_settings,
    target_from_peft,
)
from tunelab.models.quantize import frozen_linear

# peft changed the Cayley–Neumann series in 0.18.0; tunelab implements the current one.
NEUMANN_SERIES_SINCE = (0, 18)


class BlockOptions(PeftDefaultTargetOptions):
    """peft's two ways to size the blocks: `block_size`, or a block count (the field named by
    `count_key`), the other 0. A count given alone replaces the default size."""

    count_key: ClassVar[str]
    block_size: int

    @model_validator(mode="before")
    @classmethod
    def _count_replaces_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get(cls.count_key) and "block_size" not in data:
            return {**data, "block_size": 0}
        return data

    @model_validator(mode="after")
    def _size_or_count_not_both(self) -> BlockOptions:
        count = getattr(self, self.count_key)
        if bool(self.block_size) == bool(count):
            raise ValueError(f"give either block_size or {self.count_key}, the other 0 (got block_size={self.block_size}, {self.count_key}={count})")
        return self


class OftOptions(BlockOptions):
    count_key = "r"
    name: Literal["oft"] = "oft"
    block_size: int = Field(default=32, ge=0)
    # The number of blocks instead (block_size = d_in / r); peft's `r`.
    r: int = Field(default=0, ge=0)
    module_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    coft: bool = False
    eps: float = Field(default=6e-5, gt=0)
    block_share: bool = False
    cayley_neumann: bool = True
    neumann_terms: int = Field(default=5, ge=3)


class BoftOptions(BlockOptions):
    count_key = "block_num"
    name: Literal["boft"] = "boft"
    block_size: int = Field(default=4, ge=0)
    # The number of blocks per factor instead (block_size = d_in / block_num).
    block_num: int = Field(default=0, ge=0)
    n_butterfly_factor: int = Field(default=1, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def layer_block_size(name: str, features: int, size: int, count: int, count_key: str) -> int:
    """The block side on layer `name`: `size`, or features / `count`; either must divide its input."""
    divisor = size or count
    if divisor > features or features % divisor:
        key = "block_size" if size else count_key
        raise TunelabError(f"method.{key}={divisor} does not divide the {features} input features of {name}")
    return size or features // count


# ---- Orthogonal blocks


def skew_from_packed(packed: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size(size−1)/2) → (n, size, size): the skew-symmetric matrices with `packed` as their
    strict upper triangles, row by row (peft's order)."""
    rows, cols = torch.triu_indices(size, size, 1, device=packed.device)
    upper = packed.new_zeros(packed.shape[0], size, size)
    upper[:, rows, cols] = packed
    return upper - upper.transpose(1, 2)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """(I − Q)(I + Q)⁻¹ for a batch of skew-symmetric Q: orthogonal, the identity at Q = 0."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """peft's inverse-free series I + 2Q + … + 2Q^k + Q^(k+1), k = max(terms − 2, 2)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    result, power = eye + 2 * q, q
    for _ in range(max(terms - 2, 2) - 1):
        power = power @ q
        result = result + 2 * power
    return result + power @ q


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """(D, b, b) with int(p·D) random blocks replaced by the identity (peft's multiplicative
    dropout, drawing the same permutation)."""
    count, size = blocks.shape[0], blocks.shape[-1]
    dropped = (torch.randperm(count) < int(p * count)).to(blocks.device)
    eye = torch.eye(size, device=blocks.device, dtype=blocks.dtype)
    return torch.where(dropped[:, None, None], eye, blocks)


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x · diag(blocks) for rows x (..., D·b): each b-slice of x times its (b, b) block."""
    count, size = blocks.shape[0], blocks.shape[-1]
    return torch.einsum("...dk,dkc->...dc", x.unflatten(-1, (count, size)), blocks).flatten(-2)


# ---- OFT


class OftRotation(nn.Module):
    """`weight`: the skew-symmetric Q of each block, packed (peft's `oft_R`, whose tensor is `oft_R.weight`)."""

    def __init__(self, n_blocks: int, block_size: int, device: torch.device, neumann_terms: int | None, coft_eps: float | None):
        super().__init__()
        # fp32 even on a half-precision base: small rotations would round away in bf16.
        self.weight = nn.Parameter(torch.zeros(n_blocks, block_size * (block_size - 1) // 2, device=device, dtype=torch.float32))
        self.block_size = block_size
        self.neumann_terms = neumann_terms  # None: the exact Cayley transform
        self.coft_eps = coft_eps  # None: unconstrained

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks, (n_blocks, b, b)."""
        if self.coft_eps is not None:
            self._constrain()
        q = skew_from_packed(self.weight, self.block_size)
        return cayley(q) if self.neumann_terms is None else cayley_neumann(q, self.neumann_terms)

    @torch.no_grad()
    def _constrain(self) -> None:
        """COFT: scale each Q outside Frobenius radius eps/√n back onto it, in place before every
        use as peft does (so the saved tensors are the constrained ones)."""
        radius = self.coft_eps / math.sqrt(self.weight.shape[0])
        norm = math.sqrt(2) * self.weight.norm(dim=1, keepdim=True)  # each packed entry is in Q twice
        self.weight.copy_(torch.where(norm <= radius, self.weight, self.weight * (radius / norm)))


class OftLinear(AdapterLayer):
    """y = (x R) Wᵀ + b, R block-diagonal orthogonal (see the module docstring)."""

    def __init__(self, base_layer: nn.Linear, block_size: int, share: bool, dropout: float, neumann_terms: int | None, coft_eps: float | None):
        super().__init__(base_layer)
        self.n_blocks = base_layer.in_features // block_size
        self.oft_R = OftRotation(1 if share else self.n_blocks, block_size, base_layer.weight.device, neumann_terms, coft_eps)
        self.module_dropout = dropout

    def blocks(self, training: bool) -> torch.Tensor:
        blocks = self.oft_R.rotations()
        # A shared block is never dropped (peft's dropout skips a single block).
        if training and self.module_dropout > 0 and blocks.shape[0] > 1:
            blocks = drop_blocks(blocks, self.module_dropout)
        return blocks.expand(self.n_blocks, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotated = rotate_blocks(x.to(torch.float32), self.blocks(self.training))
        return self.base_layer(rotated.to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        weight = self.base_weight()
        rotation = torch.block_diag(*self.blocks(training=False))
        return (weight.to(rotation.dtype) @ rotation.t()).to(weight.dtype)


class Oft(LinearAdapterMethod):
    """OFT: a trainable block-diagonal orthogonal rotation of each targeted layer's input (identity at init)."""

    name = "oft"
    Options = OftOptions
    peft_type = "OFT"

    def wrap(self, name: str, base: nn.Linear) -> OftLinear:
        opts = self.options
        block_size = layer_block_size(name, base.in_features, opts.block_size, opts.r, "r")
        return OftLinear(
            base,
            block_size,
            share=opts.block_share,
            dropout=opts.module_dropout,
            neumann_terms=opts.neumann_terms if opts.cayley_neumann else None,
            coft_eps=opts.eps if opts.coft else None,
        )

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        opts = self.options
        return {
            "r": opts.r,
            "oft_block_size": opts.block_size,
            "module_dropout": opts.module_dropout,
            "coft": opts.coft,
            "eps": opts.eps,
            "block_share": opts.block_share,
            "use_cayley_neumann": opts.cayley_neumann,
            "num_cayley_neumann_terms": opts.neumann_terms,
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
            "modules_to_save": None,
            # peft reads an adapter without a version as one older than its current Cayley–Neumann
            # series (and warns): name the first version whose series this is.
            "peft_version": ".".join(map(str, NEUMANN_SERIES_SINCE)) + ".0",
        }

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        reject_peft_settings(config, source, {**PEFT_TARGETING_DEFAULTS, "bias": ("none", None), "fan_in_fan_out": (False, None)})
        if "oft_block_size" not in config:
            raise TunelabError(f"{source}: an OFT adapter from peft < 0.14 (no oft_block_size), a format tunelab does not read")
        neumann = config.get("use_cayley_neumann", True)
        version = re.match(r"(\d+)\.(\d+)", str(config.get("peft_version") or ""))
        if neumann and version and tuple(map(int, version.groups())) < NEUMANN_SERIES_SINCE:
            raise TunelabError(f"{source}: made by peft {config['peft_version']} with the Cayley–Neumann series peft changed in 0.18; tunelab implements the current one")
        return {
            "name": cls.name,
            "block_size": config["oft_block_size"],
            "r": config.get("r", 0),
            "module_dropout": config.get("module_dropout", 0.0),
            "coft": config.get("coft", False),
            "eps": config.get("eps", 6e-5),
            "block_share": config.get("block_share", False),
            "cayley_neumann": neumann,
            "neumann_terms": config.get("num_cayley_neumann_terms", 5),
            "target": target_from_peft(config, source),
        }


# ---- BOFT


def butterfly_permutation(features: int, block_size: int, level: int) -> torch.Tensor:
    """peft's butterfly permutation of `level` ≥ 1, as indices `perm` (its matrix has P[i, perm[i]] = 1).

    Each group of block_size·2^level features is cut into half-blocks; the even-numbered
    half-blocks come first, then the odd ones: a block of the next factor then mixes features that
    were 2^level half-blocks apart.
    """
    half = block_size // 2
    group = block_size * 2**level
    order = [*range(0, group // half, 2), *range(1, group // half, 2)]
    within = torch.cat([torch.arange(h * half, (h + 1) * half) for h in order])
    return (torch.arange(0, features, group)[:, None] + within).flatten()


class BoftLinear(AdapterLayer):
    """y = s ⊙ ((x R) Wᵀ) + b, R a product of butterfly-permuted block-diagonal orthogonal factors."""

    def __init__(self, base_layer: nn.Linear, block_size: int, factors: int, dropout: float):
        super().__init__(base_layer)
        device, n_blocks = base_layer.weight.device, base_layer.in_features // block_size
        # fp32 even on a half-precision base (small rotations would round away in bf16); peft's
        # init: zero (the identity rotation) and unit scales.
        self.boft_R = nn.Parameter(torch.zeros(factors, n_blocks, block_size, block_size, device=device, dtype=torch.float32))
        self.boft_s = nn.Parameter(torch.ones(base_layer.out_features, 1, device=device, dtype=torch.float32))
        self.dropout = dropout
        # Levels 1..m−1 (level 0 is the identity): x P is x[..., inverse], and u Pᵀ is u[..., perm].
        perms = [butterfly_permutation(base_layer.in_features, block_size, level) for level in range(1, factors)]
        self.register_buffer("butterfly", torch.stack(perms).to(device) if perms else None, persistent=False)
        self.register_buffer("butterfly_inverse", torch.stack([p.argsort() for p in perms]).to(device) if perms else None, persistent=False)

    def rotate(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """x R for rows x, R = M_{m−1} ⋯ M_0: the factors apply from the last to the first."""
        factors, n_blocks, size, _ = self.boft_R.shape
        skew = 0.5 * (self.boft_R - self.boft_R.transpose(-1, -2))
        blocks = list(cayley(skew.reshape(-1, size, size)).reshape(factors, n_blocks, size, size).unbind(0))
        if training and self.dropout > 0:
            chosen = int(torch.randint(0, factors, (1,)).item())  # drawn before the permutation, as peft
            blocks[chosen] = drop_blocks(blocks[chosen], self.dropout)
        for level in reversed(range(factors)):
            if level > 0:
                x = x[..., self.butterfly_inverse[level - 1]]
            x = rotate_blocks(x, blocks[level])
            if level > 0:
                x = x[..., self.butterfly[level - 1]]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        rotated = self.rotate(x.to(torch.float32), self.training).to(x.dtype)
        y = (frozen_linear(rotated, base.weight) * self.boft_s.flatten()).to(x.dtype)
        return y if base.bias is None else y + base.bias  # the bias is not scaled

    def merged_weight(self) -> torch.Tensor:
        weight = self.base_weight()
        rotation = self.rotate(torch.eye(self.in_features, device=weight.device), training=False)  # rows of I ↦ R
        return (self.boft_s * (weight.to(rotation.dtype) @ rotation.t())).to(weight.dtype)


class Boft(LinearAdapterMethod):
    """BOFT: OFT with butterfly-factorized rotations (dense orthogonal mixing from small blocks) and output scales."""

    name = "boft"
    Options = BoftOptions
    peft_type = "BOFT"

    def wrap(self, name: str, base: nn.Linear) -> BoftLinear:
        opts = self.options
        block_size = layer_block_size(name, base.in_features, opts.block_size, opts.block_num, "block_num")
        factors, n_blocks = opts.n_butterfly_factor, base.in_features // block_size
        # Butterfly levels split blocks in halves and pair blocks 2^level apart.
        if factors > 1 and (block_size % 2 or n_blocks % 2 ** (factors - 1)):
            raise TunelabError(
                f"method.n_butterfly_factor={factors} on {name}: needs an even block size (got {block_size}) and a "
                f"block count divisible by 2^{factors - 1} (got {n_blocks} blocks of {base.in_features} features)"
            )
        return BoftLinear(base, block_size, factors, opts.dropout)

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        opts = self.options
        return {
            "boft_block_size": opts.block_size,
            "boft_block_num": opts.block_num,
            "boft_n_butterfly_factor": opts.n_butterfly_factor,
            "boft_dropout": opts.dropout,
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
            "modules_to_save": None,
        }

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        reject_peft_settings(config, source, {**PEFT_TARGETING_DEFAULTS, "bias": ("none", None), "fan_in_fan_out": (False, None)})
        return {
            "name": cls.name,
            "block_size": config.get("boft_block_size", 4),
            "block_num": config.get("boft_block_num", 0),
            "n_butterfly_factor": config.get("boft_n_butterfly_factor", 1),
            "dropout": config.get("boft_dropout", 0.0),
            "target": target_from_peft(config, source),
        }
