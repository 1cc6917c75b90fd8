"""`tunelab compare`: train a grid of methods under one budget, score each on one task, rank them."""

from tunelab.compare.leaderboard import write_leaderboard
from tunelab.compare.runner import run_sweep
from tunelab.compare.sweep import load_sweep


def compare(
    sweep_file, overrides=None, backend: str = "sequential", workers: int = 2, ray_address: str | None = None, ray_cpus_per_cell: float = 1, ray_gpus_per_cell: float = 0
) -> list[dict]:
    """Run (or finish) the sweep of `sweep_file` and write its leaderboard; the leaderboard rows."""
    sweep = load_sweep(sweep_file, overrides)
    records = run_sweep(sweep, backend, workers, ray_address, ray_cpus_per_cell, ray_gpus_per_cell)
    return write_leaderboard(sweep, records)


__all__ = ["compare", "load_sweep", "run_sweep", "write_leaderboard"]
