"""Many LoRA adapters on one base model, in one forward (the S-LoRA / Punica idea).

Each linear layer any adapter targets becomes a `MultiLoraLinear`: the base projection runs once
for the whole batch, then each adapter's update is added to its own rows only: s·B(Ax) for a LoRA,
(W' − W)x for a method whose change of the layer is linear but not low-rank (W': its merged weight).
Which adapter a row uses is `ROW_ADAPTERS` (an adapter slot per batch row, -1 for the base alone),
set around a forward by `rows_using`, so no signature inside the model changes.

Adapters come from a tunelab run directory or a peft adapter directory, safetensors only. Methods
that change the forward other than through linear weights (prompt and prefix tuning, ReFT, LoFiT,
full fine-tuning, ...) are refused with a message naming the method.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab.config import load_config
from tunelab.config.schema import ModelConfig
from tunelab.errors import TunelabError
from tunelab.files import describe_path, read_safetensors
from tunelab.methods import build_method
from tunelab.methods.base import PEFT_PREFIX, LinearAdapterMethod
from tunelab.methods.peft_io import method_options_from_peft, read_peft_adapter
from tunelab.methods.registry import get_method_class, method_options_model
from tunelab.models.modules import replace_module
from tunelab.runs import ADAPTER_FILE, load_peft_model, load_run

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
class LayerUpdate:
    """One adapter's change of one linear layer: scale·B A (low rank), or the weight of its merged
    copy (`merged`, for an update that is linear but not low-rank)."""

    lora_a: torch.Tensor | None = None  # r x in
    lora_b: torch.Tensor | None = None  # out x r
    scale: float = 1.0
    merged: torch.Tensor | None = None  # out x in; AdapterSet.load keeps merged − base

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.merged.shape) if self.merged is not None else (self.lora_b.shape[0], self.lora_a.shape[1])


@dataclass
class ServedAdapter:
    name: str
    updates: dict[str, LayerUpdate]  # linear layer name -> its update
    kind: str  # "low-rank" or "merged": how it is applied (the README's table)


def read_adapter(name: str, source: str | Path, base_model: str) -> ServedAdapter:
    """An adapter from a tunelab run directory or a peft adapter directory, on `base_model`.
    A plain LoRA (rsLoRA, LoRA+ included) is read as its factors; any other method whose every
    change is to linear layers' weights (DoRA, PiSSA, VeRA, LoHa, LoKr, (IA)^3, OFT, BOFT, ...) as
    the merged weights of the layers it changes; other methods are refused."""
    source = Path(source)
    if (source / "config.yaml").is_file():
        config = load_config(source / "config.yaml")
        options, trained_on = config.method, config.model.name
    elif (source / "adapter_config.json").is_file():
        option_map = method_options_from_peft(source)
        options, trained_on = method_options_model(option_map["name"]).model_validate(option_map), None
    else:
        raise TunelabError(f"adapter '{name}': {describe_path(source)} is neither a tunelab run directory nor a peft adapter directory")
    if options.name == "lora" and not options.dora and options.init in ("kaiming", "gaussian"):
        tensors = _lora_tensors(name, source)
        scale = build_method(options).scaling
        updates = {}
        for key, lora_a in tensors.items():
            if key.endswith(".lora_A.weight"):
                layer = key.removesuffix(".lora_A.weight")
                lora_b = tensors.get(f"{layer}.lora_B.weight")
                if lora_b is None:
                    raise TunelabError(f"adapter '{name}': {layer} has lora_A but no lora_B")
                updates[layer] = LayerUpdate(lora_a, lora_b, scale)
        if not updates:
            raise TunelabError(f"adapter '{name}': no LoRA tensors in {source}")
        return ServedAdapter(name, updates, "low-rank")
    method_class = get_method_class(options.name)
    if not issubclass(method_class, LinearAdapterMethod):
        raise TunelabError(
            f"adapter '{name}': method '{options.name}' changes the forward in ways other than linear layers' weights, so it cannot share a batch with other adapters; "
            "serve the run on its own (a merged model, tunelab export --format merged, where the method can merge) as --model"
        )
    # The run's model with the method attached (a second copy of the base, for the duration): it
    # must be the served base, loaded without remote code, or W' − W would carry the bases' difference.
    if (source / "config.yaml").is_file():
        if config.model.trust_remote_code:
            raise TunelabError(f"adapter '{name}': {source} asks for trust_remote_code; the server does not run a run's remote code")
        if trained_on != base_model:
            raise TunelabError(f"adapter '{name}': trained on '{trained_on}', but the served base is '{base_model}' (serve it with --model {trained_on})")
        model, method = (run := load_run(source, device="cpu")).model, run.method
    else:
        model, _, method = load_peft_model(source, ModelConfig(name=base_model, device="cpu"))
    with torch.no_grad():
        updates = {layer: LayerUpdate(merged=adapter_layer.merged_weight().detach().clone()) for layer, adapter_layer in method.adapter_layers(model).items()}
    return ServedAdapter(name, updates, "merged")


def _lora_tensors(name: str, source: Path) -> dict[str, torch.Tensor]:
    """A plain LoRA's tensors, named by linear layer, from a run or a peft directory."""
    if (source / "config.yaml").is_file():
        weights = source / RUN_ADAPTER_FILE
        if not weights.is_file():
            raise TunelabError(f"adapter '{name}': {source} has no {RUN_ADAPTER_FILE} (not an adapter run, or unfinished)")
        return read_safetensors(weights)
    raw, _ = read_peft_adapter(source)
    return {key.removeprefix(PEFT_PREFIX): value for key, value in raw.items()}


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus the updates of several adapters, each applied to the rows
    ROW_ADAPTERS assigns it. The low-rank ones are concatenated along the rank, so every row's
    s·B(Ax) is two matmuls over the whole batch whatever the mix of adapters: x·Aᵀ for all of them,
    a per-row gate keeping only the row's own adapter's columns (scaled by its s, the others 0),
    then ·Bᵀ. A merged update's (W' − W)x is computed on its rows only."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.updates: dict[int, LayerUpdate] = {}  # slot -> update (a merged one holds merged − base)
        self.low_rank: tuple[torch.Tensor, ...] | None = None  # (gate row of each slot + 1, A, B, gates)

    @property
    def weight(self) -> torch.Tensor:  # model code may inspect `proj.weight` (dtype, device)
        return self.base_layer.weight

    def restack(self, slot_count: int) -> None:
        """Rebuild the concatenated low-rank factors after `updates` changed (slots < slot_count)."""
        low_rank = [(slot, u) for slot, u in self.updates.items() if u.merged is None]
        if not low_rank:
            self.low_rank = None
            return
        lora_a = torch.cat([u.lora_a for _, u in low_rank])  # (total rank, in)
        lora_b = torch.cat([u.lora_b for _, u in low_rank], dim=1)  # (out, total rank)
        gates = lora_a.new_zeros(len(low_rank) + 1, lora_a.shape[0])  # row 0: no update (the base's rows)
        gate_of = torch.zeros(slot_count + 1, dtype=torch.long, device=lora_a.device)  # slot + 1 -> gate row
        start = 0
        for row, (slot, update) in enumerate(low_rank, start=1):
            rank = update.lora_a.shape[0]
            gates[row, start : start + rank] = update.scale
            gate_of[slot + 1] = row
            start += rank
        self.low_rank = (gate_of, lora_a, lora_b, gates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        slots = ROW_ADAPTERS.get()
        if slots is None or not self.updates:
            return y
        if self.low_rank is not None:
            gate_of, lora_a, lora_b, gates = self.low_rank
            gate = gates[gate_of[slots + 1]].reshape(x.shape[0], *[1] * (x.dim() - 2), -1)  # (batch, 1, ..., total rank)
            y += (((x.to(lora_a.dtype) @ lora_a.t()) * gate) @ lora_b.t()).to(y.dtype)
        for slot, update in self.updates.items():
            if update.merged is not None and bool((rows := slots == slot).any()):
                y[rows] += (x[rows].to(update.merged.dtype) @ update.merged.t()).to(y.dtype)
        return y


class AdapterSet:
    """The adapters served on one base model: load, unload, and the slots of a batch's rows."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.slots: dict[str, int] = {}
        self.retired: set[int] = set()  # slots of unloaded adapters whose weights are still in use
        self._next_slot = 0

    def load(self, adapter: ServedAdapter) -> None:
        if adapter.name in self.slots:
            raise TunelabError(f"adapter '{adapter.name}' is already loaded")
        layers = dict(self.model.named_modules())
        missing = [layer for layer in adapter.updates if layer not in layers]
        if missing:
            raise TunelabError(f"adapter '{adapter.name}' targets layers this model does not have: {missing[:3]}")
        device = next(self.model.parameters()).device
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        try:
            for layer_name, update in adapter.updates.items():
                self._attach(adapter.name, slot, layers, layer_name, update, device)
        except BaseException:  # nothing of a half-loaded adapter stays
            self._drop(slot)
            raise
        self.slots[adapter.name] = slot
        self._restack()

    def _attach(self, name: str, slot: int, layers: dict[str, nn.Module], layer_name: str, update: LayerUpdate, device: torch.device) -> None:
        layer = layers[layer_name]
        if not isinstance(layer, MultiLoraLinear):
            if not isinstance(layer, nn.Linear):
                raise TunelabError(f"adapter '{name}': {layer_name} is not a linear layer")
            layer = MultiLoraLinear(layer)
            replace_module(self.model, layer_name, layer)
        expected = (layer.base_layer.out_features, layer.base_layer.in_features)
        if update.shape != expected:
            raise TunelabError(f"adapter '{name}': {layer_name} changes a {update.shape[0]} x {update.shape[1]} weight, the model's layer is {expected[0]} x {expected[1]}")
        if update.merged is not None:  # kept as its change from this base: the base still runs once for all rows
            base = layer.base_layer.weight.detach()
            update = LayerUpdate(merged=(update.merged.to(device, torch.float32) - base.float()).to(base.dtype))
        else:
            update = LayerUpdate(update.lora_a.to(device), update.lora_b.to(device), update.scale)
        layer.updates[slot] = update

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
        self._restack()

    def _restack(self) -> None:
        for module in self.model.modules():
            if isinstance(module, MultiLoraLinear):
                module.restack(self._next_slot)

    def rows(self, names: list[str | None]) -> torch.Tensor:
        """The slot tensor of a batch whose row i uses adapter names[i] (None: the base)."""
        unknown = sorted({n for n in names if n is not None and n not in self.slots})
        if unknown:
            raise TunelabError(f"unknown adapter(s): {', '.join(unknown)} (loaded: {', '.join(sorted(self.slots)) or 'none'})")
        device = next(self.model.parameters()).device
        return torch.tensor([-1 if n is None else self.slots[n] for n in names], dtype=torch.long, device=device)
