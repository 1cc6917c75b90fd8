"""Partial fine-tuning: a chosen subset of the model's own tensors trains, everything else is frozen.

No module is added and the forward pass is the model's own. For the trained set S, an optimizer
step is the full fine-tuning step masked to S:

    θ_t ← θ_{t-1} − η · AdamW(∇_θ L)   for θ ∈ S,        θ_t = θ_0   for θ ∉ S

so the trainable count is Σ_{θ ∈ S} numel(θ), and the run's adapter holds exactly the tensors of S
under their model names (`model.layers.1.mlp.down_proj.weight`, ...). A tied output head is the
input embedding's tensor: it counts and saves once, as `model.embed_tokens.weight`. Merging folds
nothing (the trained tensors are the model), so `export --format merged` is the trained model.

- `freeze` (layer freezing, as LLaMA-Factory's freeze tuning): S = the selected decoder layers
  (by default the last 2), or the modules matching `modules` inside them; optionally the input
  embeddings and output head (`train_embeddings`) and every normalization layer (`train_norms`).
- `hft` (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models"): in every decoder
  layer, half (`fraction`) of each category of the layer's tensors trains, picked at random by
  `seed` (category-level selection, the paper's best): 2 of the attention's q/k/v/o; of the MLP's
  gate/up/down, 2 in half of the layers and 1 in the other half (exactly half over the model); 1
  of the 2 norms. What sits outside the decoder layers trains: the embeddings and output head, as
  the paper says, and the final norm (the paper halves only the repeated layers). The paper draws
  a new half per training stage: here one run is one stage, and a later stage is a run with
  another `seed`.
"""

from __future__ import annotations

import math
import random
from abc import abstractmethod
from typing import Annotated, Literal

from pydantic import Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import Method, MethodOptions, decoder_layers, name_matches


class FreezeOptions(MethodOptions):
    name: Literal["freeze"] = "freeze"
    # Decoder layers that train, by index; negative counts from the end. LLaMA-Factory's freeze
    # tuning trains the last 2 by default.
    layers: Literal["all"] | Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: [-2, -1])
    # Which modules of those layers train: patterns as in `target` (a leaf name such as `mlp` or
    # `q_proj`, a dotted tail such as `self_attn.o_proj`, a full name, or a regex).
    modules: Literal["all"] | Annotated[list[str], Field(min_length=1)] = "all"
    # The input embeddings and the output head (one tensor when they are tied).
    train_embeddings: bool = False
    # Every normalization layer of the model (the final norm and each layer's).
    train_norms: bool = False


class HftOptions(MethodOptions):
    name: Literal["hft"] = "hft"
    # The share of each category of a layer's tensors that trains (the paper's 50%).
    fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    # Seed of the selection alone: independent of train.seed, so a different stage can draw anew.
    seed: int = 0


class OwnWeightsMethod(Method):
    """A method that trains some of the model's own modules: attach unfreezes them, merge is a no-op."""

    mergeable = True

    @abstractmethod
    def trained_modules(self, model: nn.Module) -> list[str]:
        """Names of the modules whose parameters train."""

    def attach(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        for name in self.trained_modules(model):
            model.get_submodule(name).requires_grad_(True)

    def merge(self, model: nn.Module) -> None:
        """Nothing to fold: the trained tensors already are the model's. Leave it a plain, frozen model."""
        model.requires_grad_(False)


class Freeze(OwnWeightsMethod):
    """Freeze tuning: only the chosen decoder layers (default the last 2) or modules train."""

    name = "freeze"
    Options = FreezeOptions

    def trained_modules(self, model: nn.Module) -> list[str]:
        opts = self.options
        layers = decoder_layers(model, self.name)
        if opts.layers != "all":
            for index in opts.layers:
                if not -len(layers) <= index < len(layers):
                    raise TunelabError(
                        f"method.layers: {index} is out of range: {type(model).__name__} has {len(layers)} decoder "
                        f"layers (0..{len(layers) - 1}, or -{len(layers)}..-1 from the end)"
                    )
            layers = [layers[index] for index in opts.layers]
        trained = layers if opts.modules == "all" else self._matching_modules(model, layers, opts.modules)
        if opts.train_embeddings:
            trained += embedding_modules(model)
        if opts.train_norms:
            trained += norm_modules(model)
        return trained

    def _matching_modules(self, model: nn.Module, layers: list[str], patterns: list[str]) -> list[str]:
        candidates = [name for layer in layers for name, _ in model.get_submodule(layer).named_modules(prefix=layer)]
        unmatched = [p for p in patterns if not any(name_matches(name, [p]) for name in candidates)]
        if unmatched:
            first = f"{layers[0]}."
            inside = sorted(name.removeprefix(first) for name in candidates if name.startswith(first))
            raise TunelabError(f"method.modules: {unmatched} match no module of the selected layers (method.layers: {self.options.layers}); a layer has {inside}")
        return [name for name in candidates if name_matches(name, patterns)]


class Hft(OwnWeightsMethod):
    """HFT: a seeded random half of each layer's attention, MLP and norm tensors trains."""

    name = "hft"
    Options = HftOptions

    def trained_modules(self, model: nn.Module) -> list[str]:
        layers = decoder_layers(model, self.name)
        inside = tuple(f"{layer}." for layer in layers)
        outside = [name for name in parameter_owners(model) if not name.startswith(inside)]
        # category -> the category's modules in each layer that has it
        categories: dict[tuple[str, bool], list[list[str]]] = {}
        for layer in layers:
            in_layer: dict[tuple[str, bool], list[str]] = {}
            for name in parameter_owners(model.get_submodule(layer), prefix=layer):
                # The attention's linears, the MLP's linears, the layer's norms: a category is the
                # parent module plus whether it is a linear layer (q_norm/k_norm are not q/k/v/o).
                parent = name.removeprefix(f"{layer}.").rpartition(".")[0]
                in_layer.setdefault((parent, isinstance(model.get_submodule(name), nn.Linear)), []).append(name)
            for category, members in in_layer.items():
                categories.setdefault(category, []).append(members)
        rng = random.Random(self.options.seed)
        chosen = []
        for per_layer in categories.values():
            counts = split_count([len(members) for members in per_layer], self.options.fraction, rng)
            for members, count in zip(per_layer, counts):
                chosen += rng.sample(members, count)
        return outside + chosen


def split_count(sizes: list[int], fraction: float, rng: random.Random) -> list[int]:
    """How many of each layer's n_l members train: fraction · Σ n_l in all (rounded), each layer
    ⌊fraction · n_l⌋ or one more; the layers that get one more are drawn at random (the paper's
    2-of-3 MLP matrices in half of the layers, 1 of 3 in the others)."""
    shares = [fraction * n for n in sizes]
    counts = [math.floor(share) for share in shares]
    rounding_up = [k for k, share in enumerate(shares) if share > counts[k]]
    for k in rng.sample(rounding_up, math.floor(sum(shares) + 0.5) - sum(counts)):
        counts[k] += 1
    return counts


def parameter_owners(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of the modules (under `module`) that hold parameters themselves, in model order."""
    return [name for name, m in module.named_modules(prefix=prefix) if next(m.parameters(recurse=False), None) is not None]


def embedding_modules(model: nn.Module) -> list[str]:
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [name for name, m in model.named_modules() if any(m is e for e in embeddings if e is not None)]


def norm_modules(model: nn.Module) -> list[str]:
    # By class name: LayerNorm, LlamaRMSNorm, Qwen3RMSNorm, ... (transformers has no common base class).
    return [name for name in parameter_owners(model) if "norm" in type(model.get_submodule(name)).__name__.lower()]
