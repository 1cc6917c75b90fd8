"""LoRA (Hu et al. 2021) and its variants: a frozen linear layer W plus a trainable low-rank update
s·B·A, with s = alpha/r.

Variants, as options of `lora`:
- `rslora`: s = alpha/sqrt(r) (Kalajdzievski 2023), so the update's scale does not shrink with r.
- `dora`: W' = m ⊙ (W + sBA) / ||W + sBA||, a trainable per-output magnitude m times a direction
  (DoRA, Liu et al. 2024); the norm is treated as a constant in backward, as in the paper (§4.3).
- `init`: `kaiming` (peft's default: A Kaiming-uniform, B = 0), `gaussian` (A ~ N(0, 1/r)),
  `pissa` (A, B from the top-r singular triplets of W; W keeps the residual, Meng et al. 2024),
  `olora` (A, B from the QR decomposition of W, Büyükakyüz 2024).
- `lora_plus_ratio`: B learns at ratio × A's learning rate (LoRA+, Hayou et al. 2024).
"""

from __future__ import annotations

import math
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
    reject_peft_settings,
    target_from_peft,
)
from tunelab.models.quantize import QuantizedLinear, dequantize, frozen_linear, is_quantized, quantize_like


class LoraOptions(LinearTargetOptions):
    name: Literal["lora"] = "lora"
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    rslora: bool = False
    dora: bool = False
    init: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming"
    lora_plus_ratio: float | None = Field(default=None, gt=0)


class LoraLinear(AdapterLayer):
    """y = W x + s · B A dropout(x), with W frozen. Tensor names match peft's (`lora_A`, `lora_B`).

    With `init` pissa/olora, W holds the residual W₀ − s·B₀A₀ and the initial B₀, A₀ are kept
    (`lora_B_init`, `lora_A_init`): the update relative to the original model is s(BA − B₀A₀).
    """

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float, init: str):
        super().__init__(base_layer)
        # The adapter trains in fp32 even on a half-precision base: tiny updates vanish in bf16.
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.compute_weight: torch.Tensor | None = None  # not a parameter: never saved
        self._initialize(init)

    def _initialize(self, init: str) -> None:
        r = self.lora_A.out_features
        with torch.no_grad():
            if init in ("kaiming", "gaussian"):
                if init == "kaiming":
                    nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(self.lora_A.weight, std=1 / r)
                nn.init.zeros_(self.lora_B.weight)  # the wrapped layer starts equal to W
                return
            weight = self.base_weight(torch.float32)
            if init == "pissa":  # W = U S Vᵀ: B = U_r √S_r, A = √S_r V_rᵀ, both divided by √s
                u, singular, vh = torch.linalg.svd(weight, full_matrices=False)
                root = torch.sqrt(singular[:r] / self.scaling)
                a, b = root[:, None] * vh[:r], u[:, :r] * root
            else:  # olora, W = Q R: B = Q_r, A = R_r
                q, rr = torch.linalg.qr(weight)
                a, b = rr[:r], q[:, :r]
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
        self.register_buffer("lora_A_init", a.clone())
        self.register_buffer("lora_B_init", b.clone())
        self._move_init_out_of_base(+1)

    def _move_init_out_of_base(self, sign: int) -> None:
        """W -= sign · s·B₀A₀: +1 makes W the residual, −1 restores the original weight (a quantized
        W: dequantized, moved, quantized again, as peft does)."""
        with torch.no_grad():
            base = self.base_layer
            weight = dequantize(base.weight)
            moved = weight - (sign * self.scaling * (self.lora_B_init @ self.lora_A_init)).to(weight.dtype)
            if is_quantized(base.weight):
                base.weight = nn.Parameter(quantize_like(base.weight, moved), requires_grad=False)
            else:
                base.weight.copy_(moved)

    def set_initial_factors(self, a_init: torch.Tensor, b_init: torch.Tensor) -> None:
        """Take saved initial factors (a run reloaded elsewhere may compute others): re-residualize W.
        Factors equal to the ones computed leave W untouched (exactly: no round trip)."""
        a_init, b_init = a_init.to(self.lora_A_init), b_init.to(self.lora_B_init)
        if torch.equal(a_init, self.lora_A_init) and torch.equal(b_init, self.lora_B_init):
            return
        self._move_init_out_of_base(-1)
        self.lora_A_init.copy_(a_init)
        self.lora_B_init.copy_(b_init)
        self._move_init_out_of_base(+1)

    def frozen_weight(self) -> tuple[torch.Tensor, torch.dtype]:
        """The frozen weight and the dtype its matmuls run in. In training, a copy in a faster
        matmul dtype if one was made (Lora.store_frozen_weights), or a quantized weight's training
        dtype; evaluation always computes on the weight itself."""
        base = self.base_layer
        if isinstance(base, QuantizedLinear):
            return base.weight, base.matmul_dtype
        weight = self.compute_weight if self.training and self.compute_weight is not None else base.weight
        return weight, weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, dtype = self.frozen_weight()
        return LoraLinearFunction.apply(x, self.lora_dropout(x), weight, dtype, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def frozen_layer(self) -> nn.Module:
        return FrozenBase(self)


class FrozenBase(nn.Module):
    """A LoRA layer's base computed exactly as the layer computes it (on the training copy of the
    frozen weight in training mode): with B = 0 the adapter-off model then equals the policy."""

    def __init__(self, layer: LoraLinear):
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: the model's tree stays as it was

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, dtype = self.layer.frozen_weight()
        return frozen_linear(x, weight, self.layer.base_layer.bias, dtype)


class DoraLinear(LoraLinear):
    """DoRA: y = (m/n) ⊙ (W x + s·B A x) + b with n = ||W + sBA|| per output row (detached).
    With dropout, as in peft: y = W x + b + (m/n − 1) ⊙ W x' + (m/n) ⊙ s·B A x'."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float, init: str):
        super().__init__(base_layer, r, scaling, dropout, init)
        with torch.no_grad():
            norm = self._directional_weight().norm(dim=1)
        self.lora_magnitude_vector = nn.Parameter(norm)

    def _directional_weight(self) -> torch.Tensor:
        return self.base_weight(torch.float32) + self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        x_lora = self.lora_dropout(x).to(torch.float32)
        norm = self._directional_weight().detach().norm(dim=1)
        scale = self.lora_magnitude_vector / norm
        # A quantized base computes in its training dtype, as the QuantizedLinear (frozen_layer) does.
        dtype = base.matmul_dtype if isinstance(base, QuantizedLinear) else None
        base_out = frozen_linear(x, base.weight, dtype=dtype)
        base_out_lora = base_out if x_lora is x else frozen_linear(x_lora.to(x.dtype), base.weight, dtype=dtype)
        lora_out = self.lora_B(self.lora_A(x_lora)) * self.scaling
        y = base_out + ((scale - 1) * base_out_lora.float() + scale * lora_out).to(x.dtype)
        return y if base.bias is None else y + base.bias

    def frozen_layer(self) -> nn.Module:
        return self.base_layer  # DoRA computes on the weight itself

    def merged_weight(self) -> torch.Tensor:
        direction = self._directional_weight()
        scale = self.lora_magnitude_vector / direction.norm(dim=1)
        return (scale[:, None] * direction).to(self.base_layer.weight.dtype)


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·((x' Aᵀ) Bᵀ), where x' is x after dropout, written so no output-sized
    temporary exists: the scale falls on the rank-r product and the update accumulates into the
    base output in place (one BLAS call). Backward accumulates the two input gradients the same
    way. This is most of a LoRA step on CPU, where every extra pass over an activation costs.
    W may be a lower-precision copy of the frozen weight (see `Lora.store_frozen_weights`) or a
    quantized one (models/quantize.py, dequantized here in forward and again in backward): its two
    matmuls run in `dtype`, everything else in x's.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, dtype, bias, lora_a, lora_b, scaling):
        shape = x.shape
        x2, x_lora2 = x.reshape(-1, shape[-1]), x_lora.reshape(-1, shape[-1]).to(lora_a.dtype)
        a = (x_lora2 @ lora_a.t()).mul_(scaling)  # (tokens, r)
        y = torch.nn.functional.linear(x2.to(dtype), dequantize(weight, dtype), None if bias is None else bias.to(dtype)).to(x.dtype)
        if y.dtype == lora_b.dtype:
            y.addmm_(a, lora_b.t())
        else:  # a half-precision base with its fp32 adapter
            y += (a @ lora_b.t()).to(y.dtype)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[2] else None, x_lora2, weight, lora_a, lora_b, a)
        ctx.scaling, ctx.shared_input, ctx.has_bias, ctx.dtype = scaling, x_lora is x, bias is not None, dtype
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
            grad_x = (g.to(ctx.dtype) @ dequantize(weight, ctx.dtype)).to(g.dtype)
            grad_a_out_x, lora_a_x = grad_a_out.to(grad_x.dtype), lora_a.to(grad_x.dtype)
            if ctx.shared_input:  # no dropout: both paths flow into x, summed by the same BLAS call
                grad_x.addmm_(grad_a_out_x, lora_a_x)
            else:
                grad_x_lora = (grad_a_out_x @ lora_a_x).reshape(*grad_out.shape[:-1], -1)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], -1)
        if needs[2]:
            grad_weight = g.t() @ x2
        if needs[4] and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_x_lora, grad_weight, None, grad_bias, grad_lora_a, grad_lora_b, None


class Lora(LinearAdapterMethod):
    """LoRA: a trainable low-rank update s·BA beside each frozen linear layer (rsLoRA, DoRA, PiSSA, OLoRA, LoRA+ as options)."""

    name = "lora"
    Options = LoraOptions
    shards = True
    peft_type = "LORA"

    @property
    def adapter_off_is_initial(self) -> bool:
        return self.options.init not in ("pissa", "olora")  # those leave W as the residual W₀ − s·B₀A₀

    @property
    def scaling(self) -> float:
        opts = self.options
        return opts.alpha / (math.sqrt(opts.r) if opts.rslora else opts.r)

    def wrap(self, name: str, base: nn.Linear) -> LoraLinear:
        opts = self.options
        layer = DoraLinear if opts.dora else LoraLinear
        return layer(base, opts.r, self.scaling, opts.dropout, opts.init)

    def lora_factors(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        opts = self.options
        if opts.dora or opts.init in ("pissa", "olora"):
            variant = "DoRA" if opts.dora else f"init: {opts.init} (its update is relative to a residual base)"
            raise TunelabError(f"method 'lora' with {variant} is not a plain LoRA update, the only adapter llama.cpp applies; export the merged model instead: --format gguf")
        return {name: (layer.lora_A.weight, layer.lora_B.weight, layer.scaling) for name, layer in self.adapter_layers(model).items()}

    def store_frozen_weights(self, model: nn.Module, dtype: torch.dtype) -> bool:
        # A quantized base computes in `dtype` by itself (models/quantize.set_compute_dtype): no copy.
        layers = [m for m in self.adapter_layers(model).values() if type(m) is LoraLinear and not isinstance(m.base_layer, QuantizedLinear)]
        for layer in layers:
            layer.compute_weight = layer.base_layer.weight.detach().to(dtype)
        return bool(layers)

    def param_groups(self, model: nn.Module) -> list[dict]:
        ratio = self.options.lora_plus_ratio
        if ratio is None:
            return super().param_groups(model)
        params = self.trainable_parameters(model)
        b = [p for name, p in params.items() if ".lora_B." in name]
        return [{"params": [p for name, p in params.items() if ".lora_B." not in name], "lr_scale": 1.0}, {"params": b, "lr_scale": ratio}]

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable tensors, plus pissa/olora's initial factors (needed to undo the residual)."""
        state = super().state_dict(model)
        state.update({name: t for name, t in model.named_buffers() if name.endswith(("lora_A_init", "lora_B_init"))})
        return state

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        initial = {name: state[name] for name in state if name.endswith(("lora_A_init", "lora_B_init"))}
        super().load_state_dict(model, {k: v for k, v in state.items() if k not in initial}, source)
        for name, layer in self.adapter_layers(model).items():
            if f"{name}.lora_A_init" in initial:
                layer.set_initial_factors(initial[f"{name}.lora_A_init"], initial[f"{name}.lora_B_init"])

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        opts = self.options
        # pissa/olora export as plain LoRA on the original weights: s(BA − B₀A₀) = s[B, −B₀][A; A₀],
        # rank 2r with alpha scaled so that s stays the same (peft's own conversion).
        doubled = opts.init in ("pissa", "olora")
        alpha = opts.alpha * ((math.sqrt(2) if opts.rslora else 2) if doubled else 1)
        return {
            "r": opts.r * (2 if doubled else 1),
            "lora_alpha": alpha,
            "lora_dropout": opts.dropout,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": opts.rslora,
            "use_dora": opts.dora,
            "init_lora_weights": True,
            "modules_to_save": None,
        }

    def peft_export(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        config, tensors = super().peft_export(model)
        if self.options.init not in ("pissa", "olora"):
            return config, tensors
        if self.options.dora:
            raise TunelabError("a pissa/olora-initialized DoRA adapter cannot be expressed on the original weights for peft")
        converted = {}
        for name, tensor in tensors.items():
            if name.endswith(("lora_A_init", "lora_B_init")):
                continue
            init = tensors[name.removesuffix(".weight") + "_init"]
            converted[name] = torch.cat([tensor, init], 0) if ".lora_A." in name else torch.cat([tensor, -init], 1)
        return config, converted

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        reject_peft_settings(
            config,
            source,
            {**PEFT_TARGETING_DEFAULTS, "bias": "none", "fan_in_fan_out": (False, None), "init_lora_weights": (True, False, "gaussian", None), "use_qalora": (False, None)},
        )
        return {
            "name": cls.name,
            "r": config["r"],
            "alpha": config.get("lora_alpha", 8),
            "dropout": config.get("lora_dropout", 0.0),
            "rslora": bool(config.get("use_rslora")),
            "dora": bool(config.get("use_dora")),
            "target": target_from_peft(config, source),
        }
