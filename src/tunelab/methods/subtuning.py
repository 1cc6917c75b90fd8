"""SubTuning (Kaplun et al. 2023, "Less is More: Selective Layer Finetuning with SubTuning"): only a
few decoder layers train, chosen greedily by how much fine-tuning them helps.

Greedy selection (`prepare`, on the first training batches): with S = ∅ and θ_0 the initial
weights, each round tries every decoder layer ℓ ∉ S: from θ_0, fine-tune the full weights of
S ∪ {ℓ} for `probe_steps` Adam steps (lr `probe_lr`, one micro-batch a step) on the probe batches,
then measure the held-out loss  L(ℓ) = Σ_b loss_b / Σ_b n_targets(b)  on the last `held_out_steps`
steps' batches. S ← S ∪ {argmin_ℓ L(ℓ)} (ties: the lower layer), until |S| = `num_layers`. θ_0 is
restored afterwards, and the run fine-tunes the layers of S:

    θ_t ← θ_{t-1} − η · AdamW(∇_θ L)   for θ in the layers of S,   θ_t = θ_0 elsewhere.

The paper stops early when a round gains less than a threshold; here |S| is fixed, so the
trainable count is known before any data: `num_layers` · numel(one decoder layer).

Tensors: the chosen layers' own (`model.layers.3.mlp.down_proj.weight`, ...) plus
`subtuning.layers` (|S|,), the chosen layer indices, which load_run and resume read instead of
selecting again. Before `prepare` chooses, the last `num_layers` layers train (a placeholder).
Merging folds nothing: the trained tensors are the model's.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import MethodOptions, decoder_layers
from tunelab.methods.partial import OwnWeightsMethod

LAYERS_KEY = "subtuning.layers"


class SubTuningOptions(MethodOptions):
    name: Literal["subtuning"] = "subtuning"
    # How many decoder layers train.
    num_layers: int = Field(default=2, ge=1)
    # Each candidate set's probe: Adam steps and learning rate.
    probe_steps: int = Field(default=4, ge=1)
    probe_lr: float = Field(default=1e-4, gt=0.0)
    # Training steps whose batches measure the probes (after the probe_steps steps they train on).
    held_out_steps: int = Field(default=1, ge=1)


class SubTuning(OwnWeightsMethod):
    """SubTuning: the full weights of a few decoder layers, picked greedily by short probe fine-tunes."""

    name = "subtuning"
    Options = SubTuningOptions

    @property
    def prepare_steps(self) -> int:
        return self.options.probe_steps + self.options.held_out_steps

    def attach(self, model: nn.Module) -> None:
        count = len(decoder_layers(model, self.name))
        if self.options.num_layers > count:
            raise TunelabError(f"method.num_layers: {self.options.num_layers} is more than the model's {count} decoder layers")
        self.layers = list(range(count - self.options.num_layers, count))
        super().attach(model)

    def trained_modules(self, model: nn.Module) -> list[str]:
        names = decoder_layers(model, self.name)
        return [names[index] for index in self.layers]

    def _train_layers(self, model: nn.Module, layers: list[int]) -> None:
        self.layers = sorted(layers)
        super().attach(model)

    # ---- weights

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The chosen layers' tensors, plus which layers they are."""
        return {**super().state_dict(model), LAYERS_KEY: torch.tensor(self.layers)}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        layers = state.get(LAYERS_KEY)
        if layers is None:
            raise TunelabError(f"{source}: no '{LAYERS_KEY}' (which layers were chosen) among the weights")
        count = len(decoder_layers(model, self.name))
        chosen = layers.tolist()
        if len(chosen) != self.options.num_layers or len(set(chosen)) != len(chosen) or not all(0 <= k < count for k in chosen):
            raise TunelabError(f"{source}: '{LAYERS_KEY}' {chosen} is not {self.options.num_layers} of this model's {count} layers")
        self._train_layers(model, chosen)
        super().load_state_dict(model, {k: v for k, v in state.items() if k != LAYERS_KEY}, source)

    # ---- greedy selection

    def prepare(self, model: nn.Module, batches: list, loss_fn) -> None:
        held_out = max(1, round(len(batches) * self.options.held_out_steps / self.prepare_steps))
        probe, evaluation = batches[:-held_out], batches[-held_out:]  # both nonempty: prepare_steps ≥ 2
        layer_names = decoder_layers(model, self.name)
        initial = {name: p.detach().clone() for layer in layer_names for name, p in model.get_submodule(layer).named_parameters(prefix=layer)}
        chosen: list[int] = []
        try:
            while len(chosen) < self.options.num_layers:
                losses = {}
                for candidate in (k for k in range(len(layer_names)) if k not in chosen):
                    self._restore(model, initial)
                    self._train_layers(model, chosen + [candidate])
                    self._probe(model, probe, loss_fn)
                    losses[candidate] = held_out_loss(model, evaluation, loss_fn)
                chosen.append(min(losses, key=lambda k: (losses[k], k)))
        finally:
            self._restore(model, initial)
        self._train_layers(model, chosen)

    def _probe(self, model: nn.Module, batches: list, loss_fn) -> None:
        params = list(self.trainable_parameters(model).values())
        optimizer = torch.optim.Adam(params, lr=self.options.probe_lr)
        for step in range(self.options.probe_steps):
            batch = batches[step % len(batches)]
            (loss_fn(model, batch) / batch.n_targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    @staticmethod
    @torch.no_grad()
    def _restore(model: nn.Module, initial: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        for name, value in initial.items():
            params[name].copy_(value)


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list, loss_fn) -> float:
    """Σ loss / Σ targets over `batches`: the mean per-token loss."""
    return sum(float(loss_fn(model, b)) for b in batches) / sum(b.n_targets for b in batches)
