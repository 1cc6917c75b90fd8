"""ETHER and ETHER+ (Bini et al. 2024, "ETHER: Efficient Finetuning of Large-Scale Models with
Hyperplane Reflections"): multiplicative finetuning, the frozen weight transformed by hyperplane
reflections.

The paper writes a weight as W ∈ R^{d×f} with d its inputs (OFT's convention), so its left factor
acts on the inputs; the official code multiplies the torch (out × in) weight on the right. Here,
in torch's layout, with every transform block-diagonal, n blocks of b = features/n each:

- ETHER: W' = W H, H = diag(H_1, …, H_n), H_i = I − 2 û_i û_iᵀ, û_i = u_i/‖u_i‖ (`ether_in.u`,
  (n, d_in/n)): y = W (H x) + b. Each H_i is a reflection: symmetric, orthogonal, det −1, and
  ‖H_i − I‖_F = 2 whatever u_i is. d_in parameters per layer, whatever n.
- ETHER+ (`plus: true`): the relaxation H⁺_i = I − û_i û_iᵀ + v̂_i v̂_iᵀ, on both sides of W:
  W' = H̃⁺ W H⁺, H⁺ over the d_in inputs (`ether_in.u`, `ether_in.v`) and H̃⁺ over the d_out
  outputs (`ether_out.u`, `ether_out.v`): y = H̃⁺ (W (H⁺ x)) + b; the bias is not transformed (as
  in the official code). H⁺ is symmetric but not orthogonal in general (it is the identity when
  v̂ = ±û). 2(d_in + d_out) parameters per layer.

Init, as the official code: u kaiming-uniform (a = √5, i.e. U(−1/√b, 1/√b)) and, for ETHER+,
v = −u, so H⁺ = I and an ETHER+ model starts as the base model. ETHER has no identity: a
reflection flips û in every block, so an ETHER model starts as a reflected (bounded-distance)
copy of the base model, not as the base model itself.

The forward never forms H: each block of x moves along û (and v̂): x − 2(ûᵀx)û, a rank-1 (ETHER+:
rank-2) update, O(d) per token. Merging is exact: W' = H̃⁺ W H⁺ (ETHER: W H).

For n > 1 the official code reshapes the (out × in) weight to (n, d_out, d_in/n), which multiplies
every d_in/n slice of the r-th group of d_out/n rows by H_r, not the r-th slice of the inputs;
tunelab implements the paper's block-diagonal H (the two agree at n = 1).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import AdapterLayer, LinearAdapterMethod, PeftDefaultTargetOptions
from tunelab.models.quantize import frozen_linear


class EtherOptions(PeftDefaultTargetOptions):
    """The paper's LLM setting: queries and values (Llama-2-7B: 0.26M ETHER parameters), n = 32."""

    name: Literal["ether"] = "ether"
    # n, the diagonal blocks of each transform: it must split the features it transforms into
    # equal blocks of at least 2 (the paper's best on Llama-2-7B is 32, 128 features each).
    blocks: int = Field(default=32, ge=1)
    # ETHER+: the relaxed H⁺ on both sides of W instead of ETHER's reflection of the inputs.
    plus: bool = False


def check_blocks(name: str, features: int, side: str, blocks: int) -> None:
    if features % blocks or features // blocks < 2:
        raise TunelabError(
            f"method.blocks={blocks} must split the {features} {side} features of {name} into equal blocks of at least 2 (a block of one feature has nothing to reflect)"
        )


class BlockReflections(nn.Module):
    """H = diag(H_1, …, H_n) over `features` = n·b: ETHER's I − 2ûûᵀ, or (`relaxed`) ETHER+'s
    I − ûûᵀ + v̂v̂ᵀ. Applied to rows x as x H; H is symmetric, so that is also H x."""

    def __init__(self, features: int, blocks: int, relaxed: bool, device: torch.device):
        super().__init__()
        # fp32 even on a half-precision base: small turns of u would round away in bf16.
        self.u = nn.Parameter(torch.empty(blocks, features // blocks, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))
        # v = −u: v̂v̂ᵀ = ûûᵀ, so H⁺ starts as the identity.
        self.v = nn.Parameter(-self.u.detach().clone()) if relaxed else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.unflatten(-1, self.u.shape)
        u = F.normalize(self.u, dim=-1)
        along_u = torch.einsum("...nb,nb->...n", blocks, u).unsqueeze(-1) * u
        if self.v is None:
            change = -2 * along_u
        else:
            v = F.normalize(self.v, dim=-1)
            # The two terms are summed before x is added: at init they cancel exactly and x comes back unchanged.
            change = torch.einsum("...nb,nb->...n", blocks, v).unsqueeze(-1) * v - along_u
        return (blocks + change).flatten(-2)


class EtherLinear(AdapterLayer):
    """y = W (H x) + b (ETHER) or y = H̃⁺ (W (H⁺ x)) + b (ETHER+)."""

    def __init__(self, base_layer: nn.Linear, blocks: int, plus: bool):
        super().__init__(base_layer)
        device = base_layer.weight.device
        self.ether_in = BlockReflections(base_layer.in_features, blocks, plus, device)
        self.ether_out = BlockReflections(base_layer.out_features, blocks, True, device) if plus else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.ether_in.u.dtype
        reflected = self.ether_in(x.to(dtype)).to(x.dtype)
        if self.ether_out is None:
            return self.base_layer(reflected)
        base = self.base_layer
        y = self.ether_out(frozen_linear(reflected, base.weight).to(dtype)).to(x.dtype)
        return y if base.bias is None else y + base.bias

    def merged_weight(self) -> torch.Tensor:
        weight = self.base_weight()
        merged = self.ether_in(weight.to(self.ether_in.u.dtype))  # W's rows times H: W H
        if self.ether_out is not None:
            merged = self.ether_out(merged.t()).t()  # H̃⁺ (W H⁺) = ((W H⁺)ᵀ H̃⁺)ᵀ, H̃⁺ symmetric
        return merged.to(weight.dtype)


class Ether(LinearAdapterMethod):
    """ETHER: block-diagonal hyperplane reflections of the inputs (ETHER+, `plus`: relaxed, both sides)."""

    name = "ether"
    Options = EtherOptions

    @property
    def adapter_off_is_initial(self) -> bool:
        return self.options.plus  # ETHER's reflections start random; ETHER+'s two terms cancel at init

    def wrap(self, name: str, base: nn.Linear) -> EtherLinear:
        opts = self.options
        check_blocks(name, base.in_features, "input", opts.blocks)
        if opts.plus:
            check_blocks(name, base.out_features, "output", opts.blocks)
        return EtherLinear(base, opts.blocks, opts.plus)
