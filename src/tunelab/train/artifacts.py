"""A finished run's weights on disk, and loading a run directory back as a ready model.

A run directory holds `config.yaml` (resolved) and either `adapter/` (the method's trainable
tensors, for methods that adapt a frozen base) or `model/` (a full Hugging Face checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from tunelab.config import RunConfig, load_config
from tunelab.errors import TunelabError
from tunelab.methods import Method, build_method
from tunelab.models import load_model

ADAPTER_FILE = "adapter.safetensors"


@dataclass
class LoadedRun:
    model: object
    tokenizer: object
    method: Method
    config: RunConfig


def save_artifacts(method: Method, model, tokenizer, config: RunConfig, output: Path) -> Path:
    """Write the final weights into `output/adapter` or `output/model`, atomically."""
    target = output / method.artifact
    staging = Path(tempfile.mkdtemp(prefix=f".{method.artifact}-", dir=output))
    if method.artifact == "model":
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    else:
        save_file({k: v.contiguous() for k, v in method.state_dict(model).items()}, staging / ADAPTER_FILE)
        info = {"method": config.method.model_dump(mode="json"), "base_model": config.model.name}
        (staging / "method.json").write_text(json.dumps(info, indent=2))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def load_run(run_dir: str | Path, device: str | None = None, dtype: str | None = None) -> LoadedRun:
    """The trained model of a run directory: base model + method + trained weights."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TunelabError(f"{run_dir} is not a run directory (no config.yaml)")
    overrides = {k: v for k, v in {"model.device": device, "model.dtype": dtype}.items() if v}
    config = load_config(run_dir / "config.yaml", [f"{k}={v}" for k, v in overrides.items()])
    method = build_method(config.method)
    if method.artifact == "model":
        weights = run_dir / "model"
        if not (weights / "config.json").is_file():
            raise TunelabError(f"{run_dir}: no trained model in {weights} (did the run finish?)")
        model, tokenizer = load_model(config.model.model_copy(update={"name": str(weights)}))
        method.attach(model)
        return LoadedRun(model, tokenizer, method, config)
    adapter = run_dir / "adapter" / ADAPTER_FILE
    if not adapter.is_file():
        raise TunelabError(f"{run_dir}: no trained adapter at {adapter} (did the run finish?)")
    model, tokenizer = load_model(config.model)
    method.attach(model)
    method.load_state_dict(model, load_file(adapter), source=str(adapter))
    return LoadedRun(model, tokenizer, method, config)
