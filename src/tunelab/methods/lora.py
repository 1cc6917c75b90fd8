"""LoRA (Hu et al. 2021): a frozen linear layer W plus a trainable low-rank update (alpha/r)·B·A."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.methods import register
from tunelab.methods.base import (
    Method,
    MethodOptions,
    find_target_linears,
    peft_target_modules,
    replace_module,
)


class LoraOptions(MethodOptions):
    name: Literal["lora"] = "lora"
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target: Literal["all-linear"] | list[str] = "all-linear"


class LoraLinear(nn.Module):
    """y = W x + (alpha/r) · B A dropout(x), with W frozen. Module names match peft's
    (`base_layer`, `lora_A`, `lora_B`) so state dicts convert by a prefix."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        # The adapter trains in fp32 even on a half-precision base: tiny updates vanish in bf16.
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.compute_weight: torch.Tensor | None = None  # not a parameter: never saved
        # peft's default init: A Kaiming-uniform, B zero, so the wrapped layer starts equal to W.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:  # some model code inspects `proj.weight` (dtype, device)
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # In training, a copy of the frozen weight in a faster matmul dtype, if one was made
        # (Lora.store_frozen_weights); evaluation always uses the weight itself.
        weight = self.compute_weight if self.training and self.compute_weight is not None else base.weight
        return LoraLinearFunction.apply(
            x, self.lora_dropout(x), weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling
        )

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        base = self.base_layer
        with torch.no_grad():
            base.weight += self.delta_weight().to(base.weight.dtype)
        return base


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·((x' Aᵀ) Bᵀ), where x' is x after dropout, written so no output-sized
    temporary exists: the scale falls on the rank-r product and the update accumulates into the
    base output in place (one BLAS call). Backward accumulates the two input gradients the same
    way. This is most of a LoRA step on CPU, where every extra pass over an activation costs.
    W may be a lower-precision copy of the frozen weight (see `Lora.store_frozen_weights`): its
    two matmuls then run in W's dtype, everything else in x's.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling):
        shape = x.shape
        x2, x_lora2 = x.reshape(-1, shape[-1]), x_lora.reshape(-1, shape[-1]).to(lora_a.dtype)
        a = (x_lora2 @ lora_a.t()).mul_(scaling)  # (tokens, r)
        y = torch.nn.functional.linear(x2.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).to(x.dtype)
        if y.dtype == lora_b.dtype:
            y.addmm_(a, lora_b.t())
        else:  # a half-precision base with its fp32 adapter
            y += (a @ lora_b.t()).to(y.dtype)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[2] else None, x_lora2, weight, lora_a, lora_b, a)
        ctx.scaling, ctx.shared_input, ctx.has_bias = scaling, x_lora is x, bias is not None
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, x_lora2, weight, lora_a, lora_b, a = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_lora = g.to(lora_b.dtype)
        grad_a_out = (g_lora @ lora_b).mul_(ctx.scaling)  # gradient at the rank-r product, (tokens, r)
        grad_lora_a = grad_a_out.t() @ x_lora2
        grad_lora_b = g_lora.t() @ a
        grad_x = grad_x_lora = grad_weight = grad_bias = None
        needs = ctx.needs_input_grad
        if needs[0] or needs[1]:
            grad_x = (g.to(weight.dtype) @ weight).to(g.dtype)
            grad_a_out_x, lora_a_x = grad_a_out.to(grad_x.dtype), lora_a.to(grad_x.dtype)
            if ctx.shared_input:  # no dropout: both paths flow into x, summed by the same BLAS call
                grad_x.addmm_(grad_a_out_x, lora_a_x)
            else:
                grad_x_lora = (grad_a_out_x @ lora_a_x).reshape(*grad_out.shape[:-1], -1)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], -1)
        if needs[2]:
            grad_weight = g.t() @ x2
        if needs[3] and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_x_lora, grad_weight, grad_bias, grad_lora_a, grad_lora_b, None


@register
class Lora(Method):
    name = "lora"
    Options = LoraOptions

    def attach(self, model: nn.Module) -> None:
        opts = self.options
        model.requires_grad_(False)
        for module_name in find_target_linears(model, opts.target):
            base = model.get_submodule(module_name)
            replace_module(model, module_name, LoraLinear(base, opts.r, opts.alpha, opts.dropout))

    def store_frozen_weights(self, model: nn.Module, dtype: torch.dtype) -> bool:
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.compute_weight = module.base_layer.weight.detach().to(dtype)
        return True

    def merge(self, model: nn.Module) -> None:
        for module_name, module in list(model.named_modules()):
            if isinstance(module, LoraLinear):
                replace_module(model, module_name, module.merged())

    def peft_export(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        opts = self.options
        targeted = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
        # peft names the layers of the unwrapped model: a wrapped layer's own children are not targets.
        internal = {f"{t}.{child}" for t in targeted for child in ("base_layer", "lora_A", "lora_B")}
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in internal]
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": opts.r,
            "lora_alpha": opts.alpha,
            "lora_dropout": opts.dropout,
            "target_modules": peft_target_modules(linears + targeted, targeted),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "inference_mode": True,
        }
        tensors = {f"base_model.model.{n}": t.contiguous() for n, t in self.state_dict(model).items()}
        return config, tensors

