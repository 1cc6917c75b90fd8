"""LoHa and LoKr, the LyCORIS weight updates as peft implements them: a frozen linear layer W plus a
trainable ΔW built from small factors, scaled by s = alpha/r.

- `loha` (FedPara, Hyeon-Woo et al. 2022): ΔW = s · (W1a W1b) ⊙ (W2a W2b), the Hadamard product
  of two rank-r matrices: rank up to r² from 2r(d_in + d_out) parameters.
- `lokr` (LyCORIS, Yeh et al. 2023): ΔW = s · W1 ⊗ W2, the Kronecker product of a small W1 and a
  larger W2 whose shapes split d_out and d_in into two factors each (`factorization`). W2 is
  itself a rank-r product W2a W2b when r is under half its larger side; with `decompose_both`
  the same rule applies to W1.

Both have peft's two dropouts, active in training only: `module_dropout` leaves the whole update
out of a forward, `rank_dropout` zeroes random output rows of ΔW (LoHa, and LoKr with
`rank_dropout_scale`, then divide the kept rows by the fraction kept). They draw their random
numbers from the same generator, in the same order, as peft's layers do.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from tunelab.methods.base import (
    PEFT_TARGETING_DEFAULTS,
    AdapterLayer,
    LinearAdapterMethod,
    PeftDefaultTargetOptions,
    reject_peft_settings,
    target_from_peft,
)


class LycorisOptions(PeftDefaultTargetOptions):
    """Options LoHa and LoKr share, with peft's defaults."""

    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=8.0, gt=0)
    rank_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class LohaOptions(LycorisOptions):
    name: Literal["loha"] = "loha"


class LokrOptions(LycorisOptions):
    name: Literal["lokr"] = "lokr"
    decompose_both: bool = False
    # -1: split each dimension into the two divisors closest to its square root; k > 0: into k and
    # dimension/k where k divides it (see `factorization`).
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("decompose_factor must be -1 (split near the square root) or a positive integer")
        return value


class LycorisLinear(AdapterLayer):
    """A frozen linear layer plus s · (an update built from the subclass's factors), with peft's dropouts.

    The forward is one matmul with W + ΔW, formed in fp32: on a half-precision base a small
    update would round away in W + ΔW, and one matmul with the sum costs less than peft's two (W x
    plus ΔW x), while autograd still gets ΔW's gradient from the same product.
    """

    def __init__(self, base_layer: nn.Linear, scaling: float, rank_dropout: float, module_dropout: float, rescale_rank_dropout: bool):
        super().__init__(base_layer)
        self.scaling = scaling
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.rescale_rank_dropout = rescale_rank_dropout

    def _parameter(self, rows: int, cols: int) -> nn.Parameter:
        # The adapter trains in fp32 even on a half-precision base: tiny updates vanish in bf16.
        return nn.Parameter(torch.empty(rows, cols, device=self.base_layer.weight.device, dtype=torch.float32))

    def update(self) -> torch.Tensor:
        """The unscaled update, out_features × in_features."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.update()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.training and self._module_dropped():
            return base(x)
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            delta = delta * self._rank_mask()[:, None].to(delta.device)
        weight = self.base_weight(delta.dtype) + delta
        bias = None if base.bias is None else base.bias.to(weight.dtype)
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    def _module_dropped(self) -> bool:
        # Drawn even when module_dropout is 0, as peft does: a seeded step then draws the same
        # numbers as peft's, so its dropouts can be checked against peft's.
        return torch.rand(1).item() <= self.module_dropout

    def _rank_mask(self) -> torch.Tensor:
        """1 for the output rows of ΔW kept this forward, 0 for the dropped (drawn on the CPU, as peft)."""
        keep = (torch.rand(self.out_features) > self.rank_dropout).float()
        if not self.rescale_rank_dropout:
            return keep
        # Divide by the fraction kept, bounded below by one row: when every row is dropped the mask
        # stays all zeros (peft divides 0 by 0 there, giving NaN).
        return keep / keep.mean().clamp_min(1.0 / keep.numel())


class LohaLinear(LycorisLinear):
    """ΔW = s · (hada_w1_a hada_w1_b) ⊙ (hada_w2_a hada_w2_b), each a rank-r product (peft's names)."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, rank_dropout: float, module_dropout: float):
        # peft always rescales LoHa's rank dropout.
        super().__init__(base_layer, scaling, rank_dropout, module_dropout, rescale_rank_dropout=True)
        out_features, in_features = base_layer.out_features, base_layer.in_features
        self.hada_w1_a = self._parameter(out_features, r)
        self.hada_w1_b = self._parameter(r, in_features)
        self.hada_w2_a = self._parameter(out_features, r)
        self.hada_w2_b = self._parameter(r, in_features)
        # peft's init (He, as FedPara proposes), in peft's order so a seeded attach draws the same
        # values; w2_b = 0 makes ΔW = 0, so the wrapped layer starts equal to W.
        with torch.no_grad():
            for factor in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
            nn.init.zeros_(self.hada_w2_b)

    def update(self) -> torch.Tensor:
        return HadamardOfProducts.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)


class HadamardOfProducts(torch.autograd.Function):
    """(A1 B1) ⊙ (A2 B2) whose backward recomputes the two out × in products from the rank-r
    factors: plain autograd would keep both alive from forward to backward, in every layer."""

    @staticmethod
    def forward(ctx, a1, b1, a2, b2):
        ctx.save_for_backward(a1, b1, a2, b2)
        return (a1 @ b1) * (a2 @ b2)

    @staticmethod
    def backward(ctx, grad):
        a1, b1, a2, b2 = ctx.saved_tensors
        grad1 = grad * (a2 @ b2)  # the gradient at A1 B1
        grad2 = grad * (a1 @ b1)  # the gradient at A2 B2
        return grad1 @ b1.t(), a1.t() @ grad1, grad2 @ b2.t(), a2.t() @ grad2


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's (and LyCORIS's) split of `dimension` into two factors for the Kronecker shapes.

    factor > 0 that divides `dimension`: (factor, dimension / factor), in that order. Otherwise the
    divisor pair closest to the square root, smaller first, where (factor > 0) the walk up the
    divisors stops before one larger than `factor`; a prime gives (1, dimension).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        next_m = m + 1
        while dimension % next_m:
            next_m += 1
        if next_m > limit:
            break
        m, n = next_m, dimension // next_m
    return min(m, n), max(m, n)


class LokrLinear(LycorisLinear):
    """ΔW = s · W1 ⊗ W2 with W1 (out_l × in_m) and W2 (out_k × in_n), where out = out_l·out_k and
    in = in_m·in_n. Each factor is one tensor (`lokr_w1`, `lokr_w2`) or a rank-r product
    (`lokr_w1_a` @ `lokr_w1_b`, `lokr_w2_a` @ `lokr_w2_b`), as peft decides and names them."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        scaling: float,
        rank_dropout: float,
        module_dropout: float,
        rank_dropout_scale: bool,
        decompose_both: bool,
        decompose_factor: int,
    ):
        super().__init__(base_layer, scaling, rank_dropout, module_dropout, rescale_rank_dropout=rank_dropout_scale)
        out_l, out_k = factorization(base_layer.out_features, decompose_factor)
        in_m, in_n = factorization(base_layer.in_features, decompose_factor)
        # peft's rule: a factor becomes a rank-r product only when r is under half its larger side
        # (where the product has fewer parameters); W1, the small one, only with decompose_both.
        self.w1_low_rank = decompose_both and r < max(out_l, in_m) / 2
        self.w2_low_rank = r < max(out_k, in_n) / 2
        if self.w1_low_rank:
            self.lokr_w1_a, self.lokr_w1_b = self._parameter(out_l, r), self._parameter(r, in_m)
        else:
            self.lokr_w1 = self._parameter(out_l, in_m)
        if self.w2_low_rank:
            self.lokr_w2_a, self.lokr_w2_b = self._parameter(out_k, r), self._parameter(r, in_n)
        else:
            self.lokr_w2 = self._parameter(out_k, in_n)
        # peft's init, in peft's order: W1 = 0 (or its first factor 0), so ΔW = 0 at the start,
        # and Kaiming-uniform for the rest.
        with torch.no_grad():
            if self.w1_low_rank:
                nn.init.zeros_(self.lokr_w1_a)
                nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lokr_w1)
            for factor in (self.lokr_w2_a, self.lokr_w2_b) if self.w2_low_rank else (self.lokr_w2,):
                nn.init.kaiming_uniform_(factor, a=math.sqrt(5))

    def update(self) -> torch.Tensor:
        w1 = self.lokr_w1_a @ self.lokr_w1_b if self.w1_low_rank else self.lokr_w1
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.w2_low_rank else self.lokr_w2
        return torch.kron(w1, w2)


def lycoris_peft_config(options: LycorisOptions) -> dict[str, Any]:
    return {
        "r": options.r,
        "alpha": options.alpha,
        "rank_dropout": options.rank_dropout,
        "module_dropout": options.module_dropout,
        "init_weights": True,
        "modules_to_save": None,
    }


def lycoris_options_from_peft(name: str, config: dict[str, Any], source: str, init_weights: tuple) -> dict[str, Any]:
    # init_weights only sets the starting values, which the adapter's tensors replace; conv-only
    # settings do not apply to linear layers.
    reject_peft_settings(config, source, {**PEFT_TARGETING_DEFAULTS, "init_weights": init_weights})
    return {
        "name": name,
        "r": config["r"],
        "alpha": config.get("alpha", 8),
        "rank_dropout": config.get("rank_dropout", 0.0),
        "module_dropout": config.get("module_dropout", 0.0),
        "target": target_from_peft(config, source),
    }


class Loha(LinearAdapterMethod):
    """LoHa: a Hadamard product of two rank-r updates, ΔW = s·(W1a W1b) ⊙ (W2a W2b), beside each frozen linear layer."""

    name = "loha"
    Options = LohaOptions
    peft_type = "LOHA"

    def wrap(self, name: str, base: nn.Linear) -> LohaLinear:
        opts = self.options
        return LohaLinear(base, opts.r, opts.alpha / opts.r, opts.rank_dropout, opts.module_dropout)

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        return lycoris_peft_config(self.options)

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        return lycoris_options_from_peft(cls.name, config, source, init_weights=(True, False, None))


class Lokr(LinearAdapterMethod):
    """LoKr: a Kronecker product of two small (optionally rank-r) factors, ΔW = s·W1 ⊗ W2, beside each frozen linear layer."""

    name = "lokr"
    Options = LokrOptions
    peft_type = "LOKR"

    def wrap(self, name: str, base: nn.Linear) -> LokrLinear:
        opts = self.options
        # s = alpha/r even where no factor is rank r (both full): peft's scaling, unlike LyCORIS's
        # own, which uses s = 1 there.
        return LokrLinear(
            base,
            opts.r,
            opts.alpha / opts.r,
            opts.rank_dropout,
            opts.module_dropout,
            opts.rank_dropout_scale,
            opts.decompose_both,
            opts.decompose_factor,
        )

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        opts = self.options
        return {
            **lycoris_peft_config(opts),
            "decompose_both": opts.decompose_both,
            "decompose_factor": opts.decompose_factor,
            "rank_dropout_scale": opts.rank_dropout_scale,
        }

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        options = lycoris_options_from_peft(cls.name, config, source, init_weights=(True, False, "lycoris", None))
        return {
            **options,
            "decompose_both": bool(config.get("decompose_both")),
            "decompose_factor": config.get("decompose_factor", -1),
            "rank_dropout_scale": bool(config.get("rank_dropout_scale")),
        }
