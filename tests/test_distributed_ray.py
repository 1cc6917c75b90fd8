"""Training on Ray (train/ray_launch.py): the run's ranks as Ray Train workers on a local Ray cluster
(2 CPU workers, gloo). 2 workers x batch 4 are the one-process
run of batch 8; a bad input met on the workers ends in the TunelabError that names it."""

from __future__ import annotations

import pytest

import tunelab
from helpers import invoke, load_adapter, read_metrics, read_report, tiny_run_config, tree_state, write_yaml
from tunelab.errors import TunelabError
from tunelab.train.ray_launch import train_on_ray


@pytest.fixture(scope="module")
def local_cluster():
    """One local Ray cluster for the module (each start costs ~20 s here): train_on_ray uses the
    connection this process holds, whatever its address."""
    import ray

    ray.init(num_cpus=2, logging_level="ERROR")
    yield "local"
    ray.shutdown()


def test_two_ray_workers_of_batch_4_are_one_process_of_batch_8(records, local_cluster, tmp_path):
    train_file, _ = records
    settings = {"max_steps": 3, "lr": 1e-3}
    one = tunelab.train(tiny_run_config(tmp_path / "one", train_file, train={**settings, "batch_size": 8})).output_dir
    on_ray = tmp_path / "ray"
    path = write_yaml(tmp_path / "ray.yaml", tiny_run_config(on_ray, train_file, train={**settings, "batch_size": 4}))

    result = invoke("train", str(path), "--ray-address", local_cluster, "--ray-workers", "2")  # the CLI, in this process

    assert result.exit_code == 0, result.output
    assert f"-> {on_ray}" in result.output.replace("\n", "")  # rank 0's result came back
    report = read_report(on_ray)
    assert report["processes"] == 2 and report["distributed"] == "ddp"
    # Ray kept its own records elsewhere: the run directory holds what a one-process run writes.
    assert sorted(p.name for p in on_ray.iterdir()) == sorted(p.name for p in one.iterdir())
    losses = {run: [m["loss"] for m in read_metrics(run) if "loss" in m] for run in (one, on_ray)}
    assert len(losses[one]) == 3
    assert losses[on_ray] == pytest.approx(losses[one], rel=0, abs=1e-5)
    ours, expected = load_adapter(on_ray), load_adapter(one)
    assert sorted(ours) == sorted(expected)
    worst = max((ours[name] - expected[name]).abs().max().item() for name in expected)
    assert worst <= 1e-6, f"largest adapter difference {worst}"


def test_a_bad_data_file_on_the_workers_ends_in_its_tunelab_error(local_cluster, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"messages": [{"role": "user", "content": "café"}]}\n'.encode("latin-1"))
    config = tunelab.load_config(tiny_run_config(tmp_path / "run", bad))
    before = tree_state(tmp_path)

    with pytest.raises(TunelabError) as failed:
        train_on_ray(config, local_cluster, 2)

    message = str(failed.value)
    assert str(bad) in message and "UTF-8" in message, message
    assert len(message.splitlines()) == 1 and "Traceback" not in message and "Ray" not in message, message
    assert tree_state(tmp_path) == before  # nothing written: no run directory, no Ray records
