"""Training on a Ray cluster: the run's ranks as Ray Train workers (`TorchTrainer`).

Each worker runs the same `train()` as a torchrun rank (train/loop.py): Ray Train has already made
the process group, which `join()` uses as it is (train/distributed.py), so N workers give the run
of N ranks, the same run as one process with an N times larger step. The config travels as its
dict and is validated again on each worker; rank 0 writes the run directory, and its RunResult
(the return value of its training function) comes back to the caller.

Ray keeps its own records (the experiment folder of `ray.train.RunConfig.storage_path`) in a
temporary folder removed afterwards, never in the run directory. A failed worker ends the run at
once (no retry) in a TunelabError with the worker's message, a TunelabError raised on a worker (a
bad data file) with its own message and type.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tunelab import errors
from tunelab.config import RunConfig, parse_config
from tunelab.errors import RankLost, TunelabError
from tunelab.train.distributed import first_line, machine_cores, threads_per_process
from tunelab.train.loop import RunResult

# Train V2 sends a worker's print() calls to its logger, even those a library captures to read back
# (dill, under `datasets`' fingerprinting, disassembles functions into a captured stdout).
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# A TunelabError leaves a worker as RuntimeError(CARRIED, its class name, its message): Ray's
# controller unpickles a worker's error, and a tunelab class would make it import tunelab (torch,
# transformers: seconds) first.
CARRIED = "tunelab-error"
# The logger of Train V2's "Error in training function" (ray/train/v2/_internal/util.py).
RAY_USER_ERROR_LOGGER = "ray.train.v2._internal.util"


def train_on_ray(config: RunConfig, address: str, workers: int, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train `config` in `workers` Ray Train workers on the cluster at `address`: `local` starts a
    fresh one for this call, `auto`, `host:port` or `ray://host:port` joins a running one (a Ray
    connection this process already holds is used as it is). Returns rank 0's RunResult."""
    if workers < 1:
        raise TunelabError(f"Ray workers: {workers}: at least 1")
    try:
        import ray
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise TunelabError("--ray-address needs Ray: pip install 'tunelab[ray]'") from None

    started_here = not ray.is_initialized()
    if started_here:
        options: dict = {"logging_level": logging.ERROR}
        if hasattr(ray, "LoggingConfig"):  # the Python logging of every process of this job, where Ray has it
            options["logging_config"] = ray.LoggingConfig(log_level="ERROR")
        if address == "local":  # a worker holds one CPU: let the workers fit on this machine
            options["num_cpus"] = max(machine_cores(), workers)
        try:
            ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise TunelabError(f"--ray-address {address}: cannot start or reach a Ray cluster ({first_line(err)})") from None
    storage = tempfile.mkdtemp(prefix="tunelab-ray-")
    try:
        use_gpu = torch.cuda.is_available()
        v2 = _is_train_v2(ray.train)
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": config.to_dict(), "resume": resume, "overwrite": overwrite, "cwd": os.getcwd()},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=math.ceil(config.train.distributed_timeout)),
            # V1 runs a trainer actor besides the workers, which needs no CPU of its own.
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, **({} if v2 else {"trainer_resources": {"CPU": 0}})),
            run_config=ray.train.RunConfig(
                name="tunelab-train",
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=0),
                # V2's: the workers' environment, and Ray Train's own messages at WARNING and above.
                **({"worker_runtime_env": {"env_vars": WORKER_ENV}, "logging_config": ray.train.LoggingConfig(log_level="WARNING")} if v2 else {}),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as err:
            raise _run_error(err) from None
        returned = getattr(result, "return_value", None)  # Train V2: rank 0's return value
        if returned is not None:
            return RunResult(output_dir=Path(returned["output_dir"]), report=returned["report"])
        # Ray Train V1 (RAY_TRAIN_V2_ENABLED=0) returns nothing: read rank 0's report (this node's disk).
        report = Path(config.output) / "report.json"
        if not report.is_file():
            raise TunelabError(f"Ray Train finished but {report} is not on this machine: rank 0 ran on another node")
        return RunResult(output_dir=Path(config.output), report=json.loads(report.read_text()))
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started_here:
            ray.shutdown()


def _worker(options: dict) -> dict:
    """One rank: validate the config again, train, and hand rank 0's result back (plain data)."""
    import ray.train

    # Ray Train moves each worker into a folder of its own: relative paths of the config mean the
    # caller's working directory, where the machine has it.
    if os.path.isdir(options["cwd"]):
        os.chdir(options["cwd"])
    # The node's cores split among its workers (Ray starts a one-CPU worker with one thread).
    torch.set_num_threads(threads_per_process(ray.train.get_context().get_local_world_size()))
    from tunelab.train.loop import train

    logging.getLogger(RAY_USER_ERROR_LOGGER).addFilter(_no_tunelab_error_traceback)
    config = parse_config(options["config"], where="config (on a Ray worker)")
    try:
        result = train(config, options["resume"], options["overwrite"])
    except TunelabError as err:
        raise RuntimeError(CARRIED, type(err).__name__, str(err)) from None
    return {"output_dir": str(result.output_dir), "report": result.report}


def _no_tunelab_error_traceback(record: logging.LogRecord) -> bool:
    """Ray Train logs a failed worker's exception with its traceback (on the caller's console too);
    a TunelabError says all in its message, which reaches the caller: not that log."""
    message = record.getMessage()
    return not (message.startswith("Error in training function") and f"RuntimeError: ('{CARRIED}'" in message)


def _carried_error(failure: BaseException) -> TunelabError | None:
    """The TunelabError a worker raised, from the RuntimeError that carried it (None for another error)."""
    if not (isinstance(failure, RuntimeError) and len(failure.args) == 3 and failure.args[0] == CARRIED):
        return None
    kind = getattr(errors, failure.args[1], TunelabError)
    try:
        return kind(failure.args[2]) if isinstance(kind, type) and issubclass(kind, TunelabError) else TunelabError(failure.args[2])
    except TypeError:  # an __init__ that takes more than the message
        return TunelabError(failure.args[2])


def _run_error(err: Exception) -> Exception:
    """The TunelabError for a failed Ray Train run: a worker's own TunelabError as it is (the lowest
    rank's, one that is not about another rank gone first), else the first line of what failed,
    with the rank."""
    failures = getattr(err, "worker_failures", None)  # Train V2's WorkerGroupError: rank -> exception
    if failures:
        failures = {rank: _carried_error(failure) or failure for rank, failure in failures.items()}
        # A rank's own error first, before a rank's word on another that failed first (RankLost).
        rank, failure = min(failures.items(), key=lambda item: (not isinstance(item[1], TunelabError), isinstance(item[1], RankLost), item[0]))
        if isinstance(failure, TunelabError):
            return failure
        inner = getattr(failure, "health_check_failure", None)  # the worker's process died, most often
        return TunelabError(f"Ray Train worker of rank {rank} failed: {first_line(failure)}" + (f" ({first_line(inner)})" if inner is not None else ""))
    cause = getattr(err, "controller_failure", None) or _root_cause(err)
    cause = _carried_error(cause) or cause
    if isinstance(cause, TunelabError):
        return cause
    return TunelabError(f"Ray Train failed: {first_line(cause)}")


def _root_cause(err: BaseException) -> BaseException:
    """The innermost cause of a Ray error (V1 wraps a worker's exception in RayTaskErrors)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    return err


def _is_train_v2(train_module) -> bool:
    """Ray Train V2 (the default since Ray 2.5x), not V1 (older Ray, or RAY_TRAIN_V2_ENABLED=0)."""
    return "worker_runtime_env" in {field.name for field in dataclasses.fields(train_module.RunConfig)} and hasattr(train_module, "LoggingConfig")
