"""What every adaptation method is, and the machinery they share (targeting and wrapping linear layers).

A method is one class that knows how to attach itself to a model, list its trainable parameters,
save/load its state, and merge into the base weights where that is mathematically possible.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from tunelab.errors import TunelabError


class MethodOptions(BaseModel):
    """Options every method has; each method subclasses this with its own (unknown keys fail)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


class Method(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]
    # Where the final weights of a run go: "adapter" (only the trainable tensors) or "model" (a full
    # Hugging Face checkpoint).
    artifact: ClassVar[str] = "adapter"

    def __init__(self, options: MethodOptions):
        self.options = options

    @abstractmethod
    def attach(self, model: nn.Module) -> None:
        """Modify `model` in place: add the method's modules and leave only its parameters trainable."""

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.trainable_parameters(model).items()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        params = self.trainable_parameters(model)
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise TunelabError(
                f"{source}: weights do not fit method '{self.name}' on this model "
                f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})"
            )
        with torch.no_grad():
            for name, param in params.items():
                if param.shape != state[name].shape:
                    raise TunelabError(
                        f"{source}: tensor '{name}' has shape {tuple(state[name].shape)}, "
                        f"the model expects {tuple(param.shape)}"
                    )
                param.copy_(state[name])

    def store_frozen_weights(self, model: nn.Module, dtype: torch.dtype) -> bool:
        """Give training a copy of the frozen weights in `dtype`, a faster matmul dtype than the
        activations' (evaluation keeps the originals); True if done. Only methods whose kernels
        mix dtypes can."""
        return False

    def merge(self, model: nn.Module) -> None:
        """Fold the method into the base weights, leaving a plain model. Not every method can."""
        raise TunelabError(f"method '{self.name}' cannot be merged into the base weights")

    def peft_export(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """(adapter_config.json, adapter_model.safetensors tensors) in the peft library's format."""
        raise TunelabError(f"method '{self.name}' has no peft export")


def output_embedding_names(model: nn.Module) -> set[str]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if output is not None and module is output}


def find_target_linears(model: nn.Module, target: str | list[str]) -> list[str]:
    """Names of the nn.Linear modules that `target` selects.

    `all-linear` selects every linear layer except the output head (as peft does). A list of
    patterns selects a module when a pattern equals its name, is its last dotted component(s)
    (`q_proj` matches `model.layers.0.self_attn.q_proj`), or fully matches it as a regex.
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if target == "all-linear":
        excluded = output_embedding_names(model)
        return [name for name in linears if name not in excluded]
    patterns = [target] if isinstance(target, str) else list(target)

    def selected(name: str) -> bool:
        return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)

    chosen = [name for name in linears if selected(name)]
    if not chosen:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise TunelabError(f"method.target: no linear layer matches {patterns}; this model has {leaves}")
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def peft_target_modules(linear_names: list[str], targeted: list[str]) -> list[str]:
    """The shortest peft `target_modules` list that selects exactly `targeted` among `linear_names`.

    Leaf names (`q_proj`) when every linear layer with that leaf name is targeted, else full names.
    """
    by_leaf: dict[str, list[str]] = {}
    for name in linear_names:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    chosen = set(targeted)
    result = []
    for leaf, names in sorted(by_leaf.items()):
        hits = [n for n in names if n in chosen]
        result.extend([leaf] if hits and len(hits) == len(names) else hits)
    return result
