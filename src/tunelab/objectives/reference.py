"""The reference policy of the preference objectives: the log-probabilities the policy is compared to.

Which one a run gets (`choose_reference`), so that at step 0 the reference is the policy itself:
- `objective.reference: MODEL`: that model, loaded frozen.
- a method whose switched-off model is its initial policy (the LoRA family): the same model with
  the adapter switched off (`Method.adapter_disabled`): no second copy of the weights.
- a method that trains the base's own weights (full, freeze, ...): a frozen copy made before step 1.
- any other method (prompt and prefix tuning, ETHER's random reflections, PiSSA's residual base, an
  adapter that starts from trained weights): its initial policy's log-probabilities, computed once
  before step 1 (precomputed, below).
`objective.precompute_reference: true` precomputes in every case, and frees the live reference.

Reference forwards run without gradient, dropout or NEFTune's noise (see LiveReference.log_probs).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.files import write_json_atomic
from tunelab.objectives.base import ObjectiveOptions

PRECOMPUTED_FILE = "reference_logps.json"


class ReferenceOptions(ObjectiveOptions):
    """Options of the objectives that compare the policy with a reference policy."""

    reference: str | None = Field(default=None, description="a model (alias | local dir | hub id) as the reference policy")
    # Compute the reference's log-probabilities once before step 1 and keep them with the run (resume
    # reads them back); the live reference is then freed.
    precompute_reference: bool = False


class LiveReference:
    """A model (the policy with its adapter off, the initial policy, a frozen copy, or a given model)
    run on each batch."""

    def __init__(self, model, context=None, kind: str = "frozen copy", is_policy: bool = False):
        self.model = model
        self.context = context  # a callable giving the context the forward runs in (adapter off)
        self.kind = kind
        # The policy's own model (adapter off, or before step 1) runs in the policy's mode, so that
        # its frozen weights compute as the policy's do (a training copy in bf16 where the CPU has
        # fast bf16 matmuls); a separate model runs in eval mode.
        self.is_policy = is_policy

    @classmethod
    def adapter_off(cls, method, model) -> LiveReference:
        """The policy itself with its adapter switched off (no second copy of the weights)."""
        return cls(model, lambda: method.adapter_disabled(model), kind="adapter off", is_policy=True)

    def for_split(self, split: str) -> LiveReference:
        return self

    @torch.no_grad()
    def log_probs(self, batch) -> torch.Tensor:
        """The reference's log-probability of each of the batch's sequences (`batch.sequence_keys`)."""
        if not self.is_policy:
            with _mode(self.model, training=False):
                return batch.reference_log_probs(self.model)
        with self.context() if self.context else nullcontext(), without_randomness(self.model):
            return batch.reference_log_probs(self.model)


class PrecomputedReference:
    """Log-probabilities computed once before step 1, looked up by sequence key."""

    kind = "precomputed"

    def __init__(self, tables: dict[str, dict[str, float]], split: str = "train"):
        self.tables = tables  # split -> sequence key -> log-probability
        self.split = split

    def for_split(self, split: str) -> PrecomputedReference:
        return PrecomputedReference(self.tables, split)

    def log_probs(self, batch) -> torch.Tensor:
        table = self.tables[self.split]
        missing = [key for key in batch.sequence_keys if key not in table]
        if missing:
            raise TunelabError(f"no precomputed reference log-probabilities for {self.split} sequences {missing[:3]}")
        return torch.tensor([table[key] for key in batch.sequence_keys], dtype=torch.float32, device=batch.sequences.input_ids.device)


def choose_reference(options, method, model, load_reference_model, starts_trained: bool = False) -> tuple[LiveReference, bool]:
    """The live reference of a run and whether its log-probabilities must be precomputed before step 1.
    `starts_trained`: the method starts from trained weights (method.from_peft), so its switched-off
    model is not its initial policy."""
    if options.reference:
        reference_model = load_reference_model(options.reference)
        reference_model.requires_grad_(False)
        return LiveReference(reference_model, kind=f"model {options.reference}"), options.precompute_reference
    if method.adapter_disabled(model) is not None and method.adapter_off_is_initial and not starts_trained:
        return LiveReference.adapter_off(method, model), options.precompute_reference
    if method.artifact == "model":  # the method trains the base's own weights
        frozen = copy.deepcopy(model)
        frozen.requires_grad_(False)
        return LiveReference(frozen, kind="frozen copy"), options.precompute_reference
    # The policy before its first step is the reference; it exists only now, so precompute.
    return LiveReference(model, kind="initial policy", is_policy=True), True


def precompute(reference: LiveReference, splits: dict[str, Iterable], device) -> PrecomputedReference:
    """Run `reference` on every forward batch of each split (an iterable of batches); a batch whose
    sequences all have their values already (a later epoch's) is skipped. The policy's own model
    runs in the mode the policy will run each split in: training for "train", eval otherwise."""
    tables: dict[str, dict[str, float]] = {}
    for split, batches in splits.items():
        table = tables.setdefault(split, {})
        with _mode(reference.model, training=split == "train") if reference.is_policy else nullcontext():
            for batch in batches:
                if all(key in table for key in batch.sequence_keys):
                    continue
                values = reference.log_probs(batch.to(device)).tolist()
                table.update(zip(batch.sequence_keys, values))
    return PrecomputedReference(tables)


def save_precomputed(reference: PrecomputedReference, output: Path) -> None:
    """Written to a temp file and renamed, so a crash leaves no partial table. JSON keeps every
    float32 value exactly (as the double it widens to)."""
    write_json_atomic(output / PRECOMPUTED_FILE, reference.tables)


def load_precomputed(output: Path) -> PrecomputedReference | None:
    path = output / PRECOMPUTED_FILE
    if not path.is_file():
        return None
    return PrecomputedReference(json.loads(path.read_text()))


@contextmanager
def without_randomness(model):
    """Dropout (modules, and attention's own `attention_dropout`) and NEFTune's noise off, every
    other layer in its mode. NEFTune's hook (train/neftune.py) reads the backbone's flag."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    random = [backbone] + [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) or hasattr(m, "attention_dropout")]
    modes = [m.training for m in random]
    for module in random:
        module.training = False
    try:
        yield
    finally:
        for module, mode in zip(random, modes):
            module.training = mode


@contextmanager
def _mode(model, training: bool):
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)
