"""VeRA (Kopiczko et al. 2024, "Vector-based Random Matrix Adaptation"): every adapted linear layer
shares one pair of frozen random matrices A (r × d_in) and B (d_out × r) and trains only two
vectors, y = W x + Λ_b B Λ_d A x with Λ = diag(λ). A trained layer costs r + d_out numbers.

As peft builds it:
- A and B are sized for the largest input and output among the adapted layers, and each layer uses
  their top-left slice (A[:, :d_in], B[:d_out, :]).
- They are drawn once from a CPU generator seeded with `projection_prng_key`, Kaiming-uniform with
  gain √2 over their fan-in (A first, then B): the same key gives peft's matrices bit for bit.
- λ_d starts at `d_initial`, λ_b at zeros, so the wrapped layer starts equal to W.

Tensor names are peft's: `vera_lambda_d` (r), `vera_lambda_b` (d_out) on each layer, and the shared
`vera_A`, `vera_B`, which the adapter saves (peft's `save_projection`: a reload does not depend on
the generator of the machine).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import (
    PEFT_PREFIX,
    PEFT_TARGETING_DEFAULTS,
    AdapterLayer,
    LinearAdapterMethod,
    PeftDefaultTargetOptions,
    find_target_linears,
    reject_peft_settings,
    target_from_peft,
)

# The shared projections: their names in tunelab's state, and peft's adapter saves them at model
# level, as `base_model.vera_A` (not under `base_model.model.`, where the layers' tensors are).
PROJECTIONS = ("vera_A", "vera_B")
PEFT_PROJECTION_PREFIX = "base_model."


class VeraOptions(PeftDefaultTargetOptions):
    name: Literal["vera"] = "vera"
    r: int = Field(default=256, ge=1)
    d_initial: float = 0.1
    projection_prng_key: int = 0
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−b, b) with b = √3 · √2/√fan_in, fan_in = shape[1]: peft's VeRA init, drawn from `generator`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    # On the CPU whatever the model's device (or a default-device context): the draws are the generator's.
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen A (r × max d_in) and B (max d_out × r) that every adapted layer shares.

    One module held by every layer (not a tensor copied into each), so moving the model moves a
    single pair. The buffers are not part of the model's own state_dict: the method saves them.
    """

    def __init__(self, r: int, max_in: int, max_out: int, key: int, device: torch.device):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(key)
        vera_a = kaiming_uniform((r, max_in), generator)
        vera_b = kaiming_uniform((max_out, r), generator)
        self.register_buffer("vera_A", vera_a.to(device), persistent=False)
        self.register_buffer("vera_B", vera_b.to(device), persistent=False)


class VeraLinear(AdapterLayer):
    """y = W x + λ_b ⊙ (B_s (λ_d ⊙ (A_s dropout(x)))), A_s and B_s the slices of the shared projections."""

    def __init__(self, base_layer: nn.Linear, projections: VeraProjections, d_initial: float, dropout: float):
        super().__init__(base_layer)
        self.vera_projections = projections
        r = projections.vera_A.shape[0]
        # fp32 even on a half-precision base: small steps of the vectors would round away in bf16.
        device = base_layer.weight.device
        self.vera_lambda_d = nn.Parameter(torch.full((r,), d_initial, device=device, dtype=torch.float32))
        self.vera_lambda_b = nn.Parameter(torch.zeros(base_layer.out_features, device=device, dtype=torch.float32))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.vera_projections.vera_A[:, : self.in_features],
            self.vera_projections.vera_B[: self.out_features, :],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._slices()
        y = self.base_layer(x)
        hidden = F.linear(self.vera_dropout(x).to(a.dtype), a) * self.vera_lambda_d
        update = F.linear(hidden, b) * self.vera_lambda_b
        # Sum in fp32, then back to the base's dtype (as peft does).
        return (y + update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._slices()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)


class Vera(LinearAdapterMethod):
    """VeRA: frozen shared random projections, two trainable scaling vectors per linear layer."""

    name = "vera"
    Options = VeraOptions
    peft_type = "VERA"

    def attach(self, model: nn.Module) -> None:
        opts = self.options
        targets = [model.get_submodule(name) for name in find_target_linears(model, opts)]
        if not targets:
            raise TunelabError("method.target: this model has no linear layer for VeRA to adapt")
        self._projections = VeraProjections(
            opts.r,
            max(t.in_features for t in targets),
            max(t.out_features for t in targets),
            opts.projection_prng_key,
            targets[0].weight.device,
        )
        super().attach(model)

    def wrap(self, name: str, base: nn.Linear) -> VeraLinear:
        return VeraLinear(base, self._projections, self.options.d_initial, self.options.dropout)

    def projections(self, model: nn.Module) -> VeraProjections:
        layers = self.adapter_layers(model)
        if not layers:
            raise TunelabError("method 'vera' is not attached to this model")
        return next(iter(layers.values())).vera_projections

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained vectors, plus the shared projections (so a reload needs no generator)."""
        projections = self.projections(model)
        return {**super().state_dict(model), **{key: getattr(projections, key) for key in PROJECTIONS}}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        missing = [key for key in PROJECTIONS if key not in state]
        if missing:
            raise TunelabError(f"{source}: no VeRA projection {', '.join(missing)} among the weights")
        projections = self.projections(model)
        for key in PROJECTIONS:
            expected, saved = getattr(projections, key), state[key]
            if saved.shape != expected.shape:
                raise TunelabError(
                    f"{source}: {key} has shape {tuple(saved.shape)}, this model's adapted layers need {tuple(expected.shape)} (r × largest input, largest output × r)"
                )
        super().load_state_dict(model, {k: v for k, v in state.items() if k not in PROJECTIONS}, source)
        with torch.no_grad():
            for key in PROJECTIONS:
                getattr(projections, key).copy_(state[key])

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        opts = self.options
        return {
            "r": opts.r,
            "projection_prng_key": opts.projection_prng_key,
            "save_projection": True,
            "vera_dropout": opts.dropout,
            "d_initial": opts.d_initial,
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
            "modules_to_save": None,
        }

    def peft_export(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        config, tensors = super().peft_export(model)
        for key in PROJECTIONS:
            tensors[PEFT_PROJECTION_PREFIX + key] = tensors.pop(PEFT_PREFIX + key)
        return config, tensors

    def peft_import(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        """An adapter saved without its projections (peft's save_projection=false) keeps the ones
        drawn from projection_prng_key at attach, which is what peft itself does."""
        saved = {PEFT_PROJECTION_PREFIX + key: key for key in PROJECTIONS}
        state = {saved.get(name, name.removeprefix(PEFT_PREFIX)): t for name, t in tensors.items()}
        projections = self.projections(model)
        for key in PROJECTIONS:
            state.setdefault(key, getattr(projections, key))
        self.load_state_dict(model, state, source)

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        reject_peft_settings(config, source, {**PEFT_TARGETING_DEFAULTS, "bias": ("none", None), "fan_in_fan_out": (False, None)})
        return {
            "name": cls.name,
            "r": config.get("r", 256),
            "d_initial": config.get("d_initial", 0.1),
            "projection_prng_key": config.get("projection_prng_key", 0),
            "dropout": config.get("vera_dropout", 0.0),
            "target": target_from_peft(config, source),
        }
