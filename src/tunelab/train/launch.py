"""`tunelab train --nproc N`: the same command in N processes on this machine, started by torchrun's
launcher (torch.distributed.launcher: an elastic agent with a c10d rendezvous on a free local
port, as `torchrun --standalone` does). Several machines: run `torchrun --nnodes ... -m tunelab
train` on each, with torchrun's rendezvous options."""

from __future__ import annotations

import logging
import os
import sys
import uuid

from tunelab.console import console
from tunelab.train.distributed import threads_per_process


def launch_processes(nproc: int, tunelab_args: list[str]) -> int:
    """Run `tunelab TUNELAB_ARGS` as ranks 0..nproc-1 and wait; the exit code of the first rank
    that failed (each rank printed its own message), or 0."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:  # the ranks share the machine's cores (torchrun does the same)
        os.environ["OMP_NUM_THREADS"] = str(threads_per_process(nproc))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks and the line below say what failed
    try:
        elastic_launch(config, sys.executable)("-m", "tunelab", *tunelab_args)
    except SignalException as stopped:  # Ctrl-C or SIGTERM to the launcher: it passed the signal on to the ranks
        return 128 + stopped.sigval
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        # A rank's error (printed by the rank), or a stop on SIGINT/SIGTERM after a checkpoint (130, 143).
        if failure.exitcode in (1, 130, 143):
            return failure.exitcode
        how = f"was killed by signal {-failure.exitcode}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
        console.print(f"[bold red]error:[/] rank {rank} of {nproc} {how} (pid {failure.pid}); the other ranks were stopped", highlight=False, soft_wrap=True)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return 0
