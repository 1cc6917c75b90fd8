"""`tunelab federate FED.yaml`: federated fine-tuning. Clients train from the global model on their
own data (ordinary `tunelab.train` runs), the server aggregates what they send (FedAvg / FedIT,
FLoRA's stacking, FedProx) and scores the global model on a task after every round; see
docs/federated.md."""

from __future__ import annotations

from tunelab.federated.config import FedConfig, Federation, load_federation
from tunelab.federated.server import Backend, run_federation


def federate(
    path,
    overrides: list[str] | None = None,
    resume: bool = False,
    backend: str = "sequential",
    workers: int = 2,
    ray_address: str | None = None,
    ray_cpus_per_client: float = 1,
    ray_gpus_per_client: float = 0,
) -> dict:
    """Run (or, with `resume`, finish) the federation of a YAML file; its report (report.json)."""
    fed = load_federation(path, overrides)
    return run_federation(fed, resume, Backend(backend, workers, ray_address, ray_cpus_per_client, ray_gpus_per_client))


__all__ = ["federate", "load_federation", "run_federation", "Backend", "FedConfig", "Federation"]
