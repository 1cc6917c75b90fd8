"""`tunelab merge MERGE.yaml --out DIR`: several fine-tunings of one base combined into one model,
without training. Each weight is merged on its own (merging/tensors.py): the models' weights, or
their task vectors against the base (an adapter's is its update ΔW). The result is written as a
merged checkpoint, or (`output: lora`) as one LoRA adapter: exactly, by stacking the inputs'
factors, where the method is linear in the updates; else as the truncated SVD of the merged update.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tunelab.config import load_config
from tunelab.config.schema import ModelConfig
from tunelab.console import console, progress_bar
from tunelab.errors import TunelabError
from tunelab.export.exporters import write_peft_adapter
from tunelab.files import check_output_folder, staged_write
from tunelab.merging.config import MergeConfig
from tunelab.merging.sources import Source, base_of, kind_of, load_source
from tunelab.merging.tensors import DEFAULT_NORMALIZE, DEFAULT_RESCALE, LINEAR_METHODS, linear_weights, merge_task_vectors, slerp, stack_lora_factors, truncated_svd
from tunelab.methods import build_method
from tunelab.methods.registry import method_options_model
from tunelab.models.loader import load_model

REPORT_FILE = "merge.json"
CONFIG_FILE = "merge.yaml"


@dataclass
class Input:
    source: Source
    weight: float
    density: float


@dataclass
class Plan:
    """What one weight's merge needs: the method, its inputs (for slerp: start, end) and settings."""

    config: MergeConfig
    inputs: list[Input]
    normalize: bool
    rescale: bool

    @property
    def method(self) -> str:
        return self.config.merge_method

    def coefficients(self) -> list[float]:
        """c_i of a method linear in the updates: merged ΔW = Σ c_i ΔW_i."""
        weights = [i.weight for i in self.inputs]
        if self.method == "linear":
            return linear_weights(weights, self.normalize)
        total = sum(weights) if self.normalize and abs(sum(weights)) > 1e-8 else 1.0
        return [w * self.config.parameters.scale / total for w in weights]

    def merged(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The merged value of weight `name`, whose base value is `base` (fp32)."""
        sources = [i.source for i in self.inputs]
        if self.method == "slerp":
            return slerp(self.config.parameters.t, sources[0].weight(name, base), sources[1].weight(name, base))
        if self.method == "linear":
            return sum(c * s.weight(name, base) for c, s in zip(self.coefficients(), sources, strict=True))
        if not any(s.touches(name) for s in sources):  # no input changed it (adapters elsewhere)
            return base
        # DARE's drop is seeded per weight, so a weight's masks do not depend on which came before.
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.config.seed}:{name}".encode()))
        tasks = [s.task_vector(name, base) for s in sources]
        weights, densities = [i.weight for i in self.inputs], [i.density for i in self.inputs]
        scale = self.config.parameters.scale
        return base + merge_task_vectors(self.method, tasks, weights, densities, self.normalize, self.rescale, scale, generator)


def merge(config_path: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """Merge the models of the merge config at `config_path` into `out` (a new directory: a merged
    checkpoint or a peft LoRA adapter, with merge.yaml and merge.json). Nothing is left at `out`
    on failure."""
    config = load_config(config_path, overrides, MergeConfig)
    out = Path(out)
    check_output_folder(out)
    started = time.monotonic()
    base_name = _base_checkpoint(config)
    base, tokenizer = load_model(ModelConfig(name=base_name, device="cpu", dtype="float32"))
    plan = _plan(config, base_name, base)
    if config.output == "lora" and not all(i.source.is_adapter for i in plan.inputs if i.source.name != base_name):
        raise TunelabError("output: lora holds updates of linear layers only; a full checkpoint among the models changes every weight: write output: model")
    with staged_write(out) as staging:
        if config.output == "model":
            report = _write_model(plan, base, tokenizer, staging)
        else:
            report = _write_lora(plan, base, base_name, staging)
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False))
        report = {"merge_method": config.merge_method, "base_model": base_name, "models": [i.source.name for i in plan.inputs], **report}
        (staging / REPORT_FILE).write_text(json.dumps({**report, "seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n")
    return out


def _base_checkpoint(config: MergeConfig) -> str:
    """The model whose architecture (and, for task vectors, weights) the merge starts from:
    base_model; for slerp between adapters, the model they were trained from; for a `linear`
    merge without base_model, the adapters' own base, or the first model."""
    if config.base_model is None:
        bases = [base_of(entry.model) for entry in config.models]
        return next((b for b in bases if b), config.models[0].model)
    if kind_of(config.base_model) == "model":
        return config.base_model
    trained_from = base_of(config.base_model)
    if config.merge_method != "slerp":
        raise TunelabError(
            f"base_model: {config.base_model} is a fine-tuning; {config.merge_method} takes task vectors against the model it was trained from: base_model: {trained_from}"
        )
    return trained_from


def _plan(config: MergeConfig, base_name: str, base) -> Plan:
    """Each listed model loaded (a task-vector method skips the base itself, as mergekit does), its
    weights and updates checked against the base's shapes."""
    shared = config.parameters
    base_weights = dict(base.named_parameters())
    inputs = []
    for index, entry in enumerate(config.models):
        if entry.model == config.base_model and config.merge_method not in ("linear", "slerp"):
            continue
        if entry.model == base_name:  # its own weights, read before the merge overwrites them
            source = Source(entry.model, weights={n: p.detach().clone() for n, p in base_weights.items()})
        else:
            source = load_source(entry.model, base_name)
        _check_shapes(source, base_weights, f"models[{index}] ({entry.model})")
        weight = entry.parameters.weight if entry.parameters.weight is not None else (shared.weight if shared.weight is not None else 1.0)
        density = entry.parameters.density if entry.parameters.density is not None else (shared.density if shared.density is not None else 1.0)
        inputs.append(Input(source, weight, density))
    if config.merge_method == "slerp" and inputs[0].source.name != config.base_model:
        inputs.reverse()  # t = 0 is the base model
    if not inputs:
        raise TunelabError(f"models: only the base model is listed; {config.merge_method} merges other models into it")
    normalize = shared.normalize if shared.normalize is not None else DEFAULT_NORMALIZE.get(config.merge_method, False)
    rescale = shared.rescale if shared.rescale is not None else config.merge_method in DEFAULT_RESCALE
    return Plan(config, inputs, normalize, rescale)


def _check_shapes(source: Source, base_weights: dict, where: str) -> None:
    if source.weights is not None:
        missing = sorted(set(base_weights) - set(source.weights))
        if missing:
            raise TunelabError(f"{where}: not a checkpoint of the base's architecture: it has no {missing[0]} (and {len(missing) - 1} more)")
    shapes = {n: tuple(t.shape) for n, t in {**(source.weights or {}), **source.deltas}.items()}
    shapes.update({n: (b.shape[0], a.shape[1]) for n, (a, b, _) in source.factors.items()})
    for name, shape in shapes.items():
        if name not in base_weights or shape != tuple(base_weights[name].shape):
            found = tuple(base_weights[name].shape) if name in base_weights else "no such weight"
            raise TunelabError(f"{where}: {name} has shape {shape}, the base's is {found}: not fine-tuned from this base")


def _write_model(plan: Plan, base, tokenizer, directory: Path) -> dict:
    with torch.no_grad(), progress_bar(f"merge ({plan.method})") as bar:
        params = list(base.named_parameters())
        for name, param in bar.track(params, total=len(params)):
            param.copy_(plan.merged(name, param.detach().float()))
    base.to(getattr(torch, plan.config.dtype)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {"output": "model", "dtype": plan.config.dtype}


def _write_lora(plan: Plan, base, base_name: str, directory: Path) -> dict:
    """One LoRA adapter (peft format) holding the merged update of every weight an input adapts."""
    sources = [i.source for i in plan.inputs]
    updating = [s for s in sources if s.name != base_name]  # a listed base (linear, slerp) updates nothing
    base_weights = dict(base.named_parameters())
    targets = [name for name in base_weights if any(s.touches(name) for s in updating)]
    stacked = plan.method in LINEAR_METHODS and all(name in s.factors for s in updating for name in targets if s.touches(name))
    if plan.method == "linear" and abs(sum(plan.coefficients()) - 1) > 1e-6:
        raise TunelabError(
            f"output: lora: linear weights that sum to {sum(plan.coefficients()):g} (normalize: false) scale the base weights too, which no adapter holds; set parameters.normalize: true or write output: model"
        )
    rank = plan.config.rank or _summed_rank(updating)
    if not stacked and rank is None:
        raise TunelabError("rank: output: lora of a non-plain-LoRA input is a truncated SVD of the merged update; say its rank")
    factors, errors = {}, {}
    with torch.no_grad(), progress_bar(f"merge ({plan.method}) to LoRA") as bar:
        for name in bar.track(targets, total=len(targets)):
            if stacked:
                touching = [(s.factors[name], c) for s, c in zip(sources, plan.coefficients(), strict=True) if name in s.factors]
                factors[name] = stack_lora_factors([f for f, _ in touching], [c for _, c in touching])
            else:
                base_value = base_weights[name].detach().float()
                a, b, errors[name] = truncated_svd(plan.merged(name, base_value) - base_value, rank)
                factors[name] = (a, b)
    width = max(a.shape[0] for a, _ in factors.values())
    method = build_method(method_options_model("lora").model_validate({"name": "lora", "r": width, "alpha": width, "target": [n.removesuffix(".weight") for n in targets]}))
    method.attach(base)
    state = {}
    for name, (a, b) in factors.items():  # layers of a smaller summed rank padded with zeros: exact
        layer = name.removesuffix(".weight")
        state[f"{layer}.lora_A.weight"] = torch.cat([a, a.new_zeros(width - a.shape[0], a.shape[1])])
        state[f"{layer}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], width - b.shape[1])], dim=1)
    method.load_state_dict(base, state, source="the merged update")
    write_peft_adapter(method, base, base_name, directory)
    report = {"output": "lora", "rank": width, "exact": stacked}
    if errors:
        values = list(errors.values())
        report["svd_relative_error"] = {"max": max(values), "mean": sum(values) / len(values), "by_weight": errors}
        console.print(f"truncated SVD to rank {rank}: relative error (Frobenius) mean {report['svd_relative_error']['mean']:.3g}, max {max(values):.3g}")
    return report


def _summed_rank(sources: list[Source]) -> int | None:
    """The inputs' LoRA ranks summed (None when an input is not a plain LoRA)."""
    if any(s.deltas or not s.factors for s in sources):
        return None
    return sum(max(a.shape[0] for a, _, _ in s.factors.values()) for s in sources)
