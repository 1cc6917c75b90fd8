"""Training in several processes: data-parallel (`ddp`) or sharded (`fsdp`, PyTorch's FSDP2).

A run in N processes (ranks) is the same run as in one process with an N times larger step: each
step's samples are fixed by the step number (train/loop.py), every rank takes its contiguous share
of them, and each loss term is divided by its unit's count over the whole step on all ranks (an
all-reduced count), so the ranks' gradients add up to the one-process gradient. Then:

- `ddp`: every rank holds the whole model; after the step's backward passes the trainable
  gradients are summed over the ranks in one flat all-reduce (as DistributedDataParallel does with
  `no_sync` over an accumulated step) and every rank takes the same optimizer step. Not DDP's
  module wrapper: its reducer needs every rank to run the same number of backward passes, while
  here a rank's share of a step may need more token-bounded forwards than another's (or none at
  the end of an epoch), and methods and objectives call into the model's modules directly.
- `fsdp`: `fully_shard` on each decoder layer and on the model (FSDP2): parameters, gradients
  and optimizer moments are sharded over the ranks, gradients are reduce-scattered as sums. FSDP's
  collectives run inside forward and backward, so every rank runs the same number of forwards:
  a rank with fewer adds forwards of weight zero.

Rank 0 alone writes (metrics, report, artifacts, checkpoints' files) and shows progress, except
that under `fsdp` each rank writes its own shard of a checkpoint (torch.distributed.checkpoint).
Collectives time out (`train.distributed_timeout`), and a rank that finds a peer gone says which.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from tunelab.console import console
from tunelab.errors import RankLost, TunelabError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes; one process: rank 0 of 1, mode `none`."""

    rank: int = 0
    world: int = 1
    mode: str = "none"  # none | ddp | fsdp
    # (host, pid) of every rank: to name a rank that is gone.
    peers: tuple[tuple[str, int], ...] = ()
    owns_group: bool = False  # this run opened the process group (torchrun), not Ray Train

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def share(self, items: list) -> list:
        """This rank's contiguous share of a step's samples (rank 0 first; the last ranks may get
        fewer, or none)."""
        if self.world == 1:
            return items
        per_rank = -(-len(items) // self.world)
        return items[self.rank * per_rank : (self.rank + 1) * per_rank]

    def gather(self, value) -> list:
        """`value` from every rank, in rank order (small Python objects: counts, figures, flags)."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        with self.collective("gathering step figures"):
            dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        with self.collective("sharing rank 0's choice"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self, what: str) -> None:
        if self.world > 1:
            with self.collective(what):
                dist.barrier()

    @contextlib.contextmanager
    def writer_first(self):
        """Rank 0 runs the block first (it may fill a cache: tokenized data), then the others; a
        bad input that rank 0 finds ends every rank with its message, shown once (by rank 0)."""
        if self.world == 1:
            yield
            return
        if not self.is_writer:
            failure = self.broadcast(None)
            if failure is not None:
                raise TunelabError(failure)
            yield
            return
        try:
            yield
        except TunelabError as err:
            self.broadcast(str(err))
            raise
        self.broadcast(None)

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """`ddp`: each gradient becomes its sum over the ranks (one flat all-reduce)."""
        if self.mode != "ddp":
            return
        # Which tensors got a gradient on some rank: one that none did stays without (AdamW then
        # leaves it alone, as in one process).
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        with self.collective("summing gradients"):
            dist.all_reduce(present)
        for dtype in {p.dtype for p in params}:  # one flat all-reduce per dtype (a bf16 head beside fp32 LoRA)
            group = [p for p in params if p.dtype == dtype]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            with self.collective("summing gradients"):
                dist.all_reduce(flat)
            offset = 0
            for param in group:
                summed = flat[offset : offset + param.numel()].view_as(param)
                offset += param.numel()
                if param.grad is None:
                    param.grad = summed.clone()
                else:
                    param.grad.copy_(summed)
        for param, had in zip(params, present.tolist()):
            if not had:
                param.grad = None

    @contextlib.contextmanager
    def collective(self, what: str):
        """Turn a failed or timed-out collective into one message naming the rank that is gone."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except (RuntimeError, CheckpointException) as err:  # DCP wraps the failures of its ranks
            if not _communication_failed(err):
                raise
            raise RankLost(f"rank {self.rank} of {self.world}: {self._lost()} while {what} ({first_line(err)})") from None

    def _lost(self) -> str:
        host = socket.gethostname()
        local = [rank for rank, (peer_host, _) in enumerate(self.peers) if rank != self.rank and peer_host == host]
        # A killed peer's sockets close while the kernel is still tearing the process down: give
        # its exit a moment to show before saying nobody here is gone.
        deadline = time.monotonic() + 3.0
        while not (gone := [rank for rank in local if not _alive(self.peers[rank][1])]) and local and time.monotonic() < deadline:
            time.sleep(0.05)
        if gone:
            return ", ".join(f"rank {rank} (pid {self.peers[rank][1]})" for rank in gone) + (" has" if len(gone) == 1 else " have") + " exited"
        return "another rank stopped answering"


SINGLE = Ranks()  # a one-process run


def join(timeout_s: float) -> Ranks:
    """Join the run's process group if this process is one of several: torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or a group Ray Train has already made."""
    if dist.is_initialized():
        ranks = Ranks(rank=dist.get_rank(), world=dist.get_world_size())
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        ranks = Ranks(rank=dist.get_rank(), world=dist.get_world_size(), owns_group=True)
    else:
        return Ranks()
    ranks = replace(ranks, peers=tuple(ranks.gather((socket.gethostname(), os.getpid()))))
    if not ranks.is_writer:
        console.quiet = True  # rank 0 shows progress; another rank's error still prints (cli)
    return ranks


def leave(ranks: Ranks) -> None:
    """Close the process group this run opened (one Ray Train made is Ray's to close)."""
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def resolve_mode(setting: str, method, objective, optimizer: str) -> str:
    """`auto`: `fsdp` for a method that trains the whole model (its weights and their optimizer
    moments are what outgrows one device), `ddp` for adapters (their few tensors replicate cheaply)."""
    if method.single_process_reason:
        raise TunelabError(f"method '{method.name}' trains in one process only: {method.single_process_reason}")
    mode = setting if setting != "auto" else ("fsdp" if method.artifact == "model" and method.shards else "ddp")
    if mode == "fsdp":
        if optimizer == "galore":
            raise TunelabError("train.distributed: fsdp: train.optimizer: galore projects each whole gradient matrix (its SVD), which no rank holds; use train.distributed: ddp")
        if not method.shards:
            raise TunelabError(
                f"train.distributed: fsdp: method '{method.name}' needs each trainable tensor whole on every rank ({method.whole_tensors_reason}); use train.distributed: ddp"
            )
        if objective.trainable_parameters():
            raise TunelabError(f"train.distributed: fsdp: objective '{objective.name}' trains its own head outside the sharded model; use train.distributed: ddp")
    return mode


def shard_model(model: nn.Module) -> None:
    """FSDP2: each decoder layer (the classes the model names in `_no_split_modules`) is one
    sharded unit, the rest (embeddings, final norm, head) the root's; gradients are reduced as sums,
    since each rank's loss is already its share of the whole step's mean."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    world = dist.get_world_size()
    _check_quantized_shards(model, world)
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world,))
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise TunelabError(f"train.distributed: fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


def _check_quantized_shards(model: nn.Module, world: int) -> None:
    """torchao's NF4 weights shard by rows, each inner tensor (codes, scales, their scales) cut in
    `world` equal parts: refuse, naming it, a weight whose blocks do not divide so."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import _INNER_TENSOR_NAMES_FOR_SHARDING, NF4Tensor

    for name, param in model.named_parameters():
        if isinstance(param, NF4Tensor):
            uneven = [attr for attr in _INNER_TENSOR_NAMES_FOR_SHARDING if getattr(param, attr).numel() % world] + (["rows"] if param.size(0) % world else [])
            if uneven:
                raise TunelabError(
                    f"train.distributed: fsdp: the NF4 weight {name} {tuple(param.shape)} cannot be cut in {world} equal shards ({uneven[0]} do not divide); "
                    "use train.distributed: ddp, or another number of processes"
                )


def unshard_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """Replace every sharded parameter by its whole value on every rank (a collective), keeping
    tied weights tied, and return the model's whole state dict (FSDP's state_dict hooks would
    register the shards again)."""
    from torch.distributed.tensor import DTensor

    gathered: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                if id(param) not in gathered:
                    gathered[id(param)] = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
                module._parameters[name] = gathered[id(param)]
    persistent = {
        f"{prefix}.{name}".lstrip("."): buffer
        for prefix, module in model.named_modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and name not in module._non_persistent_buffers_set
    }
    return {**dict(model.named_parameters(remove_duplicate=False)), **persistent}


def training_state_mb(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """MiB of training state this rank holds: its parameters (its shards under fsdp; a tied weight
    once), a gradient for each trainable one, and the optimizer's state."""
    from tunelab.models.quantize import storage_bytes

    params = {id(p): p for p in model.parameters()}.values()
    state = [value for entries in optimizer.state.values() for value in entries.values() if isinstance(value, torch.Tensor)]
    held = [storage_bytes(local_shard(p)) for p in params] + [storage_bytes(local_shard(p)) for p in params if p.requires_grad] + [storage_bytes(local_shard(t)) for t in state]
    return sum(held) / 2**20


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded DTensor; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as one process sees it whole: a sharded DTensor's full value (a collective)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_process(processes: int) -> int:
    """Torch threads for each of `processes` processes sharing this machine's cores."""
    return max(1, machine_cores() // max(1, processes))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its launcher) is gone too.
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _communication_failed(err: BaseException) -> bool:
    """A collective that failed because a peer is gone or silent: torch's DistError, or the plain
    RuntimeError that gloo raises (a closed connection, a timeout)."""
    return isinstance(err, dist.DistError) or any(mark in str(err) for mark in ("gloo", "NCCL", "Connection closed", "Timed out"))


def first_line(err: BaseException) -> str:
    """An error's first line (at most 300 characters): gloo's and Ray's messages run on."""
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
