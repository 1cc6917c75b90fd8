"""Reading adapters saved by the peft library: which tunelab method and options they are, and their tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tunelab.errors import TunelabError
from tunelab.files import describe_path, read_safetensors, read_text
from tunelab.methods.registry import get_method_class, method_names

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def read_peft_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise TunelabError(f"{describe_path(directory)}: not a peft adapter directory (no {CONFIG_FILE})")
    try:
        config = json.loads(read_text(path, "peft adapter config"))
    except json.JSONDecodeError as err:
        raise TunelabError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise TunelabError(f"{path}: no peft_type in the adapter config")
    return config


def method_options_from_peft(directory: str | Path) -> dict[str, Any]:
    """tunelab method options (a config mapping) equivalent to the peft adapter in `directory`."""
    config = read_peft_config(directory)
    source = str(Path(directory) / CONFIG_FILE)
    classes = [get_method_class(name) for name in method_names()]
    by_type = {cls.peft_type: cls for cls in classes if cls.peft_type}
    peft_type = str(config["peft_type"])
    if peft_type not in by_type:
        raise TunelabError(f"{source}: peft_type {peft_type} has no tunelab method (tunelab reads: {', '.join(sorted(by_type))})")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise TunelabError(f"{source}: task_type {config['task_type']} is not a causal LM adapter")
    options = by_type[peft_type].options_from_peft(config, source)
    if isinstance(options.get("target"), list):
        # target_modules may be a list written for several architectures; the names this adapter
        # has weights for are the ones that must exist in the base it is loaded on.
        keys = _tensor_names(Path(directory) / WEIGHTS_FILE)
        used = [name for name in options["target"] if any(f".{name}." in f".{key}" for key in keys)]
        options["target"] = used or options["target"]
    return options


def _tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header ([] when it is missing or unreadable: reading its tensors says why)."""
    try:
        with safe_open(path, framework="pt") as weights:
            return list(weights.keys())
    except (OSError, SafetensorError):
        return []


def read_peft_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, source) of a peft adapter directory; only safetensors are read (no unpickling)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        found = sorted(p.name for p in Path(directory).glob("adapter_model.*"))
        hint = f" (found {found}: tunelab reads safetensors only, never pickles)" if found else ""
        raise TunelabError(f"{directory}: no {WEIGHTS_FILE}{hint}")
    return read_safetensors(path), str(path)
