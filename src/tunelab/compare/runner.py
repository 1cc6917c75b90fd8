"""Run a sweep's cells (train, then score on the sweep's task) on a backend, resumably.

A cell's run directory holds its training run and, once scored, `cell.json`. Running a sweep again
skips every cell with a `cell.json`, scores a cell that finished training but not its eval, resumes
a cell that left checkpoints (exactly: resume is bitwise), and restarts one that left neither.

A finished cell is reused only if its run's config.yaml is the cell's config (its `output` aside)
and its record was scored on the same task.

Backends (`run_jobs`, which `federate` shares): `sequential` (in this process, one cell after
another), `process` (a local pool of worker processes, the CPU cores split among them) and `ray`
(one Ray task per cell, on whatever cluster `ray.init` connects to: a laptop, or `--ray-address`
for a real one). The driver keeps what each Ray task returns, so the leaderboard and its plots
need no storage shared with the nodes; run directories stay where their cells ran.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

from tunelab.compare.sweep import Sweep
from tunelab.console import console
from tunelab.errors import TunelabError
from tunelab.files import write_json_atomic

CELL_RESULT = "cell.json"
BACKENDS = ("sequential", "process", "ray")


def run_cell(name: str, seed: int, config: dict, task: dict, threads: int | None = None) -> dict:
    """Train (or resume, or skip) one cell and score it; its record, also written as `cell.json`."""
    import torch

    import tunelab
    from tunelab.config import parse_config
    from tunelab.eval.harness import evaluate_task
    from tunelab.eval.tasks import TaskConfig
    from tunelab.plots import training_losses
    from tunelab.train.checkpoint import newest_intact_checkpoint
    from tunelab.train.loop import config_changes

    run_dir = Path(config["output"])
    done = run_dir / CELL_RESULT
    trained = (run_dir / "report.json").is_file()
    if trained:  # by this config? (and scored on this task?)
        _refuse_changes(run_dir, config_changes(run_dir / "config.yaml", parse_config(config), frozenset({"output"})))
    if done.is_file():
        record = json.loads(done.read_text())
        _refuse_changes(run_dir, task_changes(record, task))
        return record
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    # `earlier`: seconds an interrupted earlier attempt spent on what this one keeps (all of its
    # training, or the training up to the checkpoint resumed from): counted in the wall seconds.
    if trained:
        report = json.loads((run_dir / "report.json").read_text())
        earlier = _training_seconds(report)
    else:
        checkpoint = newest_intact_checkpoint(run_dir / "checkpoints")
        earlier = _training_seconds(json.loads((checkpoint / "state.json").read_text())["state"]) if checkpoint else 0.0
        tunelab.train(config, resume=checkpoint is not None, overwrite=checkpoint is None and run_dir.exists())
        report = json.loads((run_dir / "report.json").read_text())
    evaluation = evaluate_task(run_dir, TaskConfig.model_validate(task))  # into run_dir/eval/<task>/
    steps, losses = training_losses(run_dir / "metrics.jsonl")
    record = {
        "cell": name,
        "seed": seed,
        "method": report["method"],
        "metrics": evaluation["metrics"],
        "trainable_params": report["trainable_params"],
        "peak_memory_mb": report["peak_memory_mb"],
        "tokens_per_s": report["tokens_per_s"],
        "train_seconds": report["train_seconds"],
        "eval_seconds": evaluation["seconds"],
        "wall_seconds": earlier + time.perf_counter() - started,
        "resumed_from_step": report.get("resumed_from_step"),
        "run_dir": str(run_dir),
        "train_losses": [list(point) for point in zip(steps, losses)],  # the loss curve, wherever the run dir lives
        "task": task,
    }
    write_json_atomic(done, record)
    return record


def _training_seconds(state: dict) -> float:
    return state["train_seconds"] + state["prepare_seconds"]


def task_changes(record: dict, task: dict) -> list[str]:
    """Where the task a record was scored on differs from `task` (both as validated, so that a
    JSON round trip does not count as a change)."""
    from tunelab.config import changed_keys
    from tunelab.eval.tasks import TaskConfig

    if "task" not in record:
        return ["task"]
    saved, current = (TaskConfig.model_validate(t).model_dump(mode="json") for t in (record["task"], task))
    return [f"task.{key}" for key in changed_keys(saved, current)]


def _refuse_changes(folder: Path, changed: list[str]) -> None:
    if changed:
        raise TunelabError(
            f"{folder}: this finished cell was run with another config or task (at {', '.join(changed[:8])}); remove {folder} to run it again, or give the sweep another output"
        )


def run_zero_shot(sweep: Sweep) -> dict:
    """The untrained base model's score on the task (cached like a cell)."""
    from tunelab.config import changed_keys
    from tunelab.eval.harness import evaluate_task

    folder = sweep.output / "zero_shot"
    done = folder / CELL_RESULT
    model, task = sweep.base.model.model_dump(mode="json"), sweep.task.model_dump()
    if done.is_file():
        record = json.loads(done.read_text())
        changed = task_changes(record, task) + [f"model.{key}" for key in changed_keys(record.get("config", {}), model)]
        _refuse_changes(folder, changed)
        return record
    evaluation = evaluate_task(sweep.base.model, sweep.task, out=folder)
    record = {
        "cell": "zero-shot (base model)",
        "seed": None,
        "method": "none",
        "metrics": evaluation["metrics"],
        "trainable_params": 0,
        "peak_memory_mb": None,
        "tokens_per_s": None,
        "train_seconds": 0.0,
        "eval_seconds": evaluation["seconds"],
        "wall_seconds": evaluation["seconds"],
        "resumed_from_step": None,
        "run_dir": str(folder),
        "train_losses": [],
        "config": model,
        "task": task,
    }
    write_json_atomic(done, record)
    return record


def run_sweep(
    sweep: Sweep, backend: str = "sequential", workers: int = 2, ray_address: str | None = None, ray_cpus_per_cell: float = 1, ray_gpus_per_cell: float = 0
) -> list[dict]:
    """Every cell's record, in grid order (zero-shot first when the sweep asks for it)."""
    check_backend(backend, workers)
    zero_shot = [run_zero_shot(sweep)] if sweep.config.zero_shot else []
    task = sweep.task.model_dump()
    jobs = [(cell.name, cell.seed, cell.config, task) for cell in sweep.cells]
    records = {i: run_cell(*job) for i, (job, cell) in enumerate(zip(jobs, sweep.cells)) if (cell.run_dir / CELL_RESULT).is_file()}
    pending = [i for i in range(len(jobs)) if i not in records]
    console.print(f"sweep: {len(jobs)} cells, {len(records)} already done, backend {backend}")
    results = run_jobs(
        run_cell,
        [jobs[i] for i in pending],
        backend,
        workers,
        ray_address,
        ray_cpus_per_cell,
        ray_gpus_per_cell,
        starting=lambda number, job: console.rule(f"cell {number}/{len(pending)}: {job[0]} (seed {job[1]})"),
        finished=lambda record: console.print(f"cell done: {record['cell']} (seed {record['seed']})"),
    )
    for i, record in zip(pending, results):
        records[i] = record
        done = sweep.cells[i].run_dir / CELL_RESULT
        if not done.is_file():  # the cell ran on a Ray node, without storage shared with this one
            done.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(done, record)
    return zero_shot + [records[i] for i in range(len(jobs))]


def check_backend(backend: str, workers: int) -> None:
    if backend not in BACKENDS:
        raise TunelabError(f"--backend {backend}: use one of {', '.join(BACKENDS)}")
    if workers < 1:
        raise TunelabError(f"--workers {workers}: at least 1")


def run_jobs(
    function,
    jobs: list[tuple],
    backend: str = "sequential",
    workers: int = 2,
    ray_address: str | None = None,
    ray_cpus: float = 1,
    ray_gpus: float = 0,
    starting=None,
    finished=None,
) -> list:
    """`function(*job)` of every job, in job order, on a backend: in this process one after
    another (`starting(number, job)` before each), in a pool of `workers` spawned processes, or
    one Ray task per job (`ray_cpus`, `ray_gpus` each). Off this process `function` gets one more
    argument, its torch threads (the pool's workers share the CPU cores; a Ray task has `ray_cpus`),
    and must be importable by name; `finished(result)` follows each job done there. Used by
    `compare` (a cell per job) and `federate` (a client's round per job)."""
    check_backend(backend, workers)
    if backend == "sequential":
        results = []
        for number, job in enumerate(jobs, 1):
            if starting is not None:
                starting(number, job)
            results.append(function(*job))
        return results
    if backend == "process":
        from tunelab.train.distributed import threads_per_process

        threads = threads_per_process(workers)
        results = [None] * len(jobs)
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(function, *job, threads): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = result = future.result()
                if finished is not None:
                    finished(result)
        return results
    results = _run_on_ray(function, jobs, ray_address, ray_cpus, ray_gpus)
    for result in results if finished is not None else []:
        finished(result)
    return results


def _run_on_ray(function, jobs: list[tuple], address: str | None, cpus: float, gpus: float) -> list:
    """The jobs' results, each job one Ray task holding `cpus` CPUs (its torch threads) and `gpus` GPUs."""
    with ray_session(address) as ray:
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(function)
        return ray.get([remote.remote(*job, max(1, int(cpus))) for job in jobs])


@contextmanager
def ray_session(address: str | None):
    """Ray (the module) connected for the block: to `address`, or a cluster started here, shut down
    when the block ends; a connection this process already holds is used and left open."""
    try:
        import ray
    except ImportError:
        raise TunelabError("--backend ray needs Ray: pip install 'tunelab[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()
