"""Checkpoints that survive a crash at any instant, and exact resume from them.

A checkpoint is `OUTPUT/checkpoints/step-N/`: the trainable weights, the optimizer state, every RNG
state and the step (which fixes the data position). It is written into a hidden temp directory,
fsynced, and renamed into place (files.staged_write), so `step-N` either exists complete or not
at all. A failed write (disk full) removes its temp directory and leaves the checkpoints before it
as they were.
`checksums.json` records each file's SHA-256: a checkpoint damaged on disk later (a bit flip, a
truncated or deleted file) is found on resume, which then takes the newest intact one. Everything
is safetensors or JSON: loading a checkpoint never unpickles anything.
Under several ranks (train/distributed.py) the checkpoint holds every rank's RNG state; under fsdp
each rank writes its shards of the weights and optimizer state into `sharded/` with
torch.distributed.checkpoint (as safetensors files, whose header says where each shard lies), and
rank 0 writes the rest, checksums all and renames the directory into place.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tunelab.console import console
from tunelab.errors import TunelabError
from tunelab.files import read_safetensors, sha256_file, staged_write
from tunelab.train.distributed import SINGLE, Ranks, local_shard

STEP_DIR = re.compile(r"step-(\d+)")
CHECKSUMS_FILE = "checksums.json"
# Under fsdp: the ranks' shards of the trainable weights and optimizer state (torch.distributed.checkpoint).
SHARDED_DIR = "sharded"
SHARDED_OPTIONS = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)


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


def save_checkpoint(
    checkpoints_dir: Path, state: TrainState, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, keep: int, ranks: Ranks = SINGLE, model=None
) -> Path:
    """Write `step-N` (a collective when there are several ranks: every rank's RNG state goes in;
    under fsdp every rank writes its shard of the weights and optimizer state into rank 0's temp
    directory, and rank 0 renames it into place when all are written)."""
    rng = ranks.gather(_rng_state())
    final = checkpoints_dir / f"step-{state.step}"
    if ranks.is_writer:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
    with staged_write(final) if ranks.is_writer else contextlib.nullcontext() as staging:  # a failed write (disk full) leaves nothing of this step
        staging = ranks.broadcast(staging)
        settings = None
        if ranks.sharded:
            _, optimizer_state, tensors = _sharded_state(model, optimizer)
            settings = {name: value for name, value in optimizer_state.items() if not isinstance(value, torch.Tensor)}
            from torch.distributed.checkpoint import HuggingFaceStorageWriter  # fsdp only: a recent torch

            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(staging / SHARDED_DIR), save_distributed=True))
        if ranks.is_writer:
            _write_files(staging, state, trainable, optimizer, rng, ranks, settings)
    if ranks.is_writer:
        for stale in list_checkpoints(checkpoints_dir)[:-keep]:
            shutil.rmtree(stale)
    ranks.barrier(f"writing checkpoint {final}")
    return final


def _write_files(
    staging: Path, state: TrainState, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, rng: list, ranks: Ranks, sharded_settings: dict | None
) -> None:
    """Every file of a checkpoint (but the shards), then the checksums of them all."""
    meta = {"state": state.__dict__, "ranks": ranks.world, "distributed": ranks.mode}
    if ranks.sharded:
        meta["optimizer_settings"] = sharded_settings
    else:
        save_file({k: v.contiguous() for k, v in trainable.items()}, staging / "trainable.safetensors")
        optimizer_tensors, meta["optimizer"] = _flatten_optimizer(optimizer)
        save_file(optimizer_tensors, staging / "optimizer.safetensors")
    # Rank r's RNG tensors under `r.` (rank 0's unprefixed, as a one-process run writes them).
    save_file({(f"{rank}." if rank else "") + key: t for rank, (tensors, _) in enumerate(rng) for key, t in tensors.items()}, staging / "rng.safetensors")
    meta["rng"], meta["rng_of_ranks"] = rng[0][1], [rank_meta for _, rank_meta in rng[1:]]
    (staging / "state.json").write_text(json.dumps(meta))
    checksums = {str(file.relative_to(staging)): sha256_file(file) for file in sorted(staging.rglob("*")) if file.is_file()}
    (staging / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=1))


def _sharded_state(model, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Under fsdp: the trainable weights and optimizer state by parameter name, as their shards on
    this rank (frozen weights are the base model's, not saved), and the tensors among them that
    torch.distributed.checkpoint writes as safetensors shards (a tied weight once). The rest, the
    optimizer's hyperparameters, go into state.json."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=SHARDED_OPTIONS)
    tensors, seen = {}, set()
    for prefix, entries in (("model.", model_state), ("optimizer.", optimizer_state)):
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                local = local_shard(value)
                memory = (local.data_ptr(), local.dtype, local.shape) if local.numel() else name
                if memory not in seen:
                    seen.add(memory)
                    tensors[prefix + name] = value
    return model_state, optimizer_state, tensors


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint on disk (a missing file, a checksum that no longer matches), or None."""
    try:
        recorded = json.loads((checkpoint / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError):
        return f"{CHECKSUMS_FILE} is missing or unreadable"
    weights = () if any(name.startswith(SHARDED_DIR + "/") for name in recorded) else ("trainable.safetensors", "optimizer.safetensors")
    for name in (*weights, "rng.safetensors", "state.json"):
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


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer, ranks: Ranks = SINGLE, model=None) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """Restore the optimizer and this rank's RNG states; return the loop state and the trainable
    weights (None under fsdp: the shards went straight into the model)."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise TunelabError(f"checkpoint {path} is unreadable: {err}") from None
    written = (meta.get("ranks", 1), meta.get("distributed", "none"))
    if written != (ranks.world, ranks.mode):
        raise TunelabError(
            f"checkpoint {path} was written by {written[0]} process(es) (train.distributed: {written[1]}); this run has {ranks.world} "
            f"({ranks.mode}): resume it with the same number of processes, since that fixes each step's samples"
        )
    rng_tensors = read_safetensors(path / "rng.safetensors")
    prefix = f"{ranks.rank}." if ranks.rank else ""
    own_rng = {key.removeprefix(prefix): t for key, t in rng_tensors.items() if (key.startswith(prefix) if prefix else not key[0].isdigit())}
    _restore_rng(own_rng, meta["rng_of_ranks"][ranks.rank - 1] if ranks.rank else meta["rng"])
    if ranks.sharded:
        model_state, optimizer_state, tensors = _sharded_state(model, optimizer)  # this rank's shards, filled in place
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / SHARDED_DIR)))
        optimizer_state |= meta["optimizer_settings"]
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=SHARDED_OPTIONS)
        return TrainState(**meta["state"]), None
    trainable, optimizer_tensors = (read_safetensors(path / f"{name}.safetensors") for name in ("trainable", "optimizer"))
    optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, meta["optimizer"]))
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
