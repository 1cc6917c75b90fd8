"""The federation config (`tunelab federate FED.yaml`): a base run config, the clients' data, the
rounds and the aggregator, and the task the global model is scored on after every round.

    base: sst2_base.yaml            # a run config (relative to this file) or an inline mapping:
                                    # model, method, objective, train (lr, batch, schedule, ...)
    output: runs/fed-sst2
    clients:                        # a list of data files, one per client ...
      file: runs/sst2-data/train.jsonl   # ... or one file split among `count` clients
      count: 4
      split: dirichlet              # iid | dirichlet
      alpha: 0.5                    # Dirichlet concentration (small: skewed clients)
      by: answer                    # a row's top-level field, or `answer`: its answer text
      seed: 0
    rounds: 5
    clients_per_round: 4            # default: every client, every round
    local_steps: 10                 # optimizer steps per client per round (default: base train.max_steps)
    aggregator: fedavg              # fedavg | flora | fedprox
    mu: 0.01                        # fedprox's proximal weight
    seed: 0                         # client selection and the clients' seeds (default: base train.seed)
    task: sst2                      # a built-in task, a task YAML, or an inline task mapping
    task_data: ../shared/data/sst2/dev.tsv
    task_options: {max_samples: 400}
    zero_shot: true                 # score the starting global model as round 0
    keep_round_weights: false       # keep every round's weights (clients' runs, global states)

Every client's run config is checked before anything runs: the base with its data file, `local_steps`
steps and its seed.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Discriminator, Field, Tag, model_validator

from tunelab.compare.sweep import _resolve, primary_metric
from tunelab.config import load_config, parse_config
from tunelab.config.schema import Strict, error_at
from tunelab.errors import TunelabError
from tunelab.eval.tasks import BUILTIN, TaskConfig, load_task
from tunelab.federated.split import split_rows
from tunelab.files import check_regular_file

AGGREGATORS = ("fedavg", "flora", "fedprox")


class SplitSpec(Strict):
    """One data file split among `count` clients."""

    file: str = Field(min_length=1)
    count: int = Field(ge=1)
    split: Literal["iid", "dirichlet"] = "iid"
    alpha: float | None = Field(default=None, gt=0)
    by: str | None = Field(default=None, min_length=1)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _split_options(self) -> SplitSpec:
        if self.split == "dirichlet":
            missing = [key for key in ("alpha", "by") if getattr(self, key) is None]
            if missing:
                raise error_at("split", self.split, f"dirichlet needs `{missing[0]}`" + (" (a row field, or `answer`)" if missing[0] == "by" else " (> 0)"))
        else:
            given = [key for key in ("alpha", "by") if getattr(self, key) is not None]
            if given:
                raise error_at(given[0], getattr(self, given[0]), f"`{given[0]}` is an option of split: dirichlet")
        return self


class ClientSpec(Strict):
    """One client's data file; `seed` tells its training seeds apart (default: its index)."""

    file: str = Field(min_length=1)
    seed: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _file_shorthand(cls, value: Any) -> Any:
        return {"file": value} if isinstance(value, str) else value


def _clients_kind(value: Any) -> str:
    return "split" if isinstance(value, (dict, SplitSpec)) else "files"


class FedConfig(Strict):
    base: str | dict[str, Any]
    output: str = Field(min_length=1)
    # One file split among clients (a mapping), or one data file per client (a list).
    clients: Annotated[Annotated[SplitSpec, Tag("split")] | Annotated[list[ClientSpec], Tag("files")], Discriminator(_clients_kind)]
    rounds: int = Field(ge=1)
    clients_per_round: int | None = Field(default=None, ge=1)
    local_steps: int | None = Field(default=None, ge=1)
    aggregator: Literal["fedavg", "flora", "fedprox"] = "fedavg"
    mu: float | None = Field(default=None, gt=0)
    seed: int | None = Field(default=None, ge=0)
    task: str | dict[str, Any]
    task_data: str | None = None
    # Overrides of the task's keys (max_samples, batch_size, ...), e.g. a subset of a built-in task.
    task_options: dict[str, Any] = Field(default_factory=dict)
    # The score federated.jsonl reports: a metric of the task (default: the task type's primary metric).
    metric: str | None = None
    zero_shot: bool = True
    # Keep every round's weights (each client's trained weights, fedavg's global state per round,
    # flora's folded bases); else only what resuming needs.
    keep_round_weights: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> FedConfig:
        if isinstance(self.clients, list) and not self.clients:
            raise error_at("clients", [], "at least one client")
        count = self.clients.count if isinstance(self.clients, SplitSpec) else len(self.clients)
        if self.clients_per_round is not None and self.clients_per_round > count:
            raise error_at("clients_per_round", self.clients_per_round, f"more than the {count} clients")
        if self.aggregator == "fedprox" and self.mu is None:
            raise error_at("aggregator", self.aggregator, "fedprox needs `mu` (> 0), the proximal term's weight")
        if self.aggregator != "fedprox" and self.mu is not None:
            raise error_at("mu", self.mu, f"`mu` is fedprox's option; aggregator is {self.aggregator}")
        return self


@dataclass(frozen=True)
class Client:
    """One client: its data file (written by the split, when `clients` splits a file), its seed and
    its number of examples n_k (FedAvg's weight)."""

    index: int
    file: Path
    seed: int
    examples: int
    labels: dict[str, int] | None = None  # rows per label, for a Dirichlet split


@dataclass
class Federation:
    config: FedConfig
    source: str
    output: Path
    base: dict  # the base run config, validated and dumped whole (data paths absolute)
    clients: list[Client]
    task: TaskConfig
    metric: str
    seed: int
    local_steps: int
    clients_per_round: int
    # The split's files to write: path -> its rows as JSON lines.
    client_files: dict[Path, str] = field(default_factory=dict)

    def identity(self) -> dict:
        """What makes two federations the same run (compared on --resume)."""
        dumped = self.config.model_dump(mode="json")
        return {
            "config": {k: v for k, v in dumped.items() if k not in RESUMABLE_KEYS},
            "base": self.base,
            "task": self.task.model_dump(mode="json"),
            "clients": [{"file": str(c.file), "seed": c.seed, "examples": c.examples} for c in self.clients],
        }


# Keys a resumed federation may change: more rounds continue it; the cleanup policy changes no result.
RESUMABLE_KEYS = ("rounds", "keep_round_weights")
# The data files of a split's clients, under the output directory.
CLIENTS_DIR = "clients"
# The base's data.train: each client's file takes its place.
CLIENT_DATA = "(each client's data file)"


def load_federation(path: str | Path, overrides: list[str] | None = None) -> Federation:
    """The federation of a YAML file, every client's run config validated before anything runs."""
    path = Path(path)
    config = load_config(path, overrides, FedConfig)
    folder = path.parent
    output = _resolve(config.output, folder)
    base = _base_run(config.base, folder, path)
    method = base["method"]
    if config.aggregator == "flora":
        _check_flora(base, path)
    local_steps = config.local_steps or base["train"].get("max_steps")
    if local_steps is None:
        raise TunelabError(f"{path}: `local_steps`: not given, and the base config sets no train.max_steps (the steps of a client's round)")
    seed = config.seed if config.seed is not None else base["train"]["seed"]
    if seed < 0:
        raise TunelabError(f"{path}: `seed`: the base's train.seed {seed} is negative; give the federation a `seed` >= 0")
    clients, files = _clients(config, folder, output, path)
    task = _task(config, folder, path)
    metric = primary_metric(task, config.metric)
    fed = Federation(config, str(path), output, base, clients, task, metric, seed, local_steps, config.clients_per_round or len(clients), files)
    if base["train"].get("init_weights"):
        raise TunelabError(
            f"{path}: base.train.init_weights: the federation sets where each client starts (the global model); use base.method.from_peft to start it from an adapter"
        )
    from tunelab.federated.server import client_config  # the run config a client trains with
    from tunelab.methods import build_method

    probe = clients[0]
    checked = parse_config(client_config(fed, 1, probe, init_weights=None), f"{path}: base (as client {probe.index}'s run config)")
    if build_method(checked.method).prepare_steps:
        raise TunelabError(
            f"{path}: base.method: '{method['name']}' chooses what it trains from each run's own data (prepare), so clients would train different tensors; pick another method"
        )
    return fed


def _base_run(base: str | dict, folder: Path, where: Path) -> dict:
    """The base run config, validated, as a whole mapping with absolute data paths. Its data.train
    may be left out: each client's file replaces it."""
    placeholder = {"data": {"train": CLIENT_DATA}}
    if isinstance(base, dict):
        raw = copy.deepcopy(base)
        data = raw.setdefault("data", {})
        if isinstance(data, dict):
            data["train"] = CLIENT_DATA
        validated, source = parse_config(raw, f"{where}: base").to_dict(), folder
    else:
        source_file = _resolve(base, folder)
        try:
            check_regular_file(source_file, "run config")
        except TunelabError as err:
            raise TunelabError(f"{where}: base: {err}") from None
        validated, source = load_config(source_file, placeholder).to_dict(), source_file.parent
    if validated["data"].get("eval") and not Path(validated["data"]["eval"]).is_absolute():
        validated["data"]["eval"] = str((source / validated["data"]["eval"]).resolve())
    validated["data"]["train"] = CLIENT_DATA
    validated.pop("output", None)
    return validated


def _check_flora(base: dict, where: Path) -> None:
    """FLoRA stacks plain LoRA factors: s·B·A with nothing else trained, on a base it can fold them into."""
    method = base["method"]
    if method["name"] != "lora":
        raise TunelabError(f"{where}: aggregator: flora stacks LoRA factors (B_k, A_k); base.method is '{method['name']}': use method lora, or aggregator fedavg")
    if method.get("dora") or method.get("init") in ("pissa", "olora"):
        variant = "dora" if method.get("dora") else f"init: {method['init']}"
        raise TunelabError(f"{where}: aggregator: flora needs a plain LoRA update s·B·A; base.method has {variant}: use fedavg for it")
    if method.get("from_peft"):
        raise TunelabError(f"{where}: aggregator: flora starts from the base model (its rounds fold into it); base.method.from_peft is for fedavg and fedprox")
    if base["model"].get("quantize", "none") != "none":
        raise TunelabError(
            f"{where}: aggregator: flora folds each round's update into the base weights, which base.model.quantize: {base['model']['quantize']} "
            "would quantize again every round; use model.quantize: none, or fedavg"
        )


def _clients(config: FedConfig, folder: Path, output: Path, where: Path) -> tuple[list[Client], dict[Path, str]]:
    spec = config.clients
    if isinstance(spec, SplitSpec):
        source = _resolve(spec.file, folder)
        try:
            check_regular_file(source)
        except TunelabError as err:
            raise TunelabError(f"{where}: clients.file: {err}") from None
        parts = split_rows(source, spec.count, spec.split, spec.alpha, spec.by, spec.seed)
        clients, files = [], {}
        for index, part in enumerate(parts):
            file = output / CLIENTS_DIR / f"client-{index}.jsonl"
            files[file] = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in part.rows)
            clients.append(Client(index, file, index, len(part.rows), part.labels))
        return clients, files
    clients = []
    for index, entry in enumerate(spec):
        file = _resolve(entry.file, folder)
        try:
            check_regular_file(file, "client data file")
        except TunelabError as err:
            raise TunelabError(f"{where}: clients[{index}].file: {err}") from None
        clients.append(Client(index, file, entry.seed if entry.seed is not None else index, _count_rows(file)))
    return clients, {}


def _count_rows(path: Path) -> int:
    from tunelab.data.formats import read_rows

    return sum(1 for _ in read_rows(path))


def _task(config: FedConfig, folder: Path, where: Path) -> TaskConfig:
    spec = config.task if isinstance(config.task, dict) or config.task in BUILTIN else _resolve(config.task, folder)
    data = _resolve(config.task_data, folder) if config.task_data else None
    options = [f"{key}={json.dumps(value)}" for key, value in config.task_options.items()]
    try:
        task = load_task(spec, data, options, folder=folder)
        if task.data is not None:
            check_regular_file(Path(task.data), "task data file")
    except TunelabError as err:
        raise TunelabError(f"{where}: {'task_data' if config.task_data else 'task'}: {err}") from None
    return task


def client_seed(seed: int, client: int, round_number: int) -> int:
    """The train.seed of a client's run in a round: a function of the federation's seed, the
    client's and the round (data order, dropout, a fresh adapter's initialization)."""
    return int(np.random.SeedSequence([seed, client, round_number]).generate_state(1)[0] >> 1)


def selected_clients(fed: Federation, round_number: int) -> list[int]:
    """The clients that train in a round: `clients_per_round` of them drawn by (seed, round), sorted."""
    count = len(fed.clients)
    if fed.clients_per_round >= count:
        return list(range(count))
    chosen = np.random.default_rng([fed.seed, round_number]).choice(count, size=fed.clients_per_round, replace=False)
    return sorted(int(i) for i in chosen)
