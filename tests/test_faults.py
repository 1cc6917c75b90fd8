"""Faults during training: checkpoints damaged on disk, a full disk, two trainers on one directory,
SIGINT/SIGTERM, and SIGKILL at seeded points of a run. Every resume must end bitwise equal to the
uninterrupted run, and nothing a fault leaves may be misread by `eval` or `export`.

Runs that must die are forked from a forkserver that imported tunelab once (helpers.run_cli), so
each costs a second instead of a fresh interpreter's imports. A helpers.Trigger sends a signal to the
run itself at the n-th call of a named function, so the point of every fault is exact and repeatable.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors import SafetensorError

import tunelab
from helpers import (
    Trigger,
    assert_clean_failure,
    assert_tensors_equal,
    forkserver,
    invoke,
    load_adapter,
    read_report,
    run_cli,
    start_cli,
    tiny_run_config,
    tree_state,
    write_records_data,
    write_yaml,
)
from tunelab.errors import TunelabError
from tunelab.files import exclusive_directory
from tunelab.runs import RUN_FILE, load_run
from tunelab.train import checkpoint, loop

# Eight steps of four rows over 24 rows (an epoch boundary inside), held-out loss at steps 4 and 8,
# a checkpoint every 2 steps of which the newest 2 are kept.
RUN = {"max_steps": 8, "batch_size": 4, "save_every": 2, "eval_every": 4, "keep_checkpoints": 2}


@pytest.fixture(scope="module")
def records(module_cache, tmp_path_factory) -> tuple[Path, Path]:
    return write_records_data(tmp_path_factory.mktemp("fault-records"), n_train=24, n_eval=4, seed=3)


def config_file(directory: Path, records, name: str = "run", **train) -> Path:
    return write_yaml(directory / f"{name}.yaml", tiny_run_config(directory / name, *records, train={**RUN, **train}))


@pytest.fixture(scope="module")
def forked_reference(records, tmp_path_factory):
    """The final adapter of the uninterrupted run, trained in a forked process like the faulted ones."""
    directory = tmp_path_factory.mktemp("reference")
    code, log = run_cli(["train", config_file(directory, records)], directory / "cache")
    assert code == 0, log
    return load_adapter(directory / "run")


@pytest.fixture(scope="module")
def reference(records, tmp_path_factory, module_cache):
    """The final adapter of the uninterrupted run, trained in this process (for in-process faults)."""
    directory = tmp_path_factory.mktemp("reference-here")
    tunelab.train(str(config_file(directory, records)))
    return load_adapter(directory / "run")


def assert_readable_or_refused(run_dir: Path, final_adapter: dict) -> str:
    """What `eval`, `generate` and `export` would read from a run directory (they all load it with
    load_run): either a clear refusal, or exactly the finished run's weights. Returns which."""
    try:
        loaded = load_run(run_dir)
    except TunelabError:
        return "refused"
    assert_tensors_equal(loaded.method.state_dict(loaded.model), final_adapter)
    return "complete"


# --- damaged checkpoints --------------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # in the tensor data (the header is at the start)
    path.write_bytes(bytes(data))


DAMAGES = {
    "bit-flip-in-weights": lambda step: flip_a_byte(step / "trainable.safetensors"),
    "torn-optimizer-write": lambda step: (step / "optimizer.safetensors").write_bytes((step / "optimizer.safetensors").read_bytes()[:100]),
    "missing-optimizer-file": lambda step: (step / "optimizer.safetensors").unlink(),
    "bit-flip-in-state": lambda step: (step / "state.json").write_text((step / "state.json").read_text().replace('"step": 6', '"step": 7')),
    "missing-checksums": lambda step: (step / checkpoint.CHECKSUMS_FILE).unlink(),
}


@pytest.fixture(scope="module")
def crashed_run(records, tmp_path_factory, module_cache) -> Path:
    """A run that crashed in step 7: checkpoints at steps 4 and 6 (the newest two), no final weights."""
    directory = tmp_path_factory.mktemp("crashed")
    real_step = loop.train_step

    def crash_at_step_7(run, step):
        if step == 7:
            raise RuntimeError("crash")
        return real_step(run, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train_step", crash_at_step_7)
        with pytest.raises(RuntimeError, match="crash"):
            tunelab.train(str(config_file(directory, records)))
    assert sorted(p.name for p in (directory / "run" / "checkpoints").iterdir()) == ["step-4", "step-6"]
    return directory


@pytest.mark.parametrize("damage", [*DAMAGES, "every-checkpoint"])
def test_resume_passes_over_a_damaged_checkpoint_and_stays_exact(damage, crashed_run, records, reference, tmp_path, capsys, record_property):
    record_property("reliability", "fault: damaged checkpoint")
    run_dir = tmp_path / "run"
    shutil.copytree(crashed_run / "run", run_dir)
    for step in ("step-6", "step-4") if damage == "every-checkpoint" else ("step-6",):
        DAMAGES["bit-flip-in-weights" if damage == "every-checkpoint" else damage](run_dir / "checkpoints" / step)
    # The crash also cut the metrics file inside a line: resume drops the torn line with the rest.
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 7, "lo')

    report = tunelab.train(str(config_file(tmp_path, records)), resume=True).report

    assert report["resumed_from_step"] == (None if damage == "every-checkpoint" else 4)
    assert f"checkpoint {run_dir / 'checkpoints' / 'step-6'} is damaged" in capsys.readouterr().err
    assert_tensors_equal(load_adapter(run_dir), reference)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))


def test_a_checkpoint_records_the_checksum_of_every_file(crashed_run):
    step = crashed_run / "run" / "checkpoints" / "step-6"
    recorded = json.loads((step / checkpoint.CHECKSUMS_FILE).read_text())
    assert sorted(recorded) == sorted(p.name for p in step.iterdir() if p.name != checkpoint.CHECKSUMS_FILE)
    assert checkpoint.damage(step) is None


# --- a full disk ----------------------------------------------------------------------------------

NO_SPACE = {
    "oserror": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    # What safetensors raises on a full disk (seen on a full tmpfs): not an OSError.
    "safetensors-error": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
}


@pytest.mark.parametrize("error", NO_SPACE)
@pytest.mark.parametrize("where", ["checkpoint", "final-weights"])
def test_a_full_disk_is_one_error_and_the_last_checkpoint_stays_good(where, error, records, reference, tmp_path, monkeypatch, record_property):
    record_property("reliability", "fault: disk full")
    config = config_file(tmp_path, records)
    run_dir = tmp_path / "run"
    # The second checkpoint's first file (step 4), or the final adapter.
    module, fails_at = (checkpoint, 4) if where == "checkpoint" else (importlib.import_module("tunelab.runs"), 1)
    real_save, calls = module.save_file, []

    def save_until_full(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == fails_at:
            raise NO_SPACE[error]
        return real_save(*args, **kwargs)

    monkeypatch.setattr(module, "save_file", save_until_full)
    target = run_dir / "checkpoints" / "step-4" if where == "checkpoint" else run_dir / "adapter"
    assert_clean_failure(invoke("train", config), f"cannot write {target}", "No space left on device")

    kept = run_dir / "checkpoints" / ("step-2" if where == "checkpoint" else "step-6")
    assert checkpoint.damage(kept) is None
    assert not target.exists()
    assert not [p.name for p in [*run_dir.iterdir(), *(run_dir / "checkpoints").iterdir()] if p.name.startswith(".")]
    monkeypatch.setattr(module, "save_file", real_save)
    assert tunelab.train(str(config), resume=True).report["resumed_from_step"] == int(kept.name.split("-")[1])
    assert_tensors_equal(load_adapter(run_dir), reference)


@pytest.mark.parametrize("error", NO_SPACE)
def test_a_full_disk_during_an_export_leaves_nothing_at_out(error, finished_run, tmp_path, monkeypatch, record_property):
    record_property("reliability", "fault: disk full")
    exporters = importlib.import_module("tunelab.export.exporters")

    def disk_full(*args, **kwargs):
        raise NO_SPACE[error]

    monkeypatch.setattr(exporters, "save_file", disk_full)
    before = tree_state(tmp_path)
    assert_clean_failure(
        invoke("export", finished_run, "--format", "peft", "--out", tmp_path / "exports" / "peft"), f"cannot write {tmp_path / 'exports' / 'peft'}", "No space left on device"
    )
    assert tree_state(tmp_path) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, where this machine lets the test mount one (root in a container, as in CI)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected full-disk tests above still run")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_really_full_disk_mid_checkpoint(small_disk, records, reference, monkeypatch, record_property):
    record_property("reliability", "fault: disk full")
    config = config_file(small_disk, records)
    real_save = loop.save_checkpoint

    def save_then_fill_the_disk(checkpoints_dir, *args):
        saved = real_save(checkpoints_dir, *args)
        with (small_disk / "filler").open("ab", buffering=0) as filler:  # take every free block
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError as err:
                assert err.errno == errno.ENOSPC
        return saved

    monkeypatch.setattr(loop, "save_checkpoint", save_then_fill_the_disk)
    message = assert_clean_failure(invoke("train", config), "No space left on device")
    assert "step-2" in message  # the checkpoint that stayed good is named
    assert checkpoint.damage(small_disk / "run" / "checkpoints" / "step-2") is None
    (small_disk / "filler").unlink()
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    tunelab.train(str(config), resume=True)
    assert_tensors_equal(load_adapter(small_disk / "run"), reference)


# --- one trainer per directory ----------------------------------------------------------------------


def test_a_second_trainer_is_refused_at_once(records, tmp_path, record_property):
    record_property("reliability", "fault: two trainers")
    config = config_file(tmp_path, records)
    (tmp_path / "run").mkdir()
    before = tree_state(tmp_path)
    with exclusive_directory(tmp_path / "run", "another run"):
        assert_clean_failure(invoke("train", config), f"{tmp_path / 'run'} is in use")
    assert tree_state(tmp_path) == before


def test_a_sigkilled_trainer_leaves_no_stale_lock(records, tmp_path, record_property):
    """A trainer stopped (SIGSTOP) mid-run holds the directory; once it is SIGKILLed, the next one trains."""
    record_property("reliability", "fault: two trainers")
    config = config_file(tmp_path, records)
    in_step_3 = forkserver().Event()
    first, log = start_cli(["train", config], tmp_path / "cache", Trigger("tunelab.train.loop", "step_loss", 3, signum=signal.SIGSTOP, reached=in_step_3))
    assert in_step_3.wait(timeout=120), log.read_text()  # it holds the directory, and stops (or has stopped) itself
    assert_clean_failure(invoke("train", config, "--resume"), "is in use")
    first.kill()
    first.join()
    assert first.exitcode == -signal.SIGKILL
    code, output = run_cli(["train", config, "--resume"], tmp_path / "cache")
    assert code == 0, output


# --- SIGINT and SIGTERM -----------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_writes_a_checkpoint_and_resume_is_exact(signum, records, forked_reference, tmp_path, record_property):
    record_property("reliability", "fault: SIGINT/SIGTERM")
    config = config_file(tmp_path, records, save_every=0)  # the only checkpoint is the one the signal asks for
    code, output = run_cli(["train", config], tmp_path / "cache", Trigger("tunelab.train.loop", "step_loss", 5, signum=signum))
    assert code == 128 + signum, output
    stopped_at = int(output.split(" at step ")[1].split()[0])
    assert f"{signal.Signals(signum).name} at step {stopped_at} of 8: checkpoint" in output and "Traceback" not in output
    assert checkpoint.damage(tmp_path / "run" / "checkpoints" / f"step-{stopped_at}") is None

    code, output = run_cli(["train", config, "--resume"], tmp_path / "cache")
    assert code == 0, output
    assert read_report(tmp_path / "run")["resumed_from_step"] == stopped_at
    assert_tensors_equal(load_adapter(tmp_path / "run"), forked_reference)


def test_a_second_ctrl_c_stops_at_once(records, forked_reference, tmp_path, record_property):
    record_property("reliability", "fault: SIGINT/SIGTERM")
    config = config_file(tmp_path, records, save_every=0)
    # The second Ctrl-C comes while the first one's checkpoint is being written.
    first = Trigger("tunelab.train.loop", "step_loss", 5, signum=signal.SIGINT)
    second = Trigger("tunelab.train.checkpoint", "save_file", 1, when="after", signum=signal.SIGINT)
    code, output = run_cli(["train", config], tmp_path / "cache", first, second)
    assert code == 130, output
    assert "interrupted" in output and "Traceback" not in output
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())
    code, output = run_cli(["train", config, "--resume"], tmp_path / "cache")
    assert code == 0, output
    assert_tensors_equal(load_adapter(tmp_path / "run"), forked_reference)


# --- SIGKILL at seeded points -----------------------------------------------------------------------

# Where a run can die, with how many calls each point sees in the run above (the n-th call is killed):
# tokenizing the 24 + 4 rows, a forward of a step, the held-out loss, a checkpoint's three tensor
# files (steps 2, 4 and 6), the final adapter, and report.json.
KILL_POINTS = {
    "data preparation": ("tunelab.data.dataset", "tokenize_example", 28),
    "training step": ("tunelab.train.loop", "step_loss", 8),
    "eval": ("tunelab.train.loop", "evaluate_objective", 2),
    "checkpoint write": ("tunelab.train.checkpoint", "save_file", 9),
    "final weights write": ("tunelab.runs", "save_file", 1),
    "report write": ("tunelab.train.loop", "write_json_atomic", 1),
}
KILL_SEED = 19
KILLS = 20


def seeded_kills() -> list[tuple[str, Trigger]]:
    """20 kill points: every kind of point in turn, before its call and after it on alternate rounds,
    the call drawn from the seed."""
    draw = random.Random(KILL_SEED)
    kills = []
    for trial in range(KILLS):
        round_, kind = divmod(trial, len(KILL_POINTS))
        module, attr, calls = KILL_POINTS[list(KILL_POINTS)[kind]]
        kills.append((list(KILL_POINTS)[kind], Trigger(module, attr, draw.randint(1, calls), ("before", "after")[round_ % 2])))
    return kills


@pytest.mark.parametrize("trial", range(KILLS), ids=[f"kill-{i:02d}" for i in range(KILLS)])
def test_sigkill_at_a_seeded_point_then_resume_is_bitwise_exact(trial, records, forked_reference, tmp_path, record_property):
    point, trigger = seeded_kills()[trial]
    record_property("reliability", "fault: SIGKILL loop")
    record_property("kill", f"{point}: call {trigger.nth} of {trigger.module}.{trigger.attr}, {trigger.when}")
    config = config_file(tmp_path, records)

    code, output = run_cli(["train", config], tmp_path / "cache", trigger)
    assert code == -signal.SIGKILL, output
    left = assert_readable_or_refused(tmp_path / "run", forked_reference)
    newest = checkpoint.newest_intact_checkpoint(tmp_path / "run" / "checkpoints")

    code, output = run_cli(["train", config, "--resume"], tmp_path / "cache")
    assert code == 0, output
    resumed_from = read_report(tmp_path / "run")["resumed_from_step"]
    assert resumed_from == (int(newest.name.split("-")[1]) if newest else None)  # no work past it was redone
    assert_tensors_equal(load_adapter(tmp_path / "run"), forked_reference)
    record_property("after the kill", f"a run directory that loads {'as the finished run' if left == 'complete' else 'nothing (a clear refusal)'}")
    record_property("resumed from step", str(resumed_from))


# --- run directories from another tunelab --------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(records, tmp_path_factory, module_cache) -> Path:
    directory = tmp_path_factory.mktemp("finished")
    tunelab.train(str(config_file(directory, records, max_steps=2, save_every=1)))
    return directory / "run"


def test_a_run_from_a_newer_tunelab_is_refused_by_every_reader(finished_run, tmp_path, record_property):
    record_property("reliability", "paths")
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / RUN_FILE).write_text(json.dumps({"run_format": 99, "tunelab_version": "9.0.0"}))
    before = tree_state(tmp_path)
    for argv in (["eval", run_dir], ["generate", run_dir, "hi"], ["export", run_dir, "--format", "peft", "--out", tmp_path / "peft"]):
        assert_clean_failure(invoke(*argv), str(run_dir), "tunelab 9.0.0 in run format 99")
    config = write_yaml(tmp_path / "run.yaml", {**json.loads(json.dumps(load_run(finished_run).config.to_dict())), "output": str(run_dir)})
    assert_clean_failure(invoke("train", config, "--resume"), "run format 99")
    assert tree_state(tmp_path) == before | {"run.yaml": tree_state(tmp_path)["run.yaml"]}


def test_a_run_from_before_run_formats_still_loads(finished_run, tmp_path, record_property):
    record_property("reliability", "paths")
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / RUN_FILE).unlink()
    assert_tensors_equal(load_run(run_dir).method.state_dict(load_run(run_dir).model), load_adapter(finished_run))


# --- the output directory itself --------------------------------------------------------------------


def test_output_that_is_an_existing_file(records, tmp_path, record_property):
    record_property("reliability", "paths")
    (tmp_path / "run").write_text("notes")
    config = config_file(tmp_path, records)
    before = tree_state(tmp_path)
    assert_clean_failure(invoke("train", config), f"{tmp_path / 'run'} is a file, not a directory")
    assert tree_state(tmp_path) == before


@pytest.fixture
def read_only_directory(tmp_path):
    """A directory no write can go into: a read-only tmpfs (where a mount is allowed), else chmod 555
    (which root ignores, so that needs a non-root user)."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)], capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root ignores file modes and cannot mount here: no read-only directory to test with")
        directory.chmod(0o555)
    yield directory
    if mounted:
        subprocess.run(["umount", str(directory)], check=True)
    else:
        directory.chmod(0o755)


def test_output_inside_a_read_only_directory(read_only_directory, records, tmp_path, record_property):
    record_property("reliability", "paths")
    config = write_yaml(tmp_path / "run.yaml", tiny_run_config(read_only_directory / "run", *records, train=RUN))
    before = tree_state(tmp_path)
    assert_clean_failure(invoke("train", config), str(read_only_directory / "run"))
    assert tree_state(tmp_path) == before
