"""S2FT (Yang et al. 2024, "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by
Structured Sparsity"): train a few attention heads and FFN channels per layer, as dense sub-blocks.

Each layer's attention output projection W_O (d × H·d_head) and FFN down projection W_down
(d × d_ff) get a random, seeded selection of heads (of W_O's input) and channels (of W_down's
input); their columns C are the only trained weights:

    y = W x + b + ΔW_sub x[..., C]          W' = W + ΔW_sub scattered into the columns C

- `s2ft_columns` (a buffer, saved with the weights so that a reload is exact): C, the input
  columns of the selected heads (head h owns columns h·d_head … (h+1)·d_head − 1) or channels.
- `s2ft_delta` (a parameter, d_out × |C|, zeros at init): ΔW_sub.

The paper's default (its training scripts: o_ratio and d_ratio set, q/v/u ratios 0) trains only
these output-side sub-blocks: no q/k/v rows and no up/gate rows, so this method does the same. The
paper samples its heads (and channels) among all layers at once; here each layer gets the same
number (`heads_per_layer` or ⌈head_fraction · H⌉, `channels_per_layer` or ⌈channel_fraction · d_ff⌉),
which makes the count a formula: layers · d · (heads · d_head + channels).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import AdapterLayer, LinearAdapterMethod, MethodOptions, name_matches, replace_module

# Llama-family names of the two projections S2FT trains (the outputs of the coupled structures).
ATTENTION_OUTPUT, FFN_OUTPUT = "o_proj", "down_proj"


class S2ftOptions(MethodOptions):
    name: Literal["s2ft"] = "s2ft"
    # Heads per layer whose W_O columns train: a count, or else a fraction of the heads (rounded up).
    heads_per_layer: int | None = Field(default=None, ge=0)
    head_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    # FFN channels per layer whose W_down columns train: a count, or else a fraction (rounded up).
    channels_per_layer: int | None = Field(default=None, ge=0)
    channel_fraction: float = Field(default=0.02, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_budget_each(self) -> S2ftOptions:
        for count, fraction in (("heads_per_layer", "head_fraction"), ("channels_per_layer", "channel_fraction")):
            if getattr(self, count) is not None and fraction in self.model_fields_set:
                raise ValueError(f"set {count} or {fraction}, not both")
        heads = self.heads_per_layer if self.heads_per_layer is not None else self.head_fraction
        channels = self.channels_per_layer if self.channels_per_layer is not None else self.channel_fraction
        if heads == 0 and channels == 0:
            raise ValueError("S2FT selects no head and no channel: nothing would train")
        return self


class S2ftLinear(AdapterLayer):
    """y = W x + b + ΔW_sub x[..., C], with W frozen; C (`s2ft_columns`) are the trained columns."""

    def __init__(self, base_layer: nn.Linear, columns: torch.Tensor):
        super().__init__(base_layer)
        device = base_layer.weight.device
        self.register_buffer("s2ft_columns", columns.to(device))
        # fp32 even on a half-precision base: tiny updates vanish in bf16.
        self.s2ft_delta = nn.Parameter(torch.zeros(base_layer.out_features, len(columns), device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        selected = x.index_select(-1, self.s2ft_columns).to(self.s2ft_delta.dtype)
        return y + F.linear(selected, self.s2ft_delta).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        dense = self.s2ft_delta.new_zeros(self.out_features, self.in_features)
        return dense.index_copy(1, self.s2ft_columns, self.s2ft_delta)


def selected_columns(units: int, chosen: int, block: int) -> torch.Tensor:
    """The input columns of `chosen` of `units` blocks of `block` columns, drawn at random (sorted)."""
    picked = torch.randperm(units)[:chosen].sort().values
    return (picked[:, None] * block + torch.arange(block)).flatten()


class BufferedAdapterMethod(LinearAdapterMethod):
    """A linear-layer method whose adapter layers hold buffers that are part of the trained
    weights (which columns or entries train): the state dict carries them next to the parameters,
    as `<layer>.<buffer>`."""

    def layer_buffers(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{name}.{buffer}": tensor for name, layer in self.adapter_layers(model).items() for buffer, tensor in layer.named_buffers(recurse=False)}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {**super().state_dict(model), **self.layer_buffers(model)}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        buffers = self.layer_buffers(model)
        super().load_state_dict(model, {k: v for k, v in state.items() if k not in buffers}, source)
        for key, buffer in buffers.items():
            if key not in state:
                raise TunelabError(f"{source}: no '{key}' (which weights train) among the weights")
            if state[key].shape != buffer.shape:
                raise TunelabError(f"{source}: '{key}' has shape {tuple(state[key].shape)}, the model expects {tuple(buffer.shape)}")
            buffer.copy_(state[key])


class S2ft(BufferedAdapterMethod):
    """S2FT: trains the output-projection columns of a few random heads and FFN channels per layer."""

    name = "s2ft"
    Options = S2ftOptions

    def attach(self, model: nn.Module) -> None:
        self.num_heads = model.config.num_attention_heads
        model.requires_grad_(False)
        for name in self._targets(model):
            replace_module(model, name, self.wrap(name, model.get_submodule(name)))

    def _targets(self, model: nn.Module) -> list[str]:
        """The W_O and W_down of every layer (those with a nonzero budget)."""
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        found = {leaf: [n for n in linears if name_matches(n, [leaf])] for leaf in (ATTENTION_OUTPUT, FFN_OUTPUT)}
        missing = [leaf for leaf, names in found.items() if not names]
        if missing:
            raise TunelabError(f"method.name: s2ft needs the projections {missing}, which this model does not have")
        return [n for names in found.values() for n in names if self._budget(n, linears[n])[1] > 0]

    def _budget(self, name: str, base: nn.Linear) -> tuple[int, int, int]:
        """(blocks of the layer's input, blocks chosen, columns per block) for a W_O or W_down."""
        opts = self.options
        if name_matches(name, [ATTENTION_OUTPUT]):
            units, count, fraction, key = self.num_heads, opts.heads_per_layer, opts.head_fraction, "heads_per_layer"
        else:
            units, count, fraction, key = base.in_features, opts.channels_per_layer, opts.channel_fraction, "channels_per_layer"
        chosen = count if count is not None else math.ceil(fraction * units)
        if chosen > units:
            raise TunelabError(f"method.{key}: {chosen} exceeds the {units} of this model's layers")
        return units, chosen, base.in_features // units

    def wrap(self, name: str, base: nn.Linear) -> S2ftLinear:
        return S2ftLinear(base, selected_columns(*self._budget(name, base)))
