"""Small files written atomically (a reader, or a crash, never sees half a file), and tensors read
back from safetensors files with one clear error for a missing or damaged file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tunelab.errors import TunelabError


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: dict) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or corrupt file is a TunelabError naming it."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise TunelabError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise TunelabError(f"{path}: not a readable safetensors file ({err})") from None
