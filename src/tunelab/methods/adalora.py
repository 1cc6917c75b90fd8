"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"):
LoRA in SVD form, W + s·P Λ Q, whose rank budget moves during training to the layers that matter.

Each adapted layer has `lora_A` (Q, init_r × d_in), `lora_E` (the singular values Λ, init_r × 1) and
`lora_B` (P, d_out × init_r); y = W x + s · B (E ⊙ A) dropout(x). As in peft:
- s = alpha / (init_r + 1e-5). peft divides by `ranknum`, which stays init_r for the adapter's
  life: pruning zeroes singular values, it never changes the divisor.
- E starts at zeros and A, B at N(0, 0.02²), so the wrapped layer starts equal to W.
- The loss gains orth_reg_weight · R, R the mean over every A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F
  (P and Q near-orthogonal, so that E holds the singular values). peft adds R in each forward
  that computes a loss; tunelab adds it once per optimizer step (`regularization`), the same
  value and gradient whatever the micro-batching.
- After each optimizer step (`after_step`), peft's RankAllocator: the importance of each entry is
  I = |w · ∂L/∂w|, smoothed Ī ← β₁Ī + (1−β₁)I (sensitivity), with uncertainty
  Ū ← β₂Ū + (1−β₂)|I − Ī|; a triplet i of a layer scores mean_j(ĪŪ of A_ij) + mean_j(ĪŪ of B_ji)
  + ĪŪ of E_i. The total budget (triplets kept, over all layers) stays init_r·n for tinit steps,
  falls as a cubic to target_r·n at total_step − tfinal, then stays there; every delta_t steps the
  lowest-scoring triplets beyond the budget get E_i = 0 (the optimizer may revive them until the
  next allocation), and from total_step − tfinal on the final pattern is re-applied every step.

Step numbering: peft's allocator counts optimizer steps from 0 (its example loop calls
update_and_allocate(global_step) after the step, then increments global_step), and tunelab's
`step` counts them from 1, so tunelab's step s is peft's global_step s − 1. A run of total_step
steps then allocates exactly as peft's loop with the same total_step.

Which triplets are kept (`rank_mask`, one per layer) is saved with the weights; the importance
averages are training state, in checkpoints only. A peft export holds, as peft saves it, only
the kept triplets, with the keep pattern as `rank_pattern` in the config.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import (
    PEFT_PREFIX,
    PEFT_TARGETING_DEFAULTS,
    AdapterLayer,
    LinearAdapterMethod,
    PeftDefaultTargetOptions,
    reject_peft_settings,
    target_from_peft,
)

# Checkpoint keys of the importance averages, followed by the parameter's name.
SENSITIVITY, UNCERTAINTY = "adalora_sensitivity.", "adalora_uncertainty."


class AdaLoraOptions(PeftDefaultTargetOptions):
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(default=12, ge=1)
    # The average rank per layer at the end (the final budget is target_r × adapted layers).
    target_r: int = Field(default=8, ge=0)
    alpha: float = Field(default=8.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Steps before the budget starts to fall, and steps at the end with the final budget.
    tinit: int = Field(default=0, ge=0)
    tfinal: int = Field(default=0, ge=0)
    # Steps between two allocations while the budget falls.
    delta_t: int = Field(default=1, ge=1)
    beta1: float = Field(default=0.85, gt=0.0, lt=1.0)
    beta2: float = Field(default=0.85, gt=0.0, lt=1.0)
    orth_reg_weight: float = Field(default=0.5, ge=0.0)
    # The length of the budget schedule; default: the run's number of steps.
    total_step: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _valid_schedule(self) -> AdaLoraOptions:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} exceeds init_r={self.init_r}: AdaLoRA only prunes ranks")
        error = None if self.total_step is None else schedule_error(self.tinit, self.tfinal, self.total_step, "total_step")
        if error:
            raise ValueError(error)
        return self


def schedule_error(tinit: int, tfinal: int, total_step: int, what: str) -> str | None:
    """Why the budget has no steps to fall in, if it has none (peft's rule: tinit < total_step − tfinal)."""
    if tinit < total_step - tfinal:
        return None
    return f"AdaLoRA: {what}={total_step} leaves no step for the budget to fall in (tinit={tinit}, tfinal={tfinal}; need tinit < total_step - tfinal)"


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int, delta_t: int) -> tuple[int, bool]:
    """(triplets to keep, whether to allocate now) at peft's 0-based `step`: peft's cubic schedule."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * remaining**3 + target_budget), step % delta_t == 0


class AdaLoraLinear(AdapterLayer):
    """y = W x + s · B (E ⊙ A) dropout(x), with W frozen; `rank_mask` marks the kept triplets."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__(base_layer)
        # fp32 even on a half-precision base: tiny updates vanish in bf16.
        device, dtype = base_layer.weight.device, torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=device, dtype=dtype))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, r, device=device, dtype=dtype))
        with torch.no_grad():
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        x_lora = self.lora_dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(x_lora, self.lora_A * self.lora_E), self.lora_B) * self.scaling
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling

    @torch.no_grad()
    def set_rank_mask(self, keep: torch.Tensor) -> None:
        """Keep the triplets where `keep` is True; zero the singular values of the others."""
        self.rank_mask.copy_(keep)
        self.lora_E.masked_fill_(~keep[:, None], 0.0)

    def exported_triplets(self) -> torch.Tensor:
        """The triplets a peft export keeps: the kept ones, and any the optimizer revived since the
        last allocation (dropping a nonzero singular value would change the adapter)."""
        return self.rank_mask | (self.lora_E.detach()[:, 0] != 0)


class AdaLora(LinearAdapterMethod):
    """AdaLoRA: LoRA in SVD form whose rank budget moves to the most important layers during training."""

    name = "adalora"
    Options = AdaLoraOptions
    whole_tensors_reason = "its rank allocation ranks the importance of whole singular-value vectors across layers"
    peft_type = "ADALORA"

    def __init__(self, options: AdaLoraOptions):
        super().__init__(options)
        # The importance averages Ī and Ū of every trainable tensor, by parameter name (peft's
        # exp_avg_ipt and exp_avg_unc); empty before the first step and after the final allocation.
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    @property
    def scaling(self) -> float:
        return self.options.alpha / (self.options.init_r + 1e-5)

    def wrap(self, name: str, base: nn.Linear) -> AdaLoraLinear:
        return AdaLoraLinear(base, self.options.init_r, self.scaling, self.options.dropout)

    # ---- training

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        weight = self.options.orth_reg_weight
        if weight == 0:
            return None
        terms = []
        for layer in self.adapter_layers(model).values():
            for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                identity = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                terms.append(torch.linalg.matrix_norm(gram - identity))
        return weight * torch.stack(terms).mean()

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        opts = self.options
        total = opts.total_step or total_steps
        error = None if opts.total_step else schedule_error(opts.tinit, opts.tfinal, total, "the run's total steps")
        if error:
            raise TunelabError(error + "; set method.total_step, or lower tinit/tfinal")
        layers = self.adapter_layers(model)
        global_step, final = step - 1, total - opts.tfinal  # peft's 0-based step: see the module doc
        if global_step < final:
            self._update_importance(model)
            budget, allocate = budget_schedule(global_step, opts.init_r * len(layers), opts.target_r * len(layers), opts.tinit, opts.tfinal, total, opts.delta_t)
            if allocate:
                self._mask_to_budget(layers, budget)
        elif global_step == final:  # the final allocation, from the averages so far
            self._mask_to_budget(layers, opts.target_r * len(layers))
            self.sensitivity.clear()
            self.uncertainty.clear()
        else:  # the pattern is final: undo whatever the optimizer revived
            for layer in layers.values():
                layer.set_rank_mask(layer.rank_mask)

    @torch.no_grad()
    def _update_importance(self, model: nn.Module) -> None:
        beta1, beta2 = self.options.beta1, self.options.beta2
        for name, param in self.trainable_parameters(model).items():
            importance = (param * param.grad).abs()
            sensitivity, uncertainty = self.sensitivity.get(name), self.uncertainty.get(name)
            if sensitivity is None:  # the first update (or the first since the final allocation): from zero, as peft
                sensitivity, uncertainty = torch.zeros_like(param), torch.zeros_like(param)
            sensitivity = beta1 * sensitivity + (1 - beta1) * importance
            uncertainty = beta2 * uncertainty + (1 - beta2) * (importance - sensitivity).abs()
            self.sensitivity[name], self.uncertainty[name] = sensitivity, uncertainty

    def _triplet_scores(self, name: str) -> torch.Tensor:
        """Each triplet's importance: its E entry's plus the mean over its row of A and column of B."""
        score = {part: self.sensitivity[f"{name}.{part}"] * self.uncertainty[f"{name}.{part}"] for part in ("lora_A", "lora_B", "lora_E")}
        return score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))

    @torch.no_grad()
    def _mask_to_budget(self, layers: dict[str, AdaLoraLinear], budget: int) -> None:
        """Drop the triplets scoring at or below the k-th lowest score, k = all triplets − budget."""
        scores = {name: self._triplet_scores(name) for name in layers}
        pruned = sum(layer.rank_mask.numel() for layer in layers.values()) - budget
        if pruned <= 0:  # target_r == init_r: nothing ever falls below the budget
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), pruned).values
        for name, layer in layers.items():
            layer.set_rank_mask(~(scores[name] <= threshold))

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights and kept triplets, plus the importance averages (for an exact resume)."""
        averages = {SENSITIVITY + n: t for n, t in self.sensitivity.items()}
        averages.update({UNCERTAINTY + n: t for n, t in self.uncertainty.items()})
        return {**self.state_dict(model), **averages}

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        params = self.trainable_parameters(model)
        averages: dict[str, dict[str, torch.Tensor]] = {SENSITIVITY: {}, UNCERTAINTY: {}}
        for key, tensor in state.items():
            for prefix, found in averages.items():
                if key.startswith(prefix):
                    name = key.removeprefix(prefix)
                    if name not in params or params[name].shape != tensor.shape:
                        raise TunelabError(f"{source}: importance average '{key}' fits no AdaLoRA tensor of this model")
                    found[name] = tensor.to(params[name].device)
        self.load_state_dict(model, {k: v for k, v in state.items() if not k.startswith(tuple(averages))}, source)
        self.sensitivity, self.uncertainty = averages[SENSITIVITY], averages[UNCERTAINTY]

    # ---- weights

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable tensors, plus each layer's kept triplets (`rank_mask`)."""
        masks = {f"{name}.rank_mask": layer.rank_mask for name, layer in self.adapter_layers(model).items()}
        return {**super().state_dict(model), **masks}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        masks = {f"{name}.rank_mask": layer for name, layer in self.adapter_layers(model).items()}
        super().load_state_dict(model, {k: v for k, v in state.items() if k not in masks}, source)
        for key, layer in masks.items():
            if key not in state:
                raise TunelabError(f"{source}: no '{key}' (which triplets are kept) among the weights")
            if state[key].shape != layer.rank_mask.shape:
                raise TunelabError(f"{source}: '{key}' has shape {tuple(state[key].shape)}, the model expects {tuple(layer.rank_mask.shape)}")
            layer.rank_mask.copy_(state[key])

    # ---- peft

    def _exported_triplets(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Each layer's triplets in a peft export; None before the first allocation (all kept:
        peft then saves no rank_pattern and full-size tensors)."""
        layers = self.adapter_layers(model)
        if all(layer.rank_mask.all() for layer in layers.values()):
            return None
        return {name: layer.exported_triplets() for name, layer in layers.items()}

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        opts = self.options
        kept = self._exported_triplets(model)
        return {
            "init_r": opts.init_r,
            "target_r": opts.target_r,
            "lora_alpha": opts.alpha,
            "lora_dropout": opts.dropout,
            "tinit": opts.tinit,
            "tfinal": opts.tfinal,
            "deltaT": opts.delta_t,
            "beta1": opts.beta1,
            "beta2": opts.beta2,
            "orth_reg_weight": opts.orth_reg_weight,
            # peft requires one. The run's own length is not part of the adapter: without the
            # option, the shortest schedule peft accepts (it only matters to train on in peft,
            # which sets its own total_step for the new run).
            "total_step": opts.total_step or opts.tinit + opts.tfinal + 1,
            # peft's keys: the layer's lora_E, without the adapter name.
            "rank_pattern": None if kept is None else {f"{name}.lora_E": keep.tolist() for name, keep in kept.items()},
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "modules_to_save": None,
        }

    def peft_export(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """peft's saved form: only the kept triplets' rows of A and E and columns of B."""
        config, tensors = super().peft_export(model)
        kept = self._exported_triplets(model)
        for name in self.adapter_layers(model):
            prefix = f"{PEFT_PREFIX}{name}."
            del tensors[prefix + "rank_mask"]
            if kept is not None:
                keep = kept[name]
                tensors[prefix + "lora_A"] = tensors[prefix + "lora_A"][keep].contiguous()
                tensors[prefix + "lora_E"] = tensors[prefix + "lora_E"][keep].contiguous()
                tensors[prefix + "lora_B"] = tensors[prefix + "lora_B"][:, keep].contiguous()
        return config, tensors

    def peft_import(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        """A peft adapter keeps k ≤ init_r triplets per layer (after allocation, as its rank_pattern
        says). They take the layer's first k slots; the others hold zeros and stay pruned. The
        slots' order is immaterial: the update is a sum over triplets."""
        state = {name.removeprefix(PEFT_PREFIX): t for name, t in tensors.items()}
        r = self.options.init_r
        for name in self.adapter_layers(model):
            parts = {part: state.get(f"{name}.{part}") for part in ("lora_A", "lora_E", "lora_B")}
            if any(t is None for t in parts.values()):
                continue  # load_state_dict names what is missing
            kept = parts["lora_E"].shape[0]
            if kept > r or parts["lora_A"].shape[0] != kept or parts["lora_B"].shape[-1] != kept:
                raise TunelabError(f"{source}: {name} has {kept} singular values for init_r={r} (lora_A {tuple(parts['lora_A'].shape)}, lora_B {tuple(parts['lora_B'].shape)})")
            state[f"{name}.lora_A"] = _pad_rows(parts["lora_A"], r)
            state[f"{name}.lora_E"] = _pad_rows(parts["lora_E"], r)
            state[f"{name}.lora_B"] = _pad_rows(parts["lora_B"].T, r).T
            state[f"{name}.rank_mask"] = torch.arange(r) < kept
        self.load_state_dict(model, state, source)

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        targeting = {k: v for k, v in PEFT_TARGETING_DEFAULTS.items() if k != "rank_pattern"}  # AdaLoRA's own, read from the tensors
        reject_peft_settings(
            config,
            source,
            {**targeting, "bias": ("none", None), "fan_in_fan_out": (False, None), "layer_replication": None, "trainable_token_indices": None},
        )
        alpha = config.get("lora_alpha", 8)
        if alpha <= 0:  # peft then scales by each layer's current rank, which tunelab does not do
            raise TunelabError(f"{source}: lora_alpha={alpha} is not supported by tunelab (it must be > 0)")
        # total_step is left out: it was the length of the run that trained the adapter; a new
        # tunelab run schedules its budget over its own steps unless told otherwise.
        return {
            "name": cls.name,
            "init_r": config.get("init_r", 12),
            "target_r": config.get("target_r", 8),
            "alpha": alpha,
            "dropout": config.get("lora_dropout", 0.0),
            "tinit": config.get("tinit", 0),
            "tfinal": config.get("tfinal", 0),
            "delta_t": config.get("deltaT", 1),
            "beta1": config.get("beta1", 0.85),
            "beta2": config.get("beta2", 0.85),
            "orth_reg_weight": config.get("orth_reg_weight", 0.5),
            "target": target_from_peft(config, source),
        }


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows appended up to `rows`."""
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
