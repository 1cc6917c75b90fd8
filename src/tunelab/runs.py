"""A finished run's weights on disk, and loading a run directory back as a ready model.

Training saves runs; eval, export and import read or write them without depending on training.
A run directory holds `config.yaml` (resolved), `run.json` (the run format and the tunelab that
wrote it), and either `adapter/` (the method's trainable tensors, for methods that adapt a frozen
base) or `model/` (a full Hugging Face checkpoint).
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from tunelab.config import RunConfig, load_config
from tunelab.errors import TunelabError
from tunelab.files import read_safetensors, staged_write, write_json_atomic
from tunelab.methods import Method, build_method
from tunelab.methods.peft_io import method_options_from_peft, read_peft_adapter
from tunelab.methods.registry import method_options_model
from tunelab.models.loader import load_model
from tunelab.objectives.base import Objective
from tunelab.objectives.registry import build_objective

ADAPTER_FILE = "adapter.safetensors"
RUN_FILE = "run.json"
# The layout of a run directory. Bump it when a change means an older tunelab would misread a run;
# a run without run.json predates the record and is format 1.
RUN_FORMAT = 1
# The objective's own trained tensors (a reward model's head), beside the method's weights.
OBJECTIVE_FILE = "objective.safetensors"


@dataclass
class LoadedRun:
    model: object
    tokenizer: object
    method: Method
    config: RunConfig
    objective: Objective


def save_artifacts(method: Method, model, tokenizer, config: RunConfig, output: Path, objective: Objective | None = None, state_dict: dict | None = None) -> Path:
    """Write the final weights into `output/adapter` or `output/model` (with the objective's own
    tensors, if it has any), atomically. `state_dict`: the model's, where `model.state_dict()`
    would not give it whole (a sharded model)."""
    target = output / method.artifact
    with staged_write(target) as staging:
        if objective is not None and objective.state_dict():
            save_file({k: v.contiguous() for k, v in objective.state_dict().items()}, staging / OBJECTIVE_FILE)
        if method.artifact == "model":
            model.save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
        else:
            save_file({k: v.contiguous() for k, v in method.state_dict(model).items()}, staging / ADAPTER_FILE)
            info = {"method": config.method.model_dump(mode="json"), "base_model": config.model.name}
            (staging / "method.json").write_text(json.dumps(info, indent=2))
    return target


def write_run_file(output: Path) -> None:
    write_json_atomic(output / RUN_FILE, {"run_format": RUN_FORMAT, "tunelab_version": importlib.metadata.version("tunelab")})


def check_run_format(run_dir: Path) -> None:
    """Refuse a run directory written in a layout this tunelab does not know (by a newer tunelab)."""
    try:
        written = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {"run_format": 1}
        run_format = written["run_format"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TunelabError(f'{run_dir / RUN_FILE}: unreadable (expected {{"run_format": N, ...}})') from None
    if run_format != RUN_FORMAT:
        by = f"tunelab {written.get('tunelab_version', '?')}"
        raise TunelabError(f"{run_dir} was written by {by} in run format {run_format}; this tunelab reads run format {RUN_FORMAT}: use a tunelab that does")


def load_run(run_dir: str | Path, device: str | None = None, dtype: str | None = None) -> LoadedRun:
    """The trained model of a run directory: base model + method + trained weights."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TunelabError(f"{run_dir} is not a run directory (no config.yaml)")
    check_run_format(run_dir)
    overrides = {k: v for k, v in {"model.device": device, "model.dtype": dtype}.items() if v}
    config = load_config(run_dir / "config.yaml", [f"{k}={v}" for k, v in overrides.items()])
    method = build_method(config.method)
    objective = build_objective(config.objective)
    weights = run_dir / method.artifact
    if method.artifact == "model":
        if not (weights / "config.json").is_file():
            raise TunelabError(f"{run_dir}: no trained model in {weights} (did the run finish?)")
        model, tokenizer = load_model(config.model.model_copy(update={"name": str(weights)}))
        method.attach(model)
    else:
        adapter = weights / ADAPTER_FILE
        if not adapter.is_file():
            raise TunelabError(f"{run_dir}: no trained adapter at {adapter} (did the run finish?)")
        model, tokenizer = load_model(config.model)
        method.attach(model)
        method.load_state_dict(model, read_safetensors(adapter), source=str(adapter))
    if (weights / OBJECTIVE_FILE).is_file():
        objective.attach(model)
        objective.load_state_dict(read_safetensors(weights / OBJECTIVE_FILE))
    return LoadedRun(model, tokenizer, method, config, objective)


def load_peft_model(peft_dir: str | Path, model_config) -> tuple[object, object, Method]:
    """(model, tokenizer, method): the base model of `model_config` (a config.ModelConfig) with the
    peft adapter at `peft_dir`, applied by the tunelab method of its peft_type."""
    options = method_options_from_peft(peft_dir)
    method = build_method(method_options_model(options["name"]).model_validate(options))
    model, tokenizer = load_model(model_config)
    method.attach(model)
    method.peft_import(model, *read_peft_adapter(peft_dir))
    return model, tokenizer, method
