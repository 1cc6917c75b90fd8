"""Many LoRA adapters on one base model, in one forward (the S-LoRA / Punica idea).

Each linear layer any adapter targets becomes a `MultiLoraLinear`: the base projection runs once
for the whole batch, then each adapter's low-rank update s·B(Ax) is added to its own rows only.
Which adapter a row uses is `ROW_ADAPTERS` (an adapter slot per batch row, -1 for the base alone),
set around a forward by `rows_using`, so no signature inside the model changes.

Adapters come from a tunelab run directory or a peft adapter directory, safetensors only. A plain
LoRA (rsLoRA included) is served this way; other methods change the forward in other ways and are
refused with a message that says to merge them and serve the merged model.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.methods import build_method
from tunelab.methods.base import PEFT_PREFIX
from tunelab.methods.peft_io import method_options_from_peft, read_peft_adapter
from tunelab.methods.registry import method_options_model
from tunelab.models.modules import replace_module
from tunelab.runs import ADAPTER_FILE

# The adapter slot of each row of the forward that is running (a long tensor, -1: the base alone);
# None in every other forward.
ROW_ADAPTERS: ContextVar[torch.Tensor | None] = ContextVar("row_adapters", default=None)
RUN_ADAPTER_FILE = Path("adapter") / ADAPTER_FILE


@contextmanager
def rows_using(slots: torch.Tensor):
    """ROW_ADAPTERS is `slots` inside the block."""
    token = ROW_ADAPTERS.set(slots)
    try:
        yield
    finally:
        ROW_ADAPTERS.reset(token)


@dataclass
class LoraAdapter:
    name: str
    scale: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # linear layer name -> (A: r x in, B: out x r)
    base_model: str | None  # the model the adapter was trained on, if it says


def read_lora_adapter(name: str, source: str | Path) -> LoraAdapter:
    """A plain LoRA adapter from a tunelab run directory or a peft adapter directory."""
    source = Path(source)
    if (source / "config.yaml").is_file():
        config = load_config(source / "config.yaml")
        options, base = config.method, config.model.name
        weights = source / RUN_ADAPTER_FILE
        if not weights.is_file():
            raise TunelabError(f"adapter '{name}': {source} has no {RUN_ADAPTER_FILE} (not an adapter run, or unfinished)")
        tensors = load_file(weights)
    elif source.is_dir():
        option_map = method_options_from_peft(source)
        options = method_options_model(option_map["name"]).model_validate(option_map)
        raw, _ = read_peft_adapter(source)
        tensors = {key.removeprefix(PEFT_PREFIX): value for key, value in raw.items()}
        base = None
    else:
        raise TunelabError(f"adapter '{name}': {source} is neither a tunelab run directory nor a peft adapter directory")
    if options.name != "lora" or options.dora or options.init not in ("kaiming", "gaussian"):
        variant = options.name if options.name != "lora" else ("DoRA" if options.dora else f"LoRA with init {options.init}")
        raise TunelabError(
            f"adapter '{name}': {variant} changes the forward in ways other than a low-rank update; merge it (tunelab export --format merged) and serve the merged model"
        )
    factors = {}
    for key, lora_a in tensors.items():
        if key.endswith(".lora_A.weight"):
            layer = key.removesuffix(".lora_A.weight")
            lora_b = tensors.get(f"{layer}.lora_B.weight")
            if lora_b is None:
                raise TunelabError(f"adapter '{name}': {layer} has lora_A but no lora_B")
            factors[layer] = (lora_a, lora_b)
    if not factors:
        raise TunelabError(f"adapter '{name}': no LoRA tensors in {source}")
    return LoraAdapter(name, build_method(options).scaling, factors, base)


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus the LoRA updates of several adapters, each applied to the rows
    ROW_ADAPTERS assigns it."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.updates: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # slot -> (A, B, scale)

    @property
    def weight(self) -> torch.Tensor:  # model code may inspect `proj.weight` (dtype, device)
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        slots = ROW_ADAPTERS.get()
        if slots is None or not self.updates:
            return y
        for slot in slots.unique().tolist():
            if slot not in self.updates:
                continue
            lora_a, lora_b, scale = self.updates[slot]
            rows = slots == slot
            update = (x[rows].to(lora_a.dtype) @ lora_a.t()) @ lora_b.t()
            y[rows] += (scale * update).to(y.dtype)
        return y


class AdapterSet:
    """The adapters served on one base model: load, unload, and the slots of a batch's rows."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.slots: dict[str, int] = {}
        self.retired: set[int] = set()  # slots of unloaded adapters whose weights are still in use
        self._next_slot = 0

    def load(self, adapter: LoraAdapter) -> None:
        if adapter.name in self.slots:
            raise TunelabError(f"adapter '{adapter.name}' is already loaded")
        layers = dict(self.model.named_modules())
        missing = [layer for layer in adapter.factors if layer not in layers]
        if missing:
            raise TunelabError(f"adapter '{adapter.name}' targets layers this model does not have: {missing[:3]}")
        device = next(self.model.parameters()).device
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        for layer_name, (lora_a, lora_b) in adapter.factors.items():
            layer = layers[layer_name]
            if not isinstance(layer, MultiLoraLinear):
                if not isinstance(layer, nn.Linear):
                    raise TunelabError(f"adapter '{adapter.name}': {layer_name} is not a linear layer")
                layer = MultiLoraLinear(layer)
                replace_module(self.model, layer_name, layer)
            expected = (layer.base_layer.out_features, layer.base_layer.in_features)
            if (lora_b.shape[0], lora_a.shape[1]) != expected:
                self._drop(slot)
                raise TunelabError(f"adapter '{adapter.name}': {layer_name} is {tuple(lora_b.shape)} x {tuple(lora_a.shape)}, the model's layer is {expected}")
            layer.updates[slot] = (lora_a.to(device), lora_b.to(device), adapter.scale)
        self.slots[adapter.name] = slot

    def unload(self, name: str, live: set[int] | None = None) -> None:
        """Forget the name; its weights go now, or once `release` is told no row uses its slot."""
        if name not in self.slots:
            raise TunelabError(f"adapter '{name}' is not loaded")
        self.retired.add(self.slots.pop(name))
        self.release(live or set())

    def release(self, live: set[int]) -> None:
        """Drop the weights of unloaded adapters whose slots no row uses (`live`)."""
        for slot in self.retired - live:
            self._drop(slot)
        self.retired &= live

    def _drop(self, slot: int) -> None:
        for module in self.model.modules():
            if isinstance(module, MultiLoraLinear):
                module.updates.pop(slot, None)

    def rows(self, names: list[str | None]) -> torch.Tensor:
        """The slot tensor of a batch whose row i uses adapter names[i] (None: the base)."""
        unknown = sorted({n for n in names if n is not None and n not in self.slots})
        if unknown:
            raise TunelabError(f"unknown adapter(s): {', '.join(unknown)} (loaded: {', '.join(sorted(self.slots)) or 'none'})")
        device = next(self.model.parameters()).device
        return torch.tensor([-1 if n is None else self.slots[n] for n in names], dtype=torch.long, device=device)
