"""Layerwise sampled fine-tuning: the model's own weights train, a few sampled decoder layers at a time.

Everything outside the decoder layers always trains (the input embeddings, the output head and
the final norm: LMFlow's LISA freezes only the layers). Of the L decoder layers, a fresh sample
A_k of γ (`n_layers`) trains in period k of K (`interval`) steps; the others are frozen. At the
loop's 1-based step s:

    k = ⌊(s − 1) / K⌋,   A_k = γ of {0, …, L−1} drawn without replacement with probabilities p,
                         by numpy's Generator seeded with (seed, k)
    θ ← θ − η · AdamW(∇_θ L)   for θ outside the layers and in the layers of A_k
    θ unchanged                for θ in the other layers (they get no gradient)

(k is LMFlow's switch on `global_step % K == 0`, with global_step = s − 1 the steps done.) So the
active layers are a pure function of (seed, k), whatever the global RNG did: a resumed
run draws the same layers. The tensors are the model's own, under their model names
(`model.layers.3.mlp.down_proj.weight`, ...); the run's adapter holds every tensor that may train
(here, every tensor of the model; a tied head once, as `model.embed_tokens.weight`), and merging
folds nothing (export --format merged is the trained model).

Optimizer moments. One AdamW serves the whole run, as in LMFlow's and OwLore's code (the HF
Trainer builds its optimizer once over all parameters, before the callback first freezes layers).
A frozen layer's gradient is None, and AdamW then skips the tensor entirely: no moment decay, no
weight decay, no step count. A re-activated layer so continues from the moments and bias-correction
step it had when last active. (The paper's Algorithm 1 reads "run AdamW for K iterations" per
period, i.e. fresh moments; that would need the loop to drop the optimizer state of the layers a
re-draw freezes, which the Method interface cannot reach.)

Counts. Every tensor may train at some step, so the trainable count (the optimizer's tensors) is

    V·h (+ V·h for an untied head) + h (final norm) + L · (one layer's parameters)

— full fine-tuning's. What the paper counts as memory is the tensors that train at once:

    V·h (+ V·h untied) + h + γ · (one layer's parameters)

(gradients and, with freed moments, optimizer state, for those only).

- `lisa` (Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
  Model Fine-Tuning"): p uniform (p = None in numpy's `choice`); γ = 2 (the paper's), K = 20
  (ms-swift's LISA default).
- `owlore` (Li et al. 2024, "OwLore: Outlier-weighted Layerwise Sampled Low-Rank Projection for
  Memory-Efficient LLM Fine-tuning"): p_l = D_l / Σ_j D_j, with D_l OWL's outlier ratio of layer l:
  over all the layer's linear weights together, with scores A_ij and their mean Ā_l,

      D_l = |{(i, j) : A_ij > M · Ā_l}| / (number of the layer's linear weights),   M = `outlier_threshold`

  computed once, from the base weights, at attach. OWL's score is Wanda's A_ij = |W_ij| · ‖X_j‖₂,
  with X the layer input on calibration data; a method gets no data at attach, so HERE THE SCORE
  IS THE WEIGHT MAGNITUDE ALONE, A_ij = |W_ij| (`outlier_score: weight`, the only choice). When
  fewer than γ layers have any outlier (a randomly initialized model has none at M = 13) the draw is
  uniform, as LISA's, and a console line says so. OwLore's gradient low-rank projection of the
  sampled layers is not part of the method: combine it with `train.optimizer: galore`
  (train/galore.py), as OwLore's code combines its sampling with GaLore's AdamW. The defaults are
  LISA's γ = 2, K = 20; OwLore's scripts use γ = 5, K = 50 on LLaMA2-7B.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from tunelab.console import console
from tunelab.errors import TunelabError
from tunelab.methods.base import MethodOptions, decoder_layers
from tunelab.methods.partial import OwnWeightsMethod, parameter_owners
from tunelab.models.quantize import dequantize

# The checkpoint entry holding the steps done, from which a resumed run re-draws its active layers.
COMPLETED_STEPS = "layer_sampling.completed_steps"


class LisaOptions(MethodOptions):
    name: Literal["lisa"] = "lisa"
    # γ: how many decoder layers train at a time (the paper's 2).
    n_layers: int = Field(default=2, ge=1)
    # K: steps between fresh draws of the training layers (LMFlow's `lisa_interval_steps`; 20 as ms-swift).
    interval: int = Field(default=20, ge=1)
    # Seed of the draws alone (independent of train.seed): period k's layers come from (seed, k).
    seed: int = Field(default=0, ge=0)


class OwloreOptions(LisaOptions):
    name: Literal["owlore"] = "owlore"
    # M: a weight is an outlier when its score exceeds M × its layer's mean score (OwLore's code
    # samples LLaMA2-7B by cached ratios, `llama2_7b_ratio_13.txt`: M = 13).
    outlier_threshold: float = Field(default=13.0, gt=1.0)
    # The score A_ij. `weight`: |W_ij| alone, NOT OWL's Wanda score |W_ij|·‖X_j‖₂ (that needs
    # calibration activations, which a method does not get).
    outlier_score: Literal["weight"] = "weight"


class Lisa(OwnWeightsMethod):
    """LISA: embeddings and head train; of the decoder layers, a fresh uniform γ every K steps."""

    name = "lisa"
    Options = LisaOptions

    def trained_modules(self, model: nn.Module) -> list[str]:
        """Every module that may train: whatever holds parameters outside the layers, and the layers."""
        layers = decoder_layers(model, self.name)
        inside = tuple(f"{layer}." for layer in layers)
        return [name for name in parameter_owners(model) if not name.startswith(inside)] + layers

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        # Active or not: the optimizer, clipping and the adapter hold every tensor that may train.
        owners = tuple(f"{name}." for name in self.trained_modules(model))
        return {name: p for name, p in model.named_parameters() if name.startswith(owners)}

    def attach(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model, self.name)
        if self.options.n_layers > len(self.layers):
            raise TunelabError(f"method.n_layers: {self.options.n_layers} layers cannot train at a time: {type(model).__name__} has {len(self.layers)} decoder layers")
        self.probabilities = self.sampling_probabilities(model)
        super().attach(model)
        self.completed_steps = 0
        self.activate(model, step=1)

    def sampling_probabilities(self, model: nn.Module) -> np.ndarray | None:
        """p_l, the probability of drawing layer l; None for a uniform draw."""
        return None

    def active_layers(self, step: int) -> list[int]:
        """Indices of the decoder layers that train at 1-based `step`: a function of (seed, period) alone."""
        period = (step - 1) // self.options.interval
        rng = np.random.default_rng([self.options.seed, period])
        drawn = rng.choice(len(self.layers), size=self.options.n_layers, replace=False, p=self.probabilities)
        return sorted(drawn.tolist())

    def activate(self, model: nn.Module, step: int) -> None:
        """Unfreeze the layers of `step`'s period, freeze the other layers."""
        active = set(self.active_layers(step))
        for index, name in enumerate(self.layers):
            model.get_submodule(name).requires_grad_(index in active)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        # The loop clears the gradients next (set to None), so the next step's frozen layers get none.
        self.completed_steps = step
        self.activate(model, step=step + 1)

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {**self.state_dict(model), COMPLETED_STEPS: torch.tensor([self.completed_steps])}

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        if COMPLETED_STEPS not in state:
            raise TunelabError(f"{source}: the checkpoint has no '{COMPLETED_STEPS}': it is not a {self.name} run's")
        self.load_state_dict(model, {k: v for k, v in state.items() if k != COMPLETED_STEPS}, source)
        self.completed_steps = int(state[COMPLETED_STEPS].item())
        self.activate(model, step=self.completed_steps + 1)


class Owlore(Lisa):
    """OwLore: LISA's layer sampling with p ∝ each layer's outlier ratio (|W| score; GaLore apart)."""

    name = "owlore"
    Options = OwloreOptions

    def sampling_probabilities(self, model: nn.Module) -> np.ndarray | None:
        if any(p.is_meta for p in model.parameters()):
            return None  # a weightless skeleton (parameter counts): nothing to score
        ratios = np.array([outlier_ratio(model.get_submodule(name), self.options.outlier_threshold) for name in self.layers])
        if np.count_nonzero(ratios) < self.options.n_layers:
            console.print(
                f"owlore: only {np.count_nonzero(ratios)} of {len(ratios)} decoder layers have weights above "
                f"{self.options.outlier_threshold:g}x their layer's mean |W| (method.outlier_threshold), fewer than "
                f"method.n_layers={self.options.n_layers}: the layers are drawn uniformly, as LISA does"
            )
            return None
        return ratios / ratios.sum()


@torch.no_grad()
def outlier_ratio(layer: nn.Module, threshold: float) -> float:
    """OWL's D_l with the score |W_ij|: the share of the layer's linear weights above `threshold` × their mean."""
    weights = [dequantize(m.weight) for m in layer.modules() if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    mean = sum(w.abs().sum(dtype=torch.float64) for w in weights) / total
    outliers = sum(int((w.abs() > threshold * mean).sum()) for w in weights)
    return outliers / total
