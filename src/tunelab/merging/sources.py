"""What each model of a merge contributes, per weight: a full checkpoint its weights, an adapter its
update ΔW of each layer it targets (exactly: a plain LoRA keeps its factors, ΔW = s·B·A, built
when a weight is merged; other linear-adapter methods their dense W' − W)."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.config import load_config
from tunelab.config.schema import ModelConfig
from tunelab.errors import TunelabError
from tunelab.methods.base import LinearAdapterMethod
from tunelab.methods.peft_io import read_peft_config
from tunelab.models.loader import load_model
from tunelab.runs import load_peft_model, load_run

Factors = tuple[torch.Tensor, torch.Tensor, float]  # (A [r × in], B [out × r], scale): ΔW = scale · B A


@dataclass
class Source:
    """One model of the merge. `weights`: a full checkpoint's parameters by name; or `factors` /
    `deltas`: an adapter's updates by weight name (`layer.weight`)."""

    name: str
    weights: dict[str, torch.Tensor] | None = None
    factors: dict[str, Factors] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        return self.weights is None

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """θ − θ_base of weight `name` (zero where an adapter leaves it alone)."""
        if self.weights is not None:
            return self.weights[name].float() - base
        if name in self.factors:
            a, b, scale = self.factors[name]
            return scale * (b.float() @ a.float())
        return self.deltas[name].float() if name in self.deltas else torch.zeros_like(base)

    def weight(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return self.weights[name].float() if self.weights is not None else base + self.task_vector(name, base)

    def touches(self, name: str) -> bool:
        return self.weights is not None or name in self.factors or name in self.deltas


def kind_of(path: str) -> str:
    """`run`, `peft` or `model` (anything `load_model` takes: alias, HF directory, hub id, .gguf)."""
    folder = Path(path)
    if (folder / "config.yaml").is_file():
        return "run"
    if (folder / "adapter_config.json").is_file():
        return "peft"
    return "model"


def base_of(path: str) -> str | None:
    """The base model an adapter (run or peft) was trained on, as its files name it."""
    kind = kind_of(path)
    if kind == "run":
        return load_config(Path(path) / "config.yaml").model.name
    if kind == "peft":
        return read_peft_config(path).get("base_model_name_or_path")
    return None


def load_source(path: str, base_model: str) -> Source:
    """The contribution of the model at `path` (a run directory, a peft adapter on `base_model`, or
    a full checkpoint), read into memory: its weights, or its adapter's updates."""
    kind = kind_of(path)
    if kind == "run":
        run = load_run(path, device="cpu", dtype="float32")
        model, method = run.model, run.method
    elif kind == "peft":
        model, _, method = load_peft_model(path, ModelConfig(name=base_model, device="cpu", dtype="float32"))
    else:
        model, _ = load_model(ModelConfig(name=path, device="cpu", dtype="float32"))
        return Source(path, weights={name: p.detach() for name, p in model.named_parameters()})
    if method.artifact == "model":  # full fine-tuning: the run's own checkpoint
        return Source(path, weights={name: p.detach() for name, p in model.named_parameters()})
    source = Source(path)
    if not isinstance(method, LinearAdapterMethod):
        raise TunelabError(f"{path}: method '{method.name}' does not change the weights of linear layers (it adds tokens, hooks or modules), so it has no update to merge")
    if getattr(method.options, "init", None) in ("pissa", "olora"):
        raise TunelabError(
            f"{path}: LoRA with init {method.options.init} trained against a residual base; export it with `tunelab export --format peft` (plain LoRA on the original weights) and merge that"
        )
    try:
        plain = method.lora_factors(model)
    except TunelabError:  # DoRA, VeRA, LoHa, OFT, ...: their update as it acts, W' − W
        plain = None
    with torch.no_grad():
        for layer_name, layer in method.adapter_layers(model).items():
            if plain is not None:
                a, b, scale = plain[layer_name]
                source.factors[f"{layer_name}.weight"] = (a.detach().clone(), b.detach().clone(), float(scale))
            else:
                source.deltas[f"{layer_name}.weight"] = (layer.merged_weight() - layer.base_weight()).float()
    del model, method
    gc.collect()
    return source
