"""Side-by-side speed and memory benchmark of tunelab's trainer against HF Trainer + peft."""

from tunelab.bench.runner import run_bench
from tunelab.bench.workload import Workload

__all__ = ["Workload", "run_bench"]
