"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): a learned vector l rescales each targeted linear layer.

- Attention-type targets (keys, values): y = l ⊙ (W x + b), one scale per output.
- Feedforward targets: y = W (l ⊙ x) + b, one scale per input. The paper rescales the FFN's
  hidden activations, which are the input of its down projection.

l starts at ones (the model is unchanged at init) and is stored as peft saves it (`ia3_l`:
(d_out, 1), or (1, d_in) for feedforward targets). Merging is exact: W' = diag(l) W and b' = l ⊙ b,
or W' = W diag(l).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import (
    PEFT_TARGETING_DEFAULTS,
    AdapterLayer,
    LinearAdapterMethod,
    LinearTargetOptions,
    find_target_linears,
    name_matches,
    peft_target_modules,
    reject_peft_settings,
    target_from_peft,
)

# peft's (IA)^3 defaults for Llama-family models: the paper's keys, values and FFN down projection.
PEFT_LLAMA_TARGET = ("k_proj", "v_proj", "down_proj")
PEFT_LLAMA_FEEDFORWARD = ("down_proj",)


class Ia3Options(LinearTargetOptions):
    name: Literal["ia3"] = "ia3"
    target: Literal["all-linear"] | list[str] = Field(default_factory=lambda: list(PEFT_LLAMA_TARGET))
    # Which targets scale their input instead of their output; patterns as in `target`.
    feedforward: list[str] = Field(default_factory=lambda: list(PEFT_LLAMA_FEEDFORWARD))


class Ia3Linear(AdapterLayer):
    """A frozen linear layer whose outputs (or, for a feedforward layer, inputs) are scaled by `ia3_l`."""

    def __init__(self, base_layer: nn.Linear, feedforward: bool):
        super().__init__(base_layer)
        self.feedforward = feedforward
        shape = (1, base_layer.in_features) if feedforward else (base_layer.out_features, 1)
        # fp32 even on a half-precision base: small steps away from 1 would round away in bf16.
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base_layer.weight.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        return (self.base_layer(x) * scale).to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        # ia3_l's shape, (d_out, 1) or (1, d_in), broadcasts over W's rows or columns.
        weight = self.base_weight()
        return (weight * self.ia3_l).to(weight.dtype)

    def merged(self) -> nn.Linear:
        base = super().merged()
        if not self.feedforward and base.bias is not None:  # the bias is part of the scaled output
            with torch.no_grad():
                base.bias.copy_(base.bias * self.ia3_l.flatten())
        return base


class Ia3(LinearAdapterMethod):
    """(IA)^3: learned vectors rescale keys, values and feedforward activations (ones at init)."""

    name = "ia3"
    Options = Ia3Options
    shards = True
    peft_type = "IA3"

    def attach(self, model: nn.Module) -> None:
        feedforward = self.options.feedforward
        # A feedforward pattern given explicitly must select a target, or a typo would silently
        # turn an input scaling into an output scaling (the default may match nothing).
        if "feedforward" in self.options.model_fields_set:
            targeted = find_target_linears(model, self.options)
            unmatched = [p for p in feedforward if not any(name_matches(name, [p]) for name in targeted)]
            if unmatched:
                leaves = sorted({name.rsplit(".", 1)[-1] for name in targeted})
                raise TunelabError(f"method.feedforward: {unmatched} match none of the targeted layers ({leaves})")
        super().attach(model)

    def wrap(self, name: str, base: nn.Linear) -> Ia3Linear:
        return Ia3Linear(base, feedforward=name_matches(name, self.options.feedforward))

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        return {"fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}

    def peft_export(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        config, tensors = super().peft_export(model)
        layers = self.adapter_layers(model)
        # Every linear layer as peft sees the model (an adapter layer's only linear is its base_layer).
        linears = [name.removesuffix(".base_layer") for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        # peft requires feedforward_modules ⊆ target_modules: name the feedforward and the other
        # targets separately, so that no entry of target_modules selects both kinds.
        feedforward = peft_target_modules(linears, [n for n, layer in layers.items() if layer.feedforward])
        others = peft_target_modules(linears, [n for n, layer in layers.items() if not layer.feedforward])
        config["target_modules"] = sorted(feedforward + others)
        config["feedforward_modules"] = feedforward
        return config, tensors

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        reject_peft_settings(config, source, {**PEFT_TARGETING_DEFAULTS, "fan_in_fan_out": (False, None)})
        options = {"name": cls.name, "target": target_from_peft(config, source)}
        feedforward = config.get("feedforward_modules")
        if feedforward is not None:  # None: peft's per-architecture default, which is ours for Llama
            options["feedforward"] = [feedforward] if isinstance(feedforward, str) else sorted(feedforward)
        return options
