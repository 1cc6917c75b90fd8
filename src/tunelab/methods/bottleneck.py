"""Bottleneck adapters, the series and parallel members of LLM-Adapters (Hu et al. 2023, "LLM-Adapters:
An Adapter Family for Parameter-Efficient Fine-Tuning of Large Language Models").

An adapter is a small two-layer network of bottleneck width r on the model's hidden states (d wide):

    f(z) = s · W_up act(W_down dropout(z) + b_down) + b_up,   W_down: r × d,  W_up: d × r.

It is attached to sublayers of each decoder layer (`self_attn`, `mlp`), whose output h (for the
input x) it changes before the residual add:

- `series_adapter` (Houlsby et al. 2019): h ← h + f(h), the adapter after the sublayer.
- `parallel_adapter` (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
  Learning"): h ← h + f(x), the adapter beside the sublayer, reading the sublayer's input.

Defaults follow the papers: both adapt the MLP only (LLM-Adapters found series adapters best after
the MLP and parallel adapters best beside it), r = 256 (LLM-Adapters' bottleneck_size), s = 1 for
series adapters (Houlsby's have no scale) and s = 4 for parallel ones (He et al.'s scaled parallel
adapter on the FFN). Initialization is He et al.'s: W_down Kaiming-uniform (nn.Linear's), b_down,
W_up and b_up zero, so the model starts unchanged.

Tensors: `<sublayer>.adapter.down.{weight,bias}` and `<sublayer>.adapter.up.{weight,bias}`, fp32,
registered inside the sublayer module; a forward hook on the sublayer applies them (for
`self_attn`, which returns (output, attention weights), to the output only). A trained adapter costs
2·r·d + r + d numbers per adapted sublayer. The adapters are nonlinear in the hidden states, so
they cannot be merged into the weights.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import Method, MethodOptions, selected_decoder_layers

# A placement name → the decoder layer's sublayer it adapts.
SUBLAYERS = {"attention": "self_attn", "mlp": "mlp"}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckOptions(MethodOptions):
    """Options series and parallel adapters share."""

    bottleneck: int = Field(default=256, ge=1, description="r, the adapter's hidden width")
    placement: list[Literal["attention", "mlp"]] = Field(default_factory=lambda: ["mlp"], min_length=1)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    scaling: float = Field(gt=0, description="s, the factor on the adapter's output")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Indices of the decoder layers to adapt; None: all of them.
    layers: list[int] | None = None

    @field_validator("placement")
    @classmethod
    def _placement(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each sublayer at most once, got {value}")
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value or min(value) < 0 or len(set(value)) != len(value):
            raise ValueError(f"a non-empty list of distinct decoder layer indices (0, 1, ...), got {value}")
        return value


class SeriesAdapterOptions(BottleneckOptions):
    name: Literal["series_adapter"] = "series_adapter"
    scaling: float = Field(default=1.0, gt=0)


class ParallelAdapterOptions(BottleneckOptions):
    name: Literal["parallel_adapter"] = "parallel_adapter"
    scaling: float = Field(default=4.0, gt=0)


class BottleneckAdapter(nn.Module):
    """f(z) = s · W_up act(W_down dropout(z) + b_down) + b_up, and the hook that adds it to a sublayer's output."""

    def __init__(self, width: int, options: BottleneckOptions, series: bool, device: torch.device):
        super().__init__()
        # Drawn on the CPU whatever the model's device (the same init on every machine), in fp32
        # even on a half-precision base: small updates would round away in bf16.
        self.down = nn.Linear(width, options.bottleneck, device="cpu", dtype=torch.float32)
        self.up = nn.Linear(options.bottleneck, width, device="cpu", dtype=torch.float32)
        with torch.no_grad():  # W_down keeps nn.Linear's Kaiming-uniform draw (He et al.)
            for tensor in (self.down.bias, self.up.weight, self.up.bias):
                nn.init.zeros_(tensor)
        self.to(device)
        self.activation = ACTIVATIONS[options.activation]
        self.scaling = options.scaling
        self.dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()
        self.series = series

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(self.down(self.dropout(z.to(self.down.weight.dtype))))
        return self.scaling * F.linear(hidden, self.up.weight) + self.up.bias

    def adapt_output(self, sublayer: nn.Module, args: tuple, kwargs: dict, output):
        """Forward hook: the sublayer's output h becomes h + f(h) (series) or h + f(x) (parallel)."""
        attention = isinstance(output, tuple)  # self_attn returns (output, attention weights)
        h = output[0] if attention else output
        x = args[0] if args else kwargs["hidden_states"]
        adapted = (h.to(torch.float32) + self(h if self.series else x)).to(h.dtype)  # sum in fp32
        return (adapted, *output[1:]) if attention else adapted


class BottleneckMethod(Method):
    """Adapters on the chosen sublayers of the chosen decoder layers, applied by forward hooks."""

    series: ClassVar[bool]

    def attach(self, model: nn.Module) -> None:
        opts = self.options
        model.requires_grad_(False)
        width = model.config.hidden_size
        layers = selected_decoder_layers(model, self.name, opts.layers)
        indices = range(len(layers)) if opts.layers is None else opts.layers
        for index, layer in zip(indices, layers):
            for placement in opts.placement:
                sublayer = getattr(layer, SUBLAYERS[placement], None)
                if sublayer is None:
                    raise TunelabError(f"method.placement: decoder layer {index} has no `{SUBLAYERS[placement]}` sublayer for '{placement}'")
                device = next(sublayer.parameters()).device
                # A submodule of the sublayer: its parameters are the model's, named `<sublayer>.adapter.*`.
                sublayer.adapter = BottleneckAdapter(width, opts, self.series, device)
                sublayer.register_forward_hook(sublayer.adapter.adapt_output, with_kwargs=True)


class SeriesAdapter(BottleneckMethod):
    """Series adapters (Houlsby): a bottleneck MLP after each adapted sublayer, h + f(h)."""

    name = "series_adapter"
    Options = SeriesAdapterOptions
    series = True


class ParallelAdapter(BottleneckMethod):
    """Parallel adapters (He et al.): a scaled bottleneck MLP beside each adapted sublayer, h + f(x)."""

    name = "parallel_adapter"
    Options = ParallelAdapterOptions
    series = False
