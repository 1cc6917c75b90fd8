"""Checkpoints that survive a crash at any instant, and exact resume from them.

A checkpoint is `OUTPUT/checkpoints/step-N/`: the trainable weights, the optimizer state, every RNG
state and the step (which fixes the data position). It is written into a hidden temp directory,
fsynced, and renamed into place (files.staged_write), so `step-N` either exists complete or not
at all. A failed write (disk full) removes its temp directory and leaves the checkpoints before it
as they were.
`checksums.json` records each file's SHA-256: a checkpoint damaged on disk later (a bit flip, a
truncated or deleted file) is found on resume, which then takes the newest intact one. Everything
is safetensors or JSON: loading a checkpoint never unpickles anything.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tunelab.console import console
from tunelab.errors import TunelabError
from tunelab.files import read_safetensors, sha256_file, staged_write

STEP_DIR = re.compile(r"step-(\d+)")
CHECKSUMS_FILE = "checksums.json"


@dataclass
class TrainState:
    """What the loop needs beyond tensors to continue exactly where it stopped."""

    step: int
    tokens_seen: int
    train_seconds: float
    # The choice a method makes from training data before step 1 (LoFiT's heads, SubTuning's layers),
    # and precomputing the reference policy's log-probabilities.
    prepare_seconds: float = 0.0
    # Sampled completions that later steps still train on (GRPO's num_iterations: train/rollout.py).
    rollout: dict | None = None


def save_checkpoint(checkpoints_dir: Path, state: TrainState, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, keep: int) -> Path:
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{state.step}"
    with staged_write(final) as staging:  # a failed write (disk full) leaves nothing of this step
        _write_files(staging, state, trainable, optimizer)
    for stale in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(stale)
    return final


def _write_files(staging: Path, state: TrainState, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Every file of a checkpoint, then the checksums of them all."""
    save_file({k: v.contiguous() for k, v in trainable.items()}, staging / "trainable.safetensors")
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer)
    save_file(optimizer_tensors, staging / "optimizer.safetensors")
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, staging / "rng.safetensors")
    meta = {"state": state.__dict__, "optimizer": optimizer_meta, "rng": rng_meta}
    (staging / "state.json").write_text(json.dumps(meta))
    checksums = {file.name: sha256_file(file) for file in sorted(staging.iterdir())}
    (staging / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=1))


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint on disk (a missing file, a checksum that no longer matches), or None."""
    try:
        recorded = json.loads((checkpoint / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError):
        return f"{CHECKSUMS_FILE} is missing or unreadable"
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        if name not in recorded:
            return f"{CHECKSUMS_FILE} does not list {name}"
    for name, digest in recorded.items():
        file = checkpoint / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != digest:
            return f"{name} does not match its checksum (changed on disk since it was written)"
    return None


def newest_intact_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint whose files all match their checksums; each damaged newer one is named
    and passed over (training from an older one gives the same result, only later)."""
    for checkpoint in reversed(list_checkpoints(checkpoints_dir)):
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint
        console.print(f"[yellow]warning:[/] checkpoint {checkpoint} is damaged ({problem}): passing over it", highlight=False, soft_wrap=True)
    return None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories of interrupted writes are ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore the optimizer and RNG states; return the loop state and the trainable weights."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise TunelabError(f"checkpoint {path} is unreadable: {err}") from None
    trainable, optimizer_tensors, rng_tensors = (read_safetensors(path / f"{name}.safetensors") for name in ("trainable", "optimizer", "rng"))
    optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, meta["optimizer"]))
    _restore_rng(rng_tensors, meta["rng"])
    return TrainState(**meta["state"]), trainable


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = cuda_state
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, python_state, gauss = meta["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
