"""What every adaptation method is, and the machinery they share (targeting and wrapping linear layers).

A method is one class that knows how to attach itself to a model, list its trainable parameters,
save/load its state, and merge into the base weights where that is mathematically possible.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.models.modules import replace_module
from tunelab.models.quantize import QuantizedLinear, dequantize

# The target mask (shaped like input_ids, True where a loss falls) of the training or eval forward
# that is running, for method hooks inside the model that must tell prompt positions from targets
# (ReFT intervenes on prompt tokens only); None in every other forward (generation, plain calls).
# The objectives' seam sets it around every objective's forwards (objectives/base.py), so no
# signature inside the model changes.
FORWARD_TARGETS: ContextVar[torch.Tensor | None] = ContextVar("forward_targets", default=None)


@contextmanager
def visible_targets(targets: torch.Tensor | None):
    """FORWARD_TARGETS is `targets` inside the block."""
    token = FORWARD_TARGETS.set(targets)
    try:
        yield
    finally:
        FORWARD_TARGETS.reset(token)


class MethodOptions(BaseModel):
    """Options every method has; each method subclasses this with its own (unknown keys fail)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str
    # A peft adapter directory to start from: its adapter_config.json sets the options (see
    # config/loader.py) and training begins from its weights.
    from_peft: str | None = None


class LinearTargetOptions(MethodOptions):
    """Options of methods that wrap linear layers: which ones (see `find_target_linears`)."""

    target: Literal["all-linear"] | list[str] = "all-linear"


# peft's target_modules for Llama-family models when none are given (the mapping most of its tuners share).
PEFT_LLAMA_TARGET = ("q_proj", "v_proj")


class PeftDefaultTargetOptions(LinearTargetOptions):
    """Linear-layer options whose default target is peft's: queries and values."""

    target: Literal["all-linear"] | list[str] = Field(default_factory=lambda: list(PEFT_LLAMA_TARGET))


class Method(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]
    # Where the final weights of a run go: "adapter" (only the trainable tensors) or "model" (a full
    # Hugging Face checkpoint).
    artifact: ClassVar[str] = "adapter"
    # The method's `peft_type` in peft's adapter_config.json; None when peft has no such method.
    peft_type: ClassVar[str | None] = None
    # Whether it is exact on rows that pack several samples behind a block-causal mask (used when
    # the model cannot take padding-free attention).
    supports_mask_packing: ClassVar[bool] = True
    # Whether the method computes a token the same wherever its sample starts in a forward, so a
    # shared prompt may be computed once for several sequences (data/batching.py's
    # make_shared_prefix_batch). Not so for virtual tokens or ReFT's prompt-position interventions.
    shares_prefixes: ClassVar[bool] = True
    # Whether `merge` can fold the trained state into the base weights (a change of weights).
    mergeable: ClassVar[bool] = False
    # Whether it trains exactly with its tensors sharded over ranks (train.distributed: fsdp): its
    # state is its parameters, updated elementwise, and read only inside the model's forward. If
    # not, `whole_tensors_reason` says why it needs each tensor whole (it then trains under ddp).
    shards: ClassVar[bool] = False
    whole_tensors_reason: ClassVar[str] = "it is not verified to train exactly on sharded parameters"
    # Why the method cannot train in several processes at all (state it gathers from each rank's own
    # gradients, which no all-reduce sees), or None.
    single_process_reason: ClassVar[str | None] = None
    # How many training steps' micro-batches `prepare` gets; 0: the method has no `prepare`.
    prepare_steps: int = 0

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
            raise TunelabError(f"{source}: weights do not fit method '{self.name}' on this model (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
        with torch.no_grad():
            for name, param in params.items():
                if param.shape != state[name].shape:
                    raise TunelabError(f"{source}: tensor '{name}' has shape {tuple(state[name].shape)}, the model expects {tuple(param.shape)}")
                param.copy_(state[name])

    # A reference policy for the preference objectives without a second copy of the weights: the base
    # with the method switched off, valid when that is the policy at initialization (see
    # objectives/reference.py, which falls back to a frozen copy or precomputed log-probabilities).

    def adapter_disabled(self, model: nn.Module) -> AbstractContextManager | None:
        """A context in which `model` computes as its base without this method, or None when the
        method has no adapter to switch off (it trains the base's own weights: full, freeze, ...)."""
        return None

    @property
    def adapter_off_is_initial(self) -> bool:
        """Whether the model with the method switched off computes as the freshly attached method
        does (the method starts as the identity and leaves the base weights as they were), so the
        adapter-off model is the policy at step 0."""
        return False

    def store_frozen_weights(self, model: nn.Module, dtype: torch.dtype) -> bool:
        """Give training a copy of the frozen weights in `dtype`, a faster matmul dtype than the
        activations' (evaluation keeps the originals); True if done. Only methods whose kernels
        mix dtypes can."""
        return False

    # Training hooks. The loop calls them in this order each step: param_groups once at the start,
    # then per step: forward/backward of the micro-batches, regularization (its backward), the
    # optimizer step, after_step (gradients still present), zero_grad.

    def prepare(self, model: nn.Module, batches: list, loss_fn) -> None:
        """Choose what trains from training data, once, on a fresh run (after attach, before the
        optimizer exists): `batches` are the micro-batches of the first `prepare_steps` steps and
        `loss_fn(model, batch)` their loss sum (divide by `batch.n_targets`). The choice must be
        part of `state_dict`, so that load_run and resume rebuild it without calling prepare."""

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer parameter groups; `lr_scale` multiplies the scheduled learning rate."""
        return [{"params": list(self.trainable_parameters(model).values()), "lr_scale": 1.0}]

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added once per optimizer step (after the data loss), or None."""
        return None

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimizer step, before the gradients are cleared."""

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold for exact resume: the weights, plus any training state."""
        return self.state_dict(model)

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        self.load_state_dict(model, state, source)

    def merge(self, model: nn.Module) -> None:
        """Fold the method into the base weights, leaving a plain model. Not every method can."""
        raise TunelabError(
            f"method '{self.name}' cannot be merged into the base weights: its trained state is not a "
            "change of weights; export it with --format peft (or keep the run directory) instead"
        )

    def lora_factors(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """The trained update as plain LoRA factors, linear layer name -> (A, B, scale) with
        ΔW = scale · B A: what runtimes that apply LoRA adapters themselves (llama.cpp's --lora) take."""
        raise TunelabError(f"method '{self.name}' is not a plain LoRA update, the only adapter llama.cpp applies; export the merged model instead: --format gguf")

    # peft interop: an adapter in peft's format is adapter_config.json plus tensors named
    # `base_model.model.<our name>`: every method names its tensors as peft saves them.

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        """The method-specific keys of peft's adapter_config.json."""
        raise TunelabError(f"method '{self.name}' has no peft equivalent, so no peft export")

    def peft_export(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """(adapter_config.json, adapter_model.safetensors tensors) in the peft library's format."""
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", **self.peft_config(model), "inference_mode": True}
        tensors = {PEFT_PREFIX + name: t.contiguous() for name, t in self.state_dict(model).items()}
        return config, tensors

    def peft_import(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load a peft adapter's tensors into the attached method."""
        self.load_state_dict(model, {name.removeprefix(PEFT_PREFIX): t for name, t in tensors.items()}, source)

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        """This method's options (as a config mapping) from a peft adapter_config.json."""
        raise TunelabError(f"{source}: tunelab's '{cls.name}' cannot read peft adapters")


PEFT_PREFIX = "base_model.model."


def reject_peft_settings(config: dict[str, Any], source: str, supported: dict[str, Any]) -> None:
    """Fail on peft options that change the adapter in ways tunelab's method does not implement.

    `supported` maps each such key to the value(s) tunelab does handle (a value, or a tuple of them).
    """
    for key, allowed in supported.items():
        value = config.get(key)
        options = allowed if isinstance(allowed, tuple) else (allowed,)
        if value not in options and not (value in ({}, []) and None in options):
            raise TunelabError(f"{source}: peft option {key}={value!r} is not supported by tunelab (supported: {options})")


# Settings of peft's linear-layer tuners that tunelab reads as their defaults only.
PEFT_TARGETING_DEFAULTS = {
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "modules_to_save": None,
    "rank_pattern": None,
    "alpha_pattern": None,
}


def target_from_peft(config: dict[str, Any], source: str) -> str | list[str]:
    """peft's `target_modules` as a tunelab `target` (both match leaf names, full names and regexes)."""
    modules = config.get("target_modules")
    if modules is None:
        raise TunelabError(f"{source}: the adapter config has no target_modules")
    if isinstance(modules, str):
        return modules if modules == "all-linear" else [modules]  # peft: a regex matched in full
    return sorted(modules)


class AdapterLayer(nn.Module):
    """A frozen linear layer (`base_layer`, as peft names it) plus a method's trainable update.

    Subclasses register their tensors under peft's names and define `delta_weight` (an additive
    update: W' = W + ΔW) or override `merged_weight` (other updates, e.g. orthogonal: W' = R W).
    The generic forward computes y = W'x + b; subclasses replace it with a cheaper exact form.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer

    @property
    def weight(self) -> torch.Tensor:  # some model code inspects `proj.weight` (dtype, device)
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen weight as a dense tensor (a quantized one dequantized), in `dtype` if given."""
        return dequantize(self.base_layer.weight, dtype)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def frozen_layer(self) -> nn.Module:
        """What computes in this layer's place with the adapter switched off: the base layer, as
        this layer computes it."""
        return self.base_layer

    def merged_weight(self) -> torch.Tensor:
        weight = self.base_weight()
        return weight + self.delta_weight().to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.merged_weight()
        return F.linear(x.to(weight.dtype), weight, self.base_layer.bias).to(x.dtype)

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (a quantized base: into its
        dequantized weight, as a plain linear layer)."""
        with torch.no_grad():
            merged = self.merged_weight()
            if isinstance(self.base_layer, QuantizedLinear):
                return self.base_layer.dequantized(merged)
            self.base_layer.weight.copy_(merged)
        return self.base_layer


class LinearAdapterMethod(Method):
    """A method that wraps each targeted linear layer in an `AdapterLayer` (the LoRA family,
    VeRA, LoHa, LoKr, (IA)^3, OFT, BOFT): attach, merge and peft naming live here once."""

    Options: ClassVar[type[LinearTargetOptions]]
    mergeable = True

    @abstractmethod
    def wrap(self, name: str, base: nn.Linear) -> AdapterLayer:
        """The adapter layer that replaces linear layer `name`."""

    def attach(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        for name in find_target_linears(model, self.options):
            replace_module(model, name, self.wrap(name, model.get_submodule(name)))

    def adapter_layers(self, model: nn.Module) -> dict[str, AdapterLayer]:
        return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}

    @property
    def adapter_off_is_initial(self) -> bool:
        return True  # the family starts at ΔW = 0 (or R = I): methods that do not say otherwise

    @contextmanager
    def adapter_disabled(self, model: nn.Module):
        """The base layers stand in for their adapter layers inside the block."""
        layers = self.adapter_layers(model)
        for name, layer in layers.items():
            replace_module(model, name, layer.frozen_layer())
        try:
            yield
        finally:
            for name, layer in layers.items():
                replace_module(model, name, layer)

    def merge(self, model: nn.Module) -> None:
        for name, layer in self.adapter_layers(model).items():
            replace_module(model, name, layer.merged())

    def peft_export(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        config, tensors = super().peft_export(model)
        targeted = list(self.adapter_layers(model))
        # peft names the layers of the unwrapped model: an adapter layer's own children are not targets.
        inside = tuple(f"{name}." for name in targeted)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(inside)]
        config["target_modules"] = peft_target_modules(linears + targeted, targeted)
        return config, tensors


def output_embedding_names(model: nn.Module) -> set[str]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if output is not None and module is output}


def find_target_linears(model: nn.Module, options: BaseModel) -> list[str]:
    """Names of the nn.Linear modules that `options.target` selects.

    `all-linear` selects every linear layer except the output head (as peft does). A list of
    patterns selects a module when a pattern equals its name, is its last dotted component(s)
    (`q_proj` matches `model.layers.0.self_attn.q_proj`), or fully matches it as a regex. A name
    the config wrote must select something (a misspelt one would leave its layers untrained,
    silently); a method's default list, written for several architectures, needs one match in all.
    """
    target = options.target
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if target == "all-linear":
        excluded = output_embedding_names(model)
        return [name for name in linears if name not in excluded]
    patterns = [target] if isinstance(target, str) else list(target)
    chosen = [name for name in linears if name_matches(name, patterns)]
    unmatched = [p for p in patterns if not any(name_matches(name, [p]) for name in linears)]
    if not chosen or (unmatched and "target" in options.model_fields_set):
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise TunelabError(f"method.target: no linear layer matches {', '.join(map(repr, unmatched))}; this model has {leaves}")
    return chosen


def name_matches(name: str, patterns: list[str]) -> bool:
    """A pattern equals the module name, is its last dotted component(s), or fully matches it as a regex."""
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def decoder_layers(model: nn.Module, method: str) -> list[str]:
    """Names of the model's decoder layers: the module list with `config.num_hidden_layers` entries."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return [f"{name}.{k}" for k in range(count)]
    raise TunelabError(f"method '{method}': cannot find the decoder layers of {type(model).__name__}")


def selected_decoder_layers(model: nn.Module, method: str, indices: list[int] | None) -> list[nn.Module]:
    """The decoder layers at `indices` (a method's `layers` option; None: all of them)."""
    names = decoder_layers(model, method)
    chosen = range(len(names)) if indices is None else indices
    outside = [index for index in chosen if index >= len(names)]
    if outside:
        raise TunelabError(f"method.layers: {outside} out of range; this model has {len(names)} decoder layers (0 to {len(names) - 1})")
    return [model.get_submodule(names[index]) for index in chosen]


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


def cache_argument(module: nn.Module, kwargs: dict | None = None) -> str:
    """The name `module.forward` takes its KV cache under: transformers 5 renamed `past_key_values`
    to `cache` (and, given both, ignores the old name). A name already in `kwargs` wins."""
    for key in ("cache", "past_key_values"):
        if kwargs and key in kwargs:
            return key
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
