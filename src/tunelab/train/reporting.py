"""Where a run's metrics go: `metrics.jsonl` always, and the trackers named in `train.report_to`.

Every objective's step records and eval figures pass through one `MetricsSink`, so a tracker added
here sees all of them. TensorBoard writes event files under `OUTPUT/tensorboard`; wandb and mlflow
are used when installed (their offline modes work without a server: `WANDB_MODE=offline`, a
`file:` `MLFLOW_TRACKING_URI`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.files import write_text_atomic

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> package


def check_trackers(report_to: list[str]) -> None:
    """Fail before any work when a tracker's package is missing."""
    for tracker in report_to:
        if importlib.util.find_spec(TRACKERS[tracker]) is None:
            raise TunelabError(f"train.report_to: {tracker} needs the '{TRACKERS[tracker]}' package (pip install {TRACKERS[tracker]})")


class MetricsSink:
    """Appends step records to metrics.jsonl (cut back to `resumed_step` first) and to the trackers."""

    def __init__(self, output: Path, report_to: list[str], resumed_step: int, run_config: dict):
        self.path = output / "metrics.jsonl"
        _truncate_metrics(self.path, after_step=resumed_step)
        self.file = self.path.open("a")
        self.trackers = [_open_tracker(name, output, resumed_step, run_config) for name in report_to]

    def log(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            raise TunelabError(f"cannot write {self.path}: {err.strerror or err}") from None
        scalars = {_tracker_key(key): value for key, value in record.items() if key != "step" and isinstance(value, (int, float))}
        for tracker in self.trackers:
            tracker.log(scalars, record["step"])

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.close()

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tracker_key(key: str) -> str:
    """`eval_loss` -> `eval/loss`, `rewards/chosen` -> `train/rewards/chosen`: trackers group by prefix."""
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Drop metric lines past the step being resumed from (they will be recomputed)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _step_of(line) <= after_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    """A metrics line's step; a line that a killed run left half-written (or a blank one) counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class _TensorBoard:
    def __init__(self, output: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events the interrupted one wrote past its checkpoint.
        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, output: Path, run_config: dict):
        import wandb

        self.run = wandb.init(dir=str(output), name=output.name, config=run_config, resume="allow", id=_run_id(output))

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, output: Path, run_config: dict):
        import mlflow

        self.mlflow = mlflow
        active = mlflow.start_run(run_name=output.name)
        self.run_id = active.info.run_id
        mlflow.log_dict(run_config, "config.json")

    def log(self, scalars: dict, step: int) -> None:
        # mlflow keys may not hold every character; '/' and '_' are fine.
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _run_id(output: Path) -> str:
    """A stable id per run directory, so a resumed run continues its wandb run."""
    return hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:16]


def _open_tracker(name: str, output: Path, resumed_step: int, run_config: dict):
    if name == "tensorboard":
        return _TensorBoard(output, resumed_step)
    if name == "wandb":
        return _Wandb(output, run_config)
    return _Mlflow(output, run_config)
