"""Shared test helpers: small data files, run configs for the in-process tiny model, and run outputs.

Import from a test module as `from helpers import ...` (pytest puts the tests folder on sys.path).
Every path these helpers write into a config is absolute, so a run does not depend on the cwd.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import tunelab
from tunelab.cli.main import app
from tunelab.data.records_task import make_preference_splits, make_splits
from tunelab.train import loop

TINY_MODEL = "tiny-random-llama"


def invoke(*args) -> object:
    """Run the `tunelab` command line in-process (typer's CliRunner) with these arguments."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_failure(result, *expected: str, one_line: bool = True) -> str:
    """Exit code 1, no traceback, and one `error:` message, ending the output, with every `expected`
    piece on one line. `one_line`: the message is a single line, or one line and a short hint
    (config errors with several problems list them one per line under a heading: pass False)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # typer.Exit(1), nothing escaped
    assert "Traceback" not in result.output
    assert result.output.count("error:") == 1, result.output
    message = result.output[result.output.index("error:") :].strip()
    if one_line:
        assert len(message.splitlines()) <= 2, message
    assert any(all(piece in line for piece in expected) for line in message.splitlines()), (expected, message)
    return message


def tree_state(root: str | Path) -> dict[str, tuple]:
    """Everything under `root` (itself included): each path with its kind, mode, and for a file its
    size, modification time and content hash. Equal states mean nothing was written, removed or touched."""
    root = Path(root)
    state = {}
    for path in [root, *sorted(root.rglob("*"))] if root.exists() else []:
        info = path.lstat()
        entry: tuple = (info.st_mode,)
        if path.is_file() and not path.is_symlink():
            entry += (info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        state[str(path.relative_to(root))] = entry
    return state


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_records_data(directory: str | Path, n_train: int, n_eval: int = 0, seed: int = 0) -> tuple[Path, Path | None]:
    """The synthetic record-extraction task as `train.jsonl` (and `eval.jsonl` when n_eval > 0)."""
    return _write_splits(Path(directory), "", *make_splits(n_train, n_eval, seed))


def write_preference_data(directory: str | Path, n_train: int, n_eval: int = 0, seed: int = 0) -> tuple[Path, Path | None]:
    """The record-extraction task as conversational preference pairs (a corrupted record rejected)."""
    return _write_splits(Path(directory), "pairs_", *make_preference_splits(n_train, n_eval, seed))


def _write_splits(directory: Path, prefix: str, train_rows: list[dict], eval_rows: list[dict]) -> tuple[Path, Path | None]:
    train_file = write_jsonl(directory / f"{prefix}train.jsonl", train_rows)
    eval_file = write_jsonl(directory / f"{prefix}eval.jsonl", eval_rows) if eval_rows else None
    return train_file, eval_file


def tiny_run_config(
    output: str | Path,
    train_file: str | Path,
    eval_file: str | Path | None = None,
    *,
    model: dict | None = None,
    data: dict | None = None,
    method: dict | None = None,
    train: dict | None = None,
    objective: dict | None = None,
) -> dict:
    """A run config (as a dict) for `tiny-random-llama` in fp32 on the CPU: small, fast, deterministic.

    The keyword sections are merged over the defaults, e.g. `train={"max_steps": 5}`. A `method`
    with a different `name` replaces the default LoRA options instead of merging into them.
    """
    config = {
        "model": {"name": TINY_MODEL, "dtype": "float32", "device": "cpu"},
        "data": {"train": str(train_file), "max_length": 384, "packing": True},
        "method": {"name": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0},
        "train": {
            "max_steps": 3,
            "batch_size": 4,
            "grad_accum": 1,
            "lr": 1e-3,
            "warmup": 0,
            "seed": 0,
            "save_every": 0,
            "eval_every": 0,
            "log_every": 1,
            # Not `auto`: whether frozen weights compute in bf16 would depend on the CI machine's CPU.
            "frozen_dtype": "float32",
        },
        "output": str(output),
    }
    if eval_file is not None:
        config["data"]["eval"] = str(eval_file)
    if method is not None and method.get("name", "lora") != "lora":
        config["method"] = {}
    for section, values in (("model", model), ("data", data), ("method", method), ("train", train)):
        config[section].update(copy.deepcopy(values or {}))
    if objective is not None:
        config["objective"] = copy.deepcopy(objective)
    return config


def write_yaml(path: str | Path, mapping: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`, in file order."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_report(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete `step-N` checkpoints of a run, ascending."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def load_adapter(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "adapter" / "adapter.safetensors")


def load_checkpoint_weights(run_dir: str | Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "checkpoints" / f"step-{step}" / "trainable.safetensors")


def assert_tensors_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, and every tensor bitwise equal."""
    assert sorted(actual) == sorted(expected)
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"tensors differ: {different[:5]}"


def train_keeping_model(monkeypatch, config: dict):
    """Train in-process and also return the trained in-memory (method, model, tokenizer), and
    `initial`: each optimized tensor's value when the optimizer was built, by id()."""
    kept = {}
    real_save_artifacts, real_build_optimizer = loop.save_artifacts, loop.build_optimizer

    def save_and_keep(method, model, tokenizer, run_config, output, objective=None):
        kept.update(method=method, model=model, tokenizer=tokenizer)
        return real_save_artifacts(method, model, tokenizer, run_config, output, objective)

    def build_and_keep(tcfg, model, groups):
        kept["initial"] = {id(p): p.detach().clone() for group in groups for p in group["params"]}
        return real_build_optimizer(tcfg, model, groups)

    monkeypatch.setattr(loop, "save_artifacts", save_and_keep)
    monkeypatch.setattr(loop, "build_optimizer", build_and_keep)
    result = tunelab.train(config)
    return result, kept


DRIVER = """\
import sys

import tunelab

tunelab.train(sys.argv[1], resume="--resume" in sys.argv[2:])
"""


def kill_and_resume(tmp_path: Path, config: dict, kill_after: int) -> tuple[Path, Path]:
    """Run `config` twice in subprocesses: once uninterrupted, once SIGKILLed as soon as its
    checkpoint `step-{kill_after}` exists and then resumed with --resume. Returns the run
    directories (killed-and-resumed, uninterrupted), both finished."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    src_dir = Path(tunelab.__file__).resolve().parents[1]
    configs = {name: write_yaml(tmp_path / f"{name}.yaml", {**config, "output": str(tmp_path / name)}) for name in ("uninterrupted", "killed")}

    def start(name: str, resume: bool = False) -> subprocess.Popen:
        env = {
            **os.environ,
            "PYTHONPATH": str(src_dir),
            "TUNELAB_CACHE": str(tmp_path / f"cache-{name}"),
            # Two runs at once: one thread each, as spinning OpenMP threads of both would fight for
            # the cores. Every process gets the same count, so their arithmetic stays identical.
            "OMP_NUM_THREADS": "1",
        }
        log = (tmp_path / f"{name}{'-resume' if resume else ''}.log").open("w")
        argv = [sys.executable, str(driver), str(configs[name])] + (["--resume"] if resume else [])
        return subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)

    def log_of(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()[-3000:]

    uninterrupted = start("uninterrupted")
    killed = start("killed")
    run_dir = tmp_path / "killed"
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / f"step-{kill_after}").is_dir():
        if killed.poll() is not None:
            pytest.fail(f"the run exited (rc {killed.returncode}) before step {kill_after}:\n{log_of('killed')}")
        if time.monotonic() > deadline:
            killed.kill()
            pytest.fail(f"no checkpoint step-{kill_after} within 120 s:\n{log_of('killed')}")
        time.sleep(0.01)
    finished_before_kill = (run_dir / "report.json").exists()
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not finished_before_kill and not (run_dir / "report.json").exists(), "the kill came after the run ended"
    assert not (run_dir / "adapter").exists() and not (run_dir / "model").exists()

    resumed = start("killed", resume=True)
    assert resumed.wait(timeout=300) == 0, log_of("killed-resume")
    assert uninterrupted.wait(timeout=300) == 0, log_of("uninterrupted")
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    return run_dir, tmp_path / "uninterrupted"
