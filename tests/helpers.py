"""Shared test helpers: small data files, run configs for the in-process tiny model, and run outputs.

Import from a test module as `from helpers import ...` (pytest puts the tests folder on sys.path).
Every path these helpers write into a config is absolute, so a run does not depend on the cwd.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import multiprocessing
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

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


# Each objective's data and options for a tiny run.
OBJECTIVES = {
    "sft": {"name": "sft"},
    "pretrain": {"name": "pretrain"},
    "dpo": {"name": "dpo"},
    "dpo-precomputed": {"name": "dpo", "precompute_reference": True},
    "cpo": {"name": "cpo"},
    "simpo": {"name": "simpo"},
    "orpo": {"name": "orpo"},
    # KTO's KL point is a per-micro-batch statistic (as in TRL), so accumulation changes it: the GA
    # test takes the variant without it; test_kto_kl_point_is_the_micro_batches covers the point.
    "kto": {"name": "kto", "loss_type": "apo_zero_unpaired"},
    "reward": {"name": "reward"},
    # Two steps per batch of samples, so the second trains with importance ratios off 1.
    "grpo": {"name": "grpo", "num_generations": 4, "max_completion_length": 8, "num_iterations": 2, "rewards": [{"name": "format", "pattern": "[a-m]"}]},
    # The teacher is the student's base: the SFT half moves the student, the divergence then grows.
    "distill": {"name": "distill", "teacher": "tiny-random-llama", "alpha": 0.5},
    # Steps 2, 4, ... train on the student's own completions, the others on the data's.
    "distill-on-policy": {"name": "distill", "teacher": "tiny-random-llama", "alpha": 0.5, "on_policy_fraction": 0.5, "max_completion_length": 8},
    # Prompt-only rows: the teacher samples the completions of the steps that are not on-policy.
    "distill-prompts": {"name": "distill", "teacher": "tiny-random-llama", "alpha": 0.5, "on_policy_fraction": 0.5, "max_completion_length": 8},
    "raft": {"name": "raft", "num_generations": 4, "max_completion_length": 8, "steps_per_round": 2, "rewards": [{"name": "format", "pattern": "[a-m]"}]},
}
# The cases whose data is not the kind of rows their objective reads first.
OBJECTIVE_ROWS = {"distill-prompts": "prompt"}


def write_objective_data(folder: Path) -> dict[str, Path]:
    """The data files of every objective case, by the kind of rows they hold (`<kind>_eval`: held out)."""
    records, records_eval = write_records_data(folder, n_train=16, n_eval=4)
    pairs, pairs_eval = write_preference_data(folder, n_train=16, n_eval=4)
    text = write_jsonl(folder / "text.jsonl", [{"text": json.loads(line)["messages"][1]["content"] * 3} for line in records.read_text().splitlines()])
    prompts = write_jsonl(folder / "prompts.jsonl", [{"prompt": f"Question {i}:", "answer": str(i)} for i in range(16)])
    prompts_eval = write_jsonl(folder / "prompts_eval.jsonl", [{"prompt": f"Question {i}:", "answer": str(i)} for i in range(16, 20)])
    return {
        "sft": records,
        "text": text,
        "preference": pairs,
        "preference_eval": pairs_eval,
        "unpaired": pairs,
        "unpaired_eval": pairs_eval,
        "prompt": prompts,
        "prompt_eval": prompts_eval,
        "sft_or_prompt": records,
        "sft_or_prompt_eval": records_eval,
    }


def objective_config(tmp_path, files, case: str, **sections) -> dict:
    """A tiny run of objective `case` (a key of OBJECTIVES) on the rows it reads."""
    from tunelab.objectives.registry import get_objective_class

    options = OBJECTIVES[case]
    rows = OBJECTIVE_ROWS.get(case) or get_objective_class(options["name"]).rows
    train_file, eval_file = files[rows], files.get(f"{rows}_eval")
    return tiny_run_config(tmp_path, train_file, eval_file, objective=options, **sections)


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

    def save_and_keep(method, model, tokenizer, *rest):
        kept.update(method=method, model=model, tokenizer=tokenizer)
        return real_save_artifacts(method, model, tokenizer, *rest)

    def build_and_keep(tcfg, model, groups):
        kept["initial"] = {id(p): p.detach().clone() for group in groups for p in group["params"]}
        return real_build_optimizer(tcfg, model, groups)

    monkeypatch.setattr(loop, "save_artifacts", save_and_keep)
    monkeypatch.setattr(loop, "build_optimizer", build_and_keep)
    result = tunelab.train(config)
    return result, kept


@dataclass(frozen=True)
class Trigger:
    """Send `signum` to a forked run itself at the `nth` call of `module.attr`, `when` before or
    after the real call: the point of a fault is then exact, not a race against a timer."""

    module: str
    attr: str
    nth: int
    when: str = "before"
    signum: int = signal.SIGKILL
    reached: object = None  # a multiprocessing Event, set just before the signal is sent

    def arm(self) -> None:
        module = importlib.import_module(self.module)
        real, calls = getattr(module, self.attr), 0

        def fire() -> None:
            if self.reached is not None:
                self.reached.set()
            os.kill(os.getpid(), self.signum)

        def triggered(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == self.nth and self.when == "before":
                fire()
            result = real(*args, **kwargs)
            if calls == self.nth and self.when == "after":
                fire()
            return result

        setattr(module, self.attr, triggered)


@functools.cache
def forkserver():
    """The multiprocessing context whose server imported tunelab once: a run forked from it starts
    in a fraction of a second instead of a fresh interpreter's several seconds of imports."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tunelab.cli.main", "tunelab.train.loop", "tunelab.runs", "tunelab.eval", "tunelab.export", "datasets"])
    return context


def _cli_child(argv: list[str], env: dict, triggers: tuple, log: str) -> None:
    """A forked `tunelab ARGV` with its output in `log` and the triggers armed; exits with the CLI's code."""
    import datasets.config

    from tunelab.cli.main import app

    os.environ.update(env)
    datasets.config.HF_DATASETS_CACHE = Path(env["HF_DATASETS_CACHE"])  # read once, at import
    # One thread: forked runs may run two at a time, and every one computes alike.
    torch.set_num_threads(1)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for trigger in triggers:
        trigger.arm()
    try:
        app(argv, prog_name="tunelab")
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    os._exit(code)


def start_cli(argv: list, cache: Path, *triggers, env: dict | None = None, log: Path | None = None) -> tuple[multiprocessing.Process, Path]:
    """Start `tunelab ARGV` forked from the forkserver, with its own cache (and `env`); returns the
    process and its log file. `triggers`: objects whose `arm()` the child calls first (Trigger, WriteAudit)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    log = log or cache.parent / f"{cache.name}-{len(list(cache.parent.glob(cache.name + '-*.log')))}.log"
    env = {"TUNELAB_CACHE": str(cache / "tunelab"), "HF_DATASETS_CACHE": str(cache / "hf-datasets"), **(env or {})}
    process = forkserver().Process(target=_cli_child, args=([str(a) for a in argv], env, triggers, str(log)))
    process.start()
    return process, log


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ranks(argv: list, cache: Path, world: int = 2, triggers: dict | None = None, timeout_s: float = 60) -> list[tuple[multiprocessing.Process, Path]]:
    """`tunelab ARGV` as ranks 0..world-1 of one run, forked from the forkserver with torchrun's
    environment (one thread each, one shared cache); `triggers`: rank -> objects to arm in it."""
    env = {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    argv = [*argv, f"train.distributed_timeout={timeout_s}"]
    logs = cache.parent / f"{cache.name}-ranks-{len(list(cache.parent.glob(cache.name + '-ranks-*')))}"
    logs.mkdir(parents=True)
    return [start_cli(argv, cache, *(triggers or {}).get(rank, ()), env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, log=logs / f"rank{rank}.log") for rank in range(world)]


def finish_ranks(started: list) -> list[tuple[int, str]]:
    return [finish_cli(process, log) for process, log in started]


def run_ranks(argv: list, cache: Path, world: int = 2, triggers: dict | None = None, timeout_s: float = 60) -> list[tuple[int, str]]:
    """`tunelab ARGV` in `world` forked ranks: each rank's exit code and output."""
    return finish_ranks(start_ranks(argv, cache, world, triggers, timeout_s))


@dataclass(frozen=True)
class WriteAudit:
    """Record, in `record`, every file-system change a forked run makes through Python under `root`
    (opens for writing, mkdir, rename, remove), via an audit hook: which process wrote what."""

    root: str
    record: str

    def arm(self) -> None:
        import sys

        fd = os.open(self.record, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # os.write raises no audit event
        writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        def hook(event: str, args: tuple) -> None:
            if event == "open":
                path, mode, flags = args
                changed = [path] if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and isinstance(flags, int) and flags & writing) else []
            elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
                changed = [args[0]]
            elif event in ("os.rename", "os.replace"):
                changed = [args[0], args[1]]
            else:
                return
            for path in changed:
                if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(self.root):
                    os.write(fd, f"{event} {os.fsdecode(path)}\n".encode())

        sys.addaudithook(hook)

    def paths(self) -> list[str]:
        return Path(self.record).read_text().splitlines() if Path(self.record).is_file() else []


def finish_cli(process: multiprocessing.Process, log: Path) -> tuple[int, str]:
    """Wait for a started run: its exit code (-N for signal N) and its output."""
    process.join(timeout=300)
    assert process.exitcode is not None, f"the forked run did not end:\n{log.read_text()[-3000:]}"
    return process.exitcode, log.read_text()


def run_cli(argv: list, cache: Path, *triggers: Trigger) -> tuple[int, str]:
    """`tunelab ARGV` in a forked process: its exit code and output."""
    return finish_cli(*start_cli(argv, cache, *triggers))


def kill_and_resume(tmp_path: Path, config: dict, kill_after: int) -> tuple[Path, Path]:
    """Run `config` twice in forked processes: once uninterrupted, once SIGKILLed right after it wrote
    checkpoint `step-{kill_after}` and then resumed with --resume. Returns the run directories
    (killed-and-resumed, uninterrupted), both finished."""
    save_every = config["train"]["save_every"]
    assert kill_after % save_every == 0, "the kill follows a checkpoint"
    configs = {name: write_yaml(tmp_path / f"{name}.yaml", {**config, "output": str(tmp_path / name)}) for name in ("uninterrupted", "killed")}
    uninterrupted = start_cli(["train", configs["uninterrupted"]], tmp_path / "cache-uninterrupted")
    after_checkpoint = Trigger("tunelab.train.loop", "save_checkpoint", kill_after // save_every, when="after")
    code, output = run_cli(["train", configs["killed"]], tmp_path / "cache-killed", after_checkpoint)
    assert code == -signal.SIGKILL, output
    run_dir = tmp_path / "killed"
    assert (run_dir / "checkpoints" / f"step-{kill_after}").is_dir()
    assert not (run_dir / "adapter").exists() and not (run_dir / "model").exists() and not (run_dir / "report.json").exists()

    code, output = run_cli(["train", configs["killed"], "--resume"], tmp_path / "cache-killed")
    assert code == 0, output
    code, output = finish_cli(*uninterrupted)
    assert code == 0, output
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    return run_dir, tmp_path / "uninterrupted"
