"""`tunelab compare`: sweeps expand as written, every cell gets the same budget and eval, the
leaderboard's figures are the cells' own, and a sweep resumes (skipping finished cells, resuming
an interrupted one exactly) on every backend."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import tunelab
from helpers import assert_tensors_equal, tiny_run_config, write_records_data, write_yaml
from tunelab.compare import compare, load_sweep
from tunelab.compare.runner import run_cell
from tunelab.compare.sweep import FIXED_TRAIN_KEYS
from tunelab.errors import TunelabError
from tunelab.eval import harness
from tunelab.plots import pareto_front
from tunelab.train.checkpoint import CHECKSUMS_FILE

SENTIMENT = "label\tsentence\n1\tgreat film\n0\tawful film\n1\tloved it\n0\tboring and slow\n"
TASK = {"type": "classification", "data": "cls.tsv", "prompt": "Review: {sentence}\nSentiment:", "labels": {"0": "negative", "1": "positive"}}


def write_sweep(folder: Path, grid: list[dict], steps: int = 3, seeds=(0,), save_every: int = 0, **extra) -> Path:
    """A sweep over the tiny model in `folder`: base.yaml, a 4-row sentiment task, sweep.yaml."""
    train_file, _ = write_records_data(folder / "data", n_train=16)
    base = tiny_run_config(folder / "unused", train_file, train={"max_steps": steps, "save_every": save_every, "keep_checkpoints": 10})
    del base["output"]
    write_yaml(folder / "base.yaml", base)
    (folder / "cls.tsv").write_text(SENTIMENT)
    return write_yaml(folder / "sweep.yaml", {"base": "base.yaml", "task": TASK, "output": "out", "seeds": list(seeds), "grid": grid, **extra})


GRID = [{"method": {"name": "lora", "r": 2}}, {"name": "ia3", "method": {"name": "ia3"}, "train": {"lr": 1e-2}}]


# ---- The sweep file


def test_grid_expands_vary_as_a_product_times_seeds(tmp_path):
    path = write_sweep(tmp_path, [{"method": {"name": "lora"}, "vary": {"method.r": [2, 4], "train.lr": [1e-3, 2e-3, 3e-3]}}, {"method": {"name": "ia3"}}], seeds=(0, 5))
    sweep = load_sweep(path)
    assert len(sweep.cells) == (2 * 3 + 1) * 2
    lora = [c for c in sweep.cells if c.config["method"]["name"] == "lora"]
    assert {(c.config["method"]["r"], c.config["train"]["lr"], c.seed) for c in lora} == {(r, lr, s) for r in (2, 4) for lr in (1e-3, 2e-3, 3e-3) for s in (0, 5)}
    assert all(c.config["method"]["alpha"] == 8.0 for c in lora)  # the same method merges into the base's options
    ia3 = next(c for c in sweep.cells if c.name == "ia3")
    assert ia3.config["method"] == {"name": "ia3"}  # another method replaces them
    # Every cell: the base's model, data and budget, its own seed and run directory.
    assert {c.config["train"]["max_steps"] for c in sweep.cells} == {3}
    assert {c.config["data"]["train"] for c in sweep.cells} == {str(tmp_path / "data" / "train.jsonl")}
    assert len({c.run_dir for c in sweep.cells}) == len(sweep.cells)
    assert all(c.run_dir.is_relative_to(tmp_path / "out" / "cells") for c in sweep.cells)


@pytest.mark.parametrize("key", FIXED_TRAIN_KEYS)
def test_a_cell_cannot_change_the_budget(tmp_path, key):
    path = write_sweep(tmp_path, [{"method": {"name": "lora"}, "train": {key: 2}}])
    with pytest.raises(TunelabError, match=rf"grid\[0\]: `train.{key}` is fixed"):
        load_sweep(path)


def test_a_bad_cell_fails_before_anything_runs(tmp_path):
    path = write_sweep(tmp_path, [{"method": {"name": "lora"}}, {"method": {"name": "lora", "r": -1}}])
    with pytest.raises(TunelabError, match=r"grid\[1\] \(lora\).*method.r"):
        compare(path)
    assert not (tmp_path / "out").exists()


def test_unknown_sweep_key_names_its_line(tmp_path):
    path = write_sweep(tmp_path, GRID, gird=[])
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("gird:"))
    with pytest.raises(TunelabError, match=rf"sweep.yaml:{line}: `gird`: unknown key"):
        load_sweep(path)


@pytest.mark.parametrize(
    "grid",
    [
        [{"method": {"name": "lora", "r": 2}}, {"method": {"name": "lora", "r": 4}}],  # one default name
        [{"name": "lora r2", "method": {"name": "lora", "r": 2}}, {"name": "lora_r2", "method": {"name": "lora", "r": 4}}],  # one folder
    ],
)
def test_cells_sharing_a_run_folder_are_refused(tmp_path, grid):
    with pytest.raises(TunelabError, match="share a run folder"):
        load_sweep(write_sweep(tmp_path, grid))


def test_pareto_front():
    # (params, score): 2 beats 0 at fewer params; 3 is dominated by 1; 4 is the best score.
    points = [(100, 0.5), (10, 0.6), (5, 0.55), (50, 0.58), (1000, 0.9)]
    assert sorted(pareto_front(points)) == [1, 2, 4]
    assert sorted(pareto_front(points, higher_is_better=False)) == [0, 2]  # lower is better: 0.55 at 5, then 0.5 at 100


# ---- Running a sweep


@pytest.fixture(scope="module")
def finished(tmp_path_factory, module_cache):
    """A two-seed sweep of two methods, run once for the module's checks."""
    folder = tmp_path_factory.mktemp("sweep")
    path = write_sweep(folder, GRID, seeds=(0, 1))
    return path, compare(path)


def test_every_file_is_written(finished):
    path, rows = finished
    out = path.parent / "out"
    for name in ("leaderboard.csv", "leaderboard.json", "leaderboard.md", "pareto.png", "loss_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["cell"] for r in table] == [r["cell"] for r in rows]
    assert len(table) == 3 and table[0]["cell"].startswith("zero-shot")
    markdown = (out / "leaderboard.md").read_text()
    assert all(r["cell"] in markdown for r in rows)
    assert json.loads((out / "leaderboard.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_leaderboard_figures_are_the_cells_own(finished):
    """Mean ± std over seeds of each cell's eval.json score; params, memory and speed from its report.json."""
    path, rows = finished
    out = path.parent / "out"
    for row in rows[1:]:
        runs = sorted((out / "cells" / row["cell"]).glob("seed-*"))
        assert len(runs) == 2
        scores = [json.loads((run / "eval" / "task" / "eval.json").read_text())["metrics"]["accuracy"] for run in runs]
        reports = [json.loads((run / "report.json").read_text()) for run in runs]
        assert row["score_mean"] == pytest.approx(statistics.fmean(scores))
        assert row["score_std"] == pytest.approx(statistics.stdev(scores))
        assert row["trainable_params"] == reports[0]["trainable_params"] == reports[1]["trainable_params"]
        assert row["peak_memory_mb"] == max(r["peak_memory_mb"] for r in reports)
        assert row["tokens_per_s"] == pytest.approx(statistics.fmean(r["tokens_per_s"] for r in reports))
        assert {r["steps"] for r in reports} == {3}
    zero_shot = rows[0]
    base_score = json.loads((out / "zero_shot" / "eval.json").read_text())["metrics"]["accuracy"]
    assert zero_shot["rank"] is None and zero_shot["trainable_params"] == 0 and zero_shot["score_mean"] == base_score
    ranked = [r["score_mean"] for r in rows[1:]]
    assert ranked == sorted(ranked, reverse=True)


def test_running_again_trains_nothing_and_gives_the_same_leaderboard(finished, monkeypatch):
    path, rows = finished

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(tunelab, "train", refuse)
    monkeypatch.setattr(harness, "evaluate_task", refuse)
    again = compare(path)
    assert [{k: r[k] for k in ("cell", "score_mean", "score_std", "trainable_params")} for r in again] == [
        {k: r[k] for k in ("cell", "score_mean", "score_std", "trainable_params")} for r in rows
    ]


@pytest.mark.parametrize(
    ("change", "changed_key", "unscored"),
    [
        (lambda sweep: sweep["grid"][1]["train"].update(lr=5e-2), "train.lr", False),
        (lambda sweep: sweep["grid"][1]["train"].update(lr=5e-2), "train.lr", True),  # trained, its eval not yet done
        (lambda sweep: sweep["task"].update(prompt="Text: {sentence}\nLabel:"), "task.prompt", False),
    ],
)
def test_a_finished_cell_is_not_reused_for_another_config_or_task(finished, monkeypatch, change, changed_key, unscored):
    """Editing a sweep after its cells trained does not pass their old results (or models) off as
    new ones: the rerun stops, naming the changed key, before training or scoring anything."""
    path, _ = finished
    raw = yaml.safe_load(path.read_text())
    change(raw)
    edited = write_yaml(path.with_name("edited.yaml"), raw)

    def refuse(*args, **kwargs):
        raise AssertionError("ran a cell instead of refusing the changed one")

    monkeypatch.setattr(tunelab, "train", refuse)
    monkeypatch.setattr(harness, "evaluate_task", refuse)
    records = sorted((path.parent / "out" / "cells" / "ia3").glob("seed-*/cell.json"))
    saved = [r.read_text() for r in records]
    try:
        if unscored:
            for record in records:
                record.unlink()
        with pytest.raises(TunelabError, match=rf"another config or task \(at [^)]*{changed_key}"):
            compare(edited)
    finally:
        for record, text in zip(records, saved):
            record.write_text(text)


def test_zero_shot_loads_the_base_configs_model_with_all_its_options(tmp_path, monkeypatch):
    path = write_sweep(tmp_path, GRID)
    seen = []

    def capture(target, task, **kwargs):
        seen.append(target)
        raise TunelabError("captured")

    monkeypatch.setattr(harness, "evaluate_task", capture)
    with pytest.raises(TunelabError, match="captured"):
        compare(path)
    assert seen == [load_sweep(path).base.model]


def test_a_resumed_cells_wall_seconds_count_the_interrupted_attempts_time(tmp_path, monkeypatch):
    """A cell resumed from a checkpoint reports the earlier attempt's training seconds up to that
    checkpoint (1000 + 5 here) plus this attempt's time, not this attempt's alone."""
    sweep = load_sweep(write_sweep(tmp_path, GRID[:1]))
    cell = sweep.cells[0]
    checkpoint = cell.run_dir / "checkpoints" / "step-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"state": {"step": 2, "tokens_seen": 10, "train_seconds": 1000.0, "prepare_seconds": 5.0}}))
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):  # intact, as far as its checksums tell
        (checkpoint / name).write_bytes(b"")
    checksums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoint.iterdir()}
    (checkpoint / CHECKSUMS_FILE).write_text(json.dumps(checksums))

    def resumed_train(config, resume, overwrite):
        assert resume
        (cell.run_dir / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
        report = {"method": "lora", "trainable_params": 1, "peak_memory_mb": 1.0, "tokens_per_s": 1.0, "train_seconds": 1500.0, "prepare_seconds": 5.0, "resumed_from_step": 2}
        (cell.run_dir / "report.json").write_text(json.dumps(report))

    monkeypatch.setattr(tunelab, "train", resumed_train)
    monkeypatch.setattr(harness, "evaluate_task", lambda run_dir, task: {"metrics": {"accuracy": 1.0}, "seconds": 0.5})
    record = run_cell(cell.name, cell.seed, cell.config, sweep.task.model_dump())
    assert 1005 <= record["wall_seconds"] < 1005 + 60
    assert record["train_losses"] == [[3, 1.0]]


def cell_outcome(run_dir: Path) -> tuple[dict, dict]:
    return json.loads((run_dir / "cell.json").read_text())["metrics"], load_file(run_dir / "adapter" / "adapter.safetensors")


def test_a_sweep_killed_mid_cell_completes_with_identical_results(tmp_path, module_cache):
    """SIGKILL the CLI once the first cell has a checkpoint (and before it finishes); the rerun
    resumes that cell and ends with what an uninterrupted sweep gives."""
    grid = [{"method": {"name": "lora", "r": 2}}]
    killed = write_sweep(tmp_path / "killed", grid, steps=8, save_every=2)
    clean = write_sweep(tmp_path / "clean", grid, steps=8, save_every=2)
    compare(clean)

    command = [sys.executable, "-m", "tunelab.cli.main", "compare", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the test's cache via the environment
    run_dir = tmp_path / "killed" / "out" / "cells" / "lora" / "seed-0"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step-2").is_dir():  # poll for the state to kill in
        assert process.poll() is None, "the sweep ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "report.json").exists(), "the cell finished before the kill: nothing was interrupted"

    rows = compare(killed)
    metrics, adapter = cell_outcome(run_dir)
    expected_metrics, expected_adapter = cell_outcome(tmp_path / "clean" / "out" / "cells" / "lora" / "seed-0")
    assert json.loads((run_dir / "cell.json").read_text())["resumed_from_step"] >= 2
    assert_tensors_equal(adapter, expected_adapter)
    assert {k: v for k, v in metrics.items()} == expected_metrics
    assert rows[1]["score_mean"] == expected_metrics["accuracy"]


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_other_backends_give_the_sequential_results(backend, finished, tmp_path):
    path, rows = finished
    other = write_sweep(tmp_path, GRID, seeds=(0, 1))
    if backend == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got = compare(other, backend=backend, workers=2)
    finally:
        if backend == "ray":
            ray.shutdown()
    for ours, theirs in zip(got, rows):
        assert (ours["cell"], ours["scores"], ours["trainable_params"]) == (theirs["cell"], theirs["scores"], theirs["trainable_params"])
    for cell in sweep_cells(other):
        adapter = load_file(cell / "adapter" / "adapter.safetensors")
        reference = load_file(path.parent / cell.relative_to(other.parent) / "adapter" / "adapter.safetensors")
        assert_tensors_equal(adapter, reference)


def sweep_cells(path: Path) -> list[Path]:
    return sorted((path.parent / "out" / "cells").glob("*/seed-*"))


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(TunelabError, match="--backend gpu-farm"):
        compare(write_sweep(tmp_path, GRID), backend="gpu-farm")
