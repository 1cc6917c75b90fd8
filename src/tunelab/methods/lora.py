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
        # peft's default init: A Kaiming-uniform, B zero, so the wrapped layer starts equal to W.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:  # some model code inspects `proj.weight` (dtype, device)
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return self.base_layer(x) + (update * self.scaling).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        base = self.base_layer
        with torch.no_grad():
            base.weight += self.delta_weight().to(base.weight.dtype)
        return base


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

