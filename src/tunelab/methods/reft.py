"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning for Language Models"): the model stays
frozen; at chosen decoder layers a low-rank edit of the hidden state is learned, applied at a few
positions of each sample's prompt only.

At the output hidden state h (d) of a chosen layer (pyreft's "block_output"), at a chosen position:

    h ← h + Rᵀ (W h + b − R h)

- R (r × d) has orthonormal rows: the subspace being edited. As in pyreft it is the weight of a
  bias-free Linear under `torch.nn.utils.parametrizations.orthogonal` (`rotate_layer`; the stored
  tensor is `rotate_layer.parametrizations.weight.original`, Householder reflectors, see below).
- W (r × d) and b (r): a plain Linear (`learned_source`), the values the subspace is set to.

Positions follow pyreft's "f<k>+l<k>" notation: the first and the last k tokens of each sample's
prompt, the tokens before its first target token (in training data prompt + answer; in generation
the whole first-pass input; later decoding steps are not intervened). On prompts shorter than
first + last, each side takes at most half of the prompt, as pyreft does, so no position is edited
twice (a prompt of 1 token gets no edit from "f1+l1").

How the hooks know the prompt inside the model's forward: a pre-hook on the backbone computes the
positions once per forward, from the target mask the objectives' seam publishes
(`methods.base.FORWARD_TARGETS`, training and eval forwards of every objective) or, without one, from the
attention mask (generation: every real token is prompt); samples start where `position_ids`
restart at 0 (padding-free and mask-packed rows) or at each row. A forward hook on each chosen
decoder layer then edits exactly those positions.

Not mergeable: the edit acts at selected positions, not through the weights.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from tunelab.errors import TunelabError
from tunelab.methods.base import FORWARD_TARGETS, Method, MethodOptions, cache_argument, selected_decoder_layers

POSITIONS = re.compile(r"f(?P<first>\d+)\+l(?P<last>\d+)|f(?P<only_first>\d+)|l(?P<only_last>\d+)")
# The unconstrained tensor of R's parametrization.
ROTATION_TENSOR = "rotate_layer.parametrizations.weight.original"


class ReftOptions(MethodOptions):
    name: Literal["reft"] = "reft"
    r: int = Field(default=4, ge=1, description="rank of the edited subspace")
    # Indices of the decoder layers to intervene on; None: all of them (the paper's choice for
    # commonsense and arithmetic reasoning).
    layers: list[int] | None = None
    # "f<k>+l<k>", "f<k>" or "l<k>": the first / last k prompt tokens (the paper's f7+l7).
    positions: str = "f7+l7"
    # One intervention per layer for the first and the last positions; false: one for each
    # (pyreft's default, twice the parameters).
    share_weights: bool = True
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the edit Rᵀ(Wh + b − Rh)")

    @field_validator("positions")
    @classmethod
    def _positions(cls, value: str) -> str:
        match = POSITIONS.fullmatch(value)
        if match is None or not any(int(n) for n in match.groupdict(default="0").values()):
            raise ValueError(f"'f<k>+l<k>', 'f<k>' or 'l<k>' with some k > 0 (e.g. 'f7+l7'), got {value!r}")
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0 or len(set(value)) != len(value)):
            raise ValueError(f"a non-empty list of distinct decoder layer indices (0, 1, ...), got {value}")
        return value

    @property
    def first_last(self) -> tuple[int, int]:
        """(k first, k last) prompt positions."""
        groups = POSITIONS.fullmatch(self.positions).groupdict(default="0")
        return int(groups["first"]) + int(groups["only_first"]), int(groups["last"]) + int(groups["only_last"])


class LoreftIntervention(nn.Module):
    """h + Rᵀ(W h + b − R h) for hidden states h (..., d), with R (r × d) orthonormal rows."""

    def __init__(self, width: int, r: int, dropout: float, device: torch.device):
        super().__init__()
        # Drawn on the CPU in fp32 whatever the model's device and dtype (the same init everywhere;
        # small updates would round away in bf16), as pyreft: R a random orthonormal basis.
        rotate = nn.Linear(width, r, bias=False, device="cpu", dtype=torch.float32)
        nn.init.orthogonal_(rotate.weight)
        # Without the trivialization pyreft uses, the parametrization is R = Householder(original):
        # `original` is the whole state (no d × d `base` buffer to save), so reloading it gives R
        # bit for bit. Its diagonal holds the reflections' signs (±1, never trained).
        self.rotate_layer = orthogonal(rotate, use_trivialization=False)
        self.learned_source = nn.Linear(width, r, device="cpu", dtype=torch.float32)
        self.to(device)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rotation = self.rotate_layer.weight  # R, computed once from the reflectors
        edit = (self.learned_source(h) - h @ rotation.t()) @ rotation
        return h + self.dropout(edit)


class Reft(Method):
    """LoReFT: a low-rank edit h + Rᵀ(Wh + b − Rh) of the hidden states at the first/last prompt tokens."""

    name = "reft"
    Options = ReftOptions
    shares_prefixes = False  # it edits the first/last prompt positions of each sample

    def attach(self, model: nn.Module) -> None:
        opts = self.options
        model.requires_grad_(False)
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if backbone is None or backbone is model:
            raise TunelabError(f"method '{self.name}': cannot find the backbone of {type(model).__name__}")
        layers = selected_decoder_layers(model, self.name, opts.layers)
        width = model.config.hidden_size
        if opts.r > width:
            raise TunelabError(f"method.r: {opts.r} orthonormal rows do not fit the hidden size {width}")
        first, last = opts.first_last
        sides = [side for side, k in (("first", first), ("last", last)) if k]
        self.groups = ["shared"] if opts.share_weights and len(sides) == 2 else sides
        device = model.get_input_embeddings().weight.device
        for layer in layers:
            # A submodule of the decoder layer: its tensors are named `<layer>.reft.<group>.*`.
            layer.reft = nn.ModuleDict({g: LoreftIntervention(width, opts.r, opts.dropout, device) for g in self.groups})
            layer.register_forward_hook(self._intervene)
        # Set by each backbone forward and kept until the next one: layers under activation
        # checkpointing rerun their forward (and this hook) during the backward pass.
        self._positions: dict[str, torch.Tensor] = {}
        backbone.register_forward_pre_hook(self._find_positions, with_kwargs=True)

    def param_groups(self, model: nn.Module) -> list[dict]:
        params = self.trainable_parameters(model)
        rotations = [p for name, p in params.items() if name.endswith(ROTATION_TENSOR)]
        others = [p for name, p in params.items() if not name.endswith(ROTATION_TENSOR)]
        # No weight decay on R's reflectors: decay would move the signs on their diagonal off ±1
        # (read as integers, 0.99 becomes 0 and zeroes a row of R), and R's norm is fixed anyway.
        return [{"params": others, "lr_scale": 1.0}, {"params": rotations, "lr_scale": 1.0, "weight_decay": 0.0}]

    def _find_positions(self, backbone: nn.Module, args: tuple, kwargs: dict) -> None:
        """Backbone pre-hook: the flat (row-major) token indices each intervention group edits."""
        if args:
            raise TunelabError(f"method '{self.name}': call the model with keyword arguments")
        cache = kwargs.get(cache_argument(backbone, kwargs))
        if cache is not None and cache.get_seq_length() > 0:  # a decoding step after the prompt
            self._positions = {}
            return
        reference = kwargs.get("input_ids")
        reference = kwargs["inputs_embeds"] if reference is None else reference
        rows, length = reference.shape[:2]
        device = reference.device
        columns = torch.arange(length, device=device).expand(rows, length)
        position_ids = kwargs.get("position_ids")
        starts = columns == 0 if position_ids is None else (columns == 0) | (position_ids.expand(rows, length) == 0)
        mask = kwargs.get("attention_mask")
        real = mask.bool() if mask is not None and mask.dim() == 2 else torch.ones(rows, length, dtype=torch.bool, device=device)
        targets = FORWARD_TARGETS.get()
        if targets is None:
            targets = torch.zeros(rows, length, dtype=torch.bool, device=device)
        elif targets.shape != (rows, length):
            raise TunelabError(f"method '{self.name}': target mask {tuple(targets.shape)} does not fit the input {(rows, length)}")
        starts, targets = starts.flatten(), targets.flatten()
        # A sample's prompt: its real tokens up to (and with) the one that predicts its first target.
        prompt = real.flatten() & (_count_before(targets, starts) == 0)
        first, last = prompt_positions(starts, prompt, *self.options.first_last)
        edited = {"first": first, "last": last, "shared": first | last}
        self._positions = {group: edited[group].nonzero().squeeze(1) for group in self.groups}

    def _intervene(self, layer: nn.Module, args: tuple, output):
        """Decoder-layer forward hook: the hidden states at this forward's positions are edited."""
        if not self._positions:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        flat = hidden.reshape(-1, hidden.shape[-1])
        for group, index in self._positions.items():
            intervention = layer.reft[group]
            edited = intervention(flat[index].to(intervention.learned_source.weight.dtype))
            flat = flat.index_put((index,), edited.to(flat.dtype))
        edited_hidden = flat.view_as(hidden)
        return (edited_hidden, *output[1:]) if isinstance(output, tuple) else edited_hidden


def _count_before(flags: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Per token: how many earlier tokens of its sample are flagged (flat tensors; samples begin at `starts`)."""
    counts = flags.long()
    before = counts.cumsum(0) - counts
    sample = starts.long().cumsum(0) - 1
    return before - before[starts][sample]


def prompt_positions(starts: torch.Tensor, prompt: torch.Tensor, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of each sample's first `first` and last `last` prompt tokens (flat tensors).

    When both sides are used, each takes at most half of the sample's prompt (pyreft's
    `get_intervention_locations`), so the two never overlap.
    """
    rank = _count_before(prompt, starts)  # the prompt token's index within its sample's prompt
    sample = starts.long().cumsum(0) - 1
    length = torch.zeros_like(rank).index_add_(0, sample, prompt.long())[sample]
    room = length // 2 if first and last else length
    is_first = prompt & (rank < room.clamp(max=first))
    is_last = prompt & (rank >= length - room.clamp(max=last))
    return is_first, is_last
