"""A comparison sweep: one base run config, one eval task, a grid of cells (methods and their
hyperparameters) times seeds, all under the same data, step budget and eval.

    base: base.yaml                 # a run config (relative to this file) or an inline mapping
    task: sst2                      # a built-in task, a task YAML, or an inline task mapping
    task_data: ../shared/data/sst2/dev.tsv
    output: runs/sst2-sweep
    seeds: [0, 1]
    zero_shot: true                 # score the untrained base model as the first row
    grid:
      - method: {name: lora, r: 8}
        train: {lr: 2.0e-3}
      - name: ia3
        method: {name: ia3}
        train: {lr: 1.0e-2}
      - method: {name: lora}
        vary: {method.r: [4, 16], train.lr: [1.0e-3, 3.0e-3]}   # the cartesian product: 4 cells

A cell's `method` replaces the base's method when it names another one (else it merges into it);
`train` merges key by key. The model, data, task, steps and batch (`train.max_steps`, `epochs`,
`batch_size`, `grad_accum`) are the base's for every cell: the budget is equal by construction.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from tunelab.config import RunConfig, load_config, parse_config
from tunelab.config.schema import Strict
from tunelab.errors import TunelabError
from tunelab.eval.tasks import BUILTIN, TaskConfig, load_task

# What a cell may not change: the equal budget (steps of equal batches).
FIXED_TRAIN_KEYS = ("max_steps", "epochs", "batch_size", "grad_accum")


class CellSpec(Strict):
    name: str | None = None
    method: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    vary: dict[str, list] = Field(default_factory=dict)


class SweepConfig(Strict):
    base: str | dict[str, Any]
    task: str | dict[str, Any]
    task_data: str | None = None
    output: str
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    zero_shot: bool = True
    # The leaderboard's score: a metric of the task (default: the task type's primary metric).
    metric: str | None = None
    grid: list[CellSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_seeds(self) -> SweepConfig:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        return self


@dataclass(frozen=True)
class Cell:
    """One grid cell at one seed: its run config (a plain dict, `output` its run directory)."""

    name: str
    seed: int
    config: dict

    @property
    def run_dir(self) -> Path:
        return Path(self.config["output"])


@dataclass
class Sweep:
    config: SweepConfig
    base: RunConfig
    task: TaskConfig
    cells: list[Cell]
    output: Path
    source: str
    metric: str


PRIMARY_METRIC = {
    "math_exact": "accuracy",
    "classification": "accuracy",
    "multiple_choice": "acc",
    "code_pass_at_k": None,  # pass@<first k>
    "json_fields": "json_record_match",
    "exact_match": "exact_match",
    "perplexity": "perplexity",
    "preference": "pairwise_accuracy",
}


def primary_metric(task: TaskConfig, chosen: str | None = None) -> str:
    return chosen or PRIMARY_METRIC[task.type] or f"pass@{task.k[0]}"


def lower_is_better(metric: str) -> bool:
    return metric in ("perplexity", "nll_per_token")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """The sweep of a YAML file, with every cell's run config validated before anything runs."""
    path = Path(path)
    config = load_config(path, overrides, SweepConfig)
    folder = path.parent
    output = _resolve(config.output, folder)
    base_raw = _base_mapping(config.base, folder)
    base = parse_config({**base_raw, "output": str(output / "base")}, f"{path}: base")
    spec = config.task if isinstance(config.task, dict) or config.task in BUILTIN else _resolve(config.task, folder)
    task = load_task(spec, _resolve(config.task_data, folder) if config.task_data else None, folder=folder)
    metric = primary_metric(task, config.metric)
    cells = []
    for index, spec in enumerate(config.grid):
        for name, raw in _expand(spec, base_raw, index, path):
            for seed in config.seeds:
                run_dir = output / "cells" / cell_folder_name(name) / f"seed-{seed}"
                cell_raw = copy.deepcopy(raw)
                cell_raw.setdefault("train", {})["seed"] = seed
                cell_raw["output"] = str(run_dir)
                parse_config(cell_raw, f"{path}: grid[{index}] ({name})")  # fails early, naming the cell
                cells.append(Cell(name, seed, cell_raw))
    folders = [c.run_dir for c in cells]
    repeated = sorted({c.name for c in cells if folders.count(c.run_dir) > 1})
    if repeated:
        raise TunelabError(f"{path}: grid cells share a run folder: {repeated} (give them distinct `name`s)")
    return Sweep(config, base, task, cells, output, str(path), metric)


def _resolve(value: str, folder: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else (folder / path).resolve()


def _base_mapping(base: str | dict, folder: Path) -> dict:
    """The base run config as a mapping (a file's validated content, relative data paths resolved)."""
    if isinstance(base, dict):
        return copy.deepcopy(base)
    source = _resolve(base, folder)
    loaded = load_config(source).to_dict()
    for split in ("train", "eval"):
        value = loaded["data"].get(split)
        if value and not Path(value).is_absolute():
            loaded["data"][split] = str((source.parent / value).resolve())
    return loaded


def _expand(spec: CellSpec, base: dict, index: int, where: Path) -> list[tuple[str, dict]]:
    """The cells of one grid entry: its overrides on the base, times the product of its `vary` lists."""
    for key in [*(f"train.{k}" for k in spec.train), *spec.vary]:
        if key in {f"train.{k}" for k in FIXED_TRAIN_KEYS}:
            raise TunelabError(f"{where}: grid[{index}]: `{key}` is fixed for every cell (the sweep's equal budget); set it in the base")
    cell = copy.deepcopy(base)
    if spec.method:
        same = spec.method.get("name", cell.get("method", {}).get("name")) == cell.get("method", {}).get("name")
        cell["method"] = {**cell.get("method", {}), **spec.method} if same else copy.deepcopy(spec.method)
    cell.setdefault("train", {}).update(copy.deepcopy(spec.train))
    method_name = cell.get("method", {}).get("name", "method")
    if not spec.vary:
        return [(spec.name or method_name, cell)]
    keys = list(spec.vary)
    expanded = []
    for values in itertools.product(*(spec.vary[k] for k in keys)):
        varied = copy.deepcopy(cell)
        for key, value in zip(keys, values):
            _set(varied, key, value, where, index)
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values))
        expanded.append((f"{spec.name or method_name}[{label}]", varied))
    return expanded


def _set(mapping: dict, key: str, value, where: Path, index: int) -> None:
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in ("method", "train"):
        raise TunelabError(f"{where}: grid[{index}].vary: `{key}` must be a method.* or train.* key")
    node = mapping
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def cell_folder_name(name: str) -> str:
    """A file-system-safe folder for a cell name."""
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", name)
