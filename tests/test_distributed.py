"""Training in several processes (train/distributed.py): 2 ranks on CPU with gloo, forked with
torchrun's environment (one thread each). A run in 2 ranks x batch 4 is the one-process run of
batch 8; rank 0 alone writes; a killed rank is named by the others and the run resumes bit for bit;
methods that need whole tensors are refused under fsdp before anything is written. The launchers
themselves (`--nproc`, `torchrun -m tunelab`) are run once each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from helpers import (
    OBJECTIVES,
    Trigger,
    WriteAudit,
    assert_clean_failure,
    finish_cli,
    finish_ranks,
    invoke,
    objective_config,
    read_metrics,
    read_report,
    run_ranks,
    start_ranks,
    tree_state,
    write_objective_data,
    write_yaml,
)
from tunelab.errors import TunelabError
from tunelab.methods.registry import get_method_class, method_names
from tunelab.objectives.registry import build_objective, objective_options_model
from tunelab.train.distributed import resolve_mode

# Methods and objectives trained under fsdp here; every method not listed must refuse fsdp.
FSDP_CASES = [("full", "sft"), ("lora", "sft"), ("ia3", "sft"), ("lora", "dpo"), ("lora", "grpo")]


@pytest.fixture(scope="module")
def files(module_cache, tmp_path_factory):
    return write_objective_data(tmp_path_factory.mktemp("data"))


def weights(run_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a run's final weights (the adapter or model, and an objective's head)."""
    folder = run_dir / ("model" if (run_dir / "model").is_dir() else "adapter")
    return {f"{file.name}/{name}": t for file in sorted(folder.glob("*.safetensors")) for name, t in load_file(file).items()}


def one_and_two_processes(tmp_path, files, case: str, method: dict | None = None, distributed: str = "ddp", model: dict | None = None, **train) -> tuple:
    """The run of `case` in one process with batch 8, and in 2 ranks with batch 4 each."""
    # lr 1e-4: Adam divides each gradient entry by its own size, so for entries near zero it turns
    # the ranks' other summation order (a relative 1e-7) into updates of up to 1e-3 x lr.
    settings = {"max_steps": 3, "lr": 1e-4, **train}
    one = objective_config(tmp_path / "one", files, case, method=method, model=model, train={**settings, "batch_size": 8})
    two = objective_config(tmp_path / "two", files, case, method=method, model=model, train={**settings, "batch_size": 4, "distributed": distributed})
    tunelab.train(one)
    results = run_ranks(["train", write_yaml(tmp_path / "two.yaml", two)], tmp_path / "cache")
    for code, output in results:
        assert code == 0, output
    return tmp_path / "one", tmp_path / "two"


def assert_same_run(one, two, atol: float = 1e-6) -> None:
    losses = {run: [m["loss"] for m in read_metrics(run) if "loss" in m] for run in (one, two)}
    norms = {run: [m["grad_norm"] for m in read_metrics(run) if "loss" in m] for run in (one, two)}
    assert len(losses[one]) == 3
    assert losses[two] == pytest.approx(losses[one], rel=1e-5, abs=1e-7)
    # The gradients themselves (Adam's update would hide a gradient off by a constant factor).
    assert norms[two] == pytest.approx(norms[one], rel=1e-5)
    expected, actual = weights(one), weights(two)
    assert expected.keys() == actual.keys()
    worst = max((expected[name] - actual[name]).abs().max().item() for name in expected)
    assert worst <= atol, f"largest difference {worst}"
    assert read_report(two)["processes"] == 2


# Every objective (and DPO's precomputed reference); distillation's on-policy and prompt-only cases
# sample as GRPO and RAFT do, which are here.
DDP_CASES = [case for case in OBJECTIVES if case not in ("distill-on-policy", "distill-prompts")]


@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_two_ranks_of_batch_4_are_one_process_of_batch_8(case, files, tmp_path):
    one, two = one_and_two_processes(tmp_path, files, case)
    assert_same_run(one, two)
    assert read_report(two)["distributed"] == "ddp"


@pytest.mark.parametrize(("method", "case"), FSDP_CASES)
def test_fsdp_two_ranks_of_batch_4_are_one_process_of_batch_8(method, case, files, tmp_path):
    one, two = one_and_two_processes(tmp_path, files, case, method={"name": method}, distributed="fsdp")
    assert_same_run(one, two)
    assert read_report(two)["distributed"] == "fsdp"
    assert any((two / "checkpoints").glob("*/sharded/*.safetensors")) or not (two / "checkpoints").exists()


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A 2-layer random Llama 4x as wide as tiny-random-llama, saved as a model directory: its
    weights' NF4 blocks divide in 2 (tiny-random-llama's 64 x 64 weights hold one scale block)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models.tiny import tiny_tokenizer

    folder = tmp_path_factory.mktemp("wide-llama")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **shape)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_fsdp_shards_a_4bit_base_under_lora(files, wide_model, tmp_path):
    one, two = one_and_two_processes(tmp_path, files, "sft", distributed="fsdp", model={"name": str(wide_model), "quantize": "nf4"})
    assert_same_run(one, two)
    assert read_report(two)["quantize"]["scheme"] == "nf4"


def test_every_method_either_trains_sharded_here_or_says_why_it_cannot():
    sft = build_objective(objective_options_model("sft")(name="sft"))
    sharding = {name for name in method_names() if get_method_class(name).shards}
    assert sharding == {method for method, _ in FSDP_CASES}
    for name in set(method_names()) - sharding:
        method = get_method_class(name)(get_method_class(name).Options(name=name))
        if method.single_process_reason:  # sparse_ft
            with pytest.raises(TunelabError, match=f"method '{name}' trains in one process only: "):
                resolve_mode("ddp", method, sft, "adamw")
            continue
        with pytest.raises(TunelabError, match=f"method '{name}' needs each trainable tensor whole on every rank .*use train.distributed: ddp"):
            resolve_mode("fsdp", method, sft, "adamw")
        assert resolve_mode("auto", method, sft, "adamw") == "ddp"
    full = get_method_class("full")(get_method_class("full").Options(name="full"))
    assert resolve_mode("auto", full, sft, "adamw") == "fsdp"
    with pytest.raises(TunelabError, match="galore"):
        resolve_mode("fsdp", full, sft, "galore")
    with pytest.raises(TunelabError, match="objective 'reward' trains its own head"):
        resolve_mode("fsdp", full, types.SimpleNamespace(name="reward", trainable_parameters=lambda: {"head": None}), "adamw")


REFUSED_UNDER_FSDP = {
    "adalora": ({"method": {"name": "adalora"}}, "train.distributed: fsdp: method 'adalora' needs each trainable tensor whole"),
    "nf4-one-block": (
        {"model": {"quantize": "nf4"}},
        "train.distributed: fsdp: the NF4 weight model.layers.0.self_attn.q_proj.base_layer.weight (64, 64) cannot be cut in 2 equal shards",
    ),
}


def test_ddp_sums_gradients_of_every_dtype_in_place_and_keeps_a_missing_one_missing(tmp_path):
    """One gloo rank: a bf16 tensor beside fp32 ones, and one no rank gave a gradient."""
    import torch.distributed as dist

    from tunelab.train.distributed import Ranks

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(4))]
        params[0].grad, params[1].grad = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.25], dtype=torch.bfloat16)
        kept = params[0].grad
        Ranks(rank=0, world=1, mode="ddp").sum_gradients(params)
        assert params[0].grad is kept and params[0].grad.tolist() == [1.0, 2.0, 3.0]
        assert params[1].grad.dtype == torch.bfloat16 and params[1].grad.tolist() == [0.5, 0.25]
        assert params[2].grad is None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", REFUSED_UNDER_FSDP)
def test_what_cannot_shard_fails_on_every_rank_before_any_write(case, files, tmp_path):
    sections, message = REFUSED_UNDER_FSDP[case]
    config = objective_config(tmp_path / "run", files, "sft", train={"distributed": "fsdp"}, **sections)
    path = write_yaml(tmp_path / "run.yaml", config)
    before = tree_state(tmp_path)
    results = run_ranks(["train", path], tmp_path / "cache")
    assert [code for code, _ in results] == [1, 1]
    assert f"error: {message}" in results[0][1]
    assert "error:" not in results[1][1]  # said once, by rank 0
    assert {p: s for p, s in tree_state(tmp_path).items() if not p.startswith("cache")} == {p: s for p, s in before.items() if not p.startswith("cache")}


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_only_rank_0_writes(distributed, files, tmp_path):
    config = objective_config(tmp_path / "run", files, "sft", train={"max_steps": 3, "batch_size": 4, "save_every": 1, "eval_every": 2, "distributed": distributed})
    path = write_yaml(tmp_path / "run.yaml", config)
    audits = {rank: WriteAudit(str(tmp_path / "run"), str(tmp_path / f"writes-{rank}.txt")) for rank in (0, 1)}
    results = run_ranks(["train", path], tmp_path / "cache", triggers={rank: (audit,) for rank, audit in audits.items()})
    assert [code for code, _ in results] == [0, 0], results
    assert any("metrics.jsonl" in line for line in audits[0].paths()) and any("report.json" in line for line in audits[0].paths())
    rank1 = audits[1].paths()
    if distributed == "ddp":
        assert rank1 == []
    else:  # its shards of each checkpoint, into rank 0's temp directory of that checkpoint
        assert rank1 and all("/checkpoints/.tmp-step-" in line and "/sharded" in line for line in rank1), rank1
    assert "train" not in results[1][1] and "done" not in results[1][1]  # no progress, no summary


# Each engine once, and each rank once: the writer (rank 0) and a non-writer.
@pytest.mark.parametrize(("distributed", "killed"), [("ddp", 1), ("fsdp", 0)])
def test_a_killed_rank_is_named_and_the_run_resumes_bitwise(distributed, killed, files, tmp_path):
    config = objective_config(
        tmp_path / "run",
        files,
        "sft",
        method={"name": "full"} if distributed == "fsdp" else None,
        train={"max_steps": 5, "batch_size": 4, "save_every": 2, "distributed": distributed, "max_tokens_per_forward": 0},  # one forward a step
    )
    runs = {}
    for name in ("uninterrupted", "killed"):
        runs[name] = write_yaml(tmp_path / f"{name}.yaml", {**config, "output": str(tmp_path / name)})
    uninterrupted = start_ranks(["train", runs["uninterrupted"]], tmp_path / "cache-u")
    # Rank `killed` dies in step 4, after checkpoint step-2: under ddp as the step starts, under
    # fsdp inside its forward (the survivor is then inside FSDP's own collectives).
    point = Trigger("tunelab.train.loop", "train_step", 4) if distributed == "ddp" else Trigger("tunelab.train.loop", "step_loss", 4)
    started = time.monotonic()
    results = run_ranks(["train", runs["killed"]], tmp_path / "cache-k", triggers={killed: (point,)})
    survivor = 1 - killed
    assert results[killed][0] == -signal.SIGKILL
    code, output = results[survivor]
    assert code == 1 and f"rank {survivor} of 2: rank {killed} (pid " in output and "has exited" in output, output
    assert time.monotonic() - started < 50  # not the collective timeout (60 s)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-2"]

    for code, output in run_ranks(["train", runs["killed"], "--resume"], tmp_path / "cache-k"):
        assert code == 0, output
    for code, output in finish_ranks(uninterrupted):
        assert code == 0, output
    expected, actual = weights(tmp_path / "uninterrupted"), weights(tmp_path / "killed")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert read_report(tmp_path / "killed")["resumed_from_step"] == 2


def test_a_rank_that_stops_answering_ends_the_others_at_the_collective_timeout(files, tmp_path):
    config = objective_config(tmp_path / "run", files, "sft", train={"max_steps": 4, "batch_size": 4})
    path = write_yaml(tmp_path / "run.yaml", config)
    stop = Trigger("tunelab.train.loop", "train_step", 2, signum=signal.SIGSTOP)
    started = start_ranks(["train", path], tmp_path / "cache", triggers={1: (stop,)}, timeout_s=3)
    code, output = finish_cli(*started[0])
    assert code == 1 and "rank 0 of 2: another rank stopped answering while" in output, output
    os.kill(started[1][0].pid, signal.SIGKILL)
    started[1][0].join()


def test_sigterm_to_one_rank_stops_both_at_one_step_with_a_checkpoint(files, tmp_path):
    config = objective_config(tmp_path / "run", files, "sft", train={"max_steps": 5, "batch_size": 4, "save_every": 0})
    path = write_yaml(tmp_path / "run.yaml", config)
    results = run_ranks(["train", path], tmp_path / "cache", triggers={1: (Trigger("tunelab.train.loop", "train_step", 2, when="after", signum=signal.SIGTERM),)})
    assert [code for code, _ in results] == [143, 143], results
    assert "stopped: SIGTERM at step 2 of 5" in results[0][1]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-2"]
    for code, output in run_ranks(["train", path, "--resume"], tmp_path / "cache"):
        assert code == 0, output
    assert read_report(tmp_path / "run")["resumed_from_step"] == 2


def test_resuming_with_another_number_of_processes_is_refused(files, tmp_path):
    config = objective_config(tmp_path / "run", files, "sft", train={"max_steps": 2, "batch_size": 4, "save_every": 1})
    path = write_yaml(tmp_path / "run.yaml", config)
    for code, output in run_ranks(["train", path], tmp_path / "cache"):
        assert code == 0, output
    (tmp_path / "run" / "report.json").unlink()
    with pytest.raises(TunelabError, match=r"written by 2 process\(es\) \(train.distributed: ddp\); this run has 1"):
        tunelab.train(tunelab.load_config(path), resume=True)


@pytest.mark.parametrize("launcher", ["--nproc", "torchrun"])
def test_both_launchers_train_the_same_run(launcher, files, tmp_path):
    """`tunelab train --nproc 2` (which starts torchrun's launcher) and `torchrun -m tunelab train`."""
    one = objective_config(tmp_path / "one", files, "sft", train={"max_steps": 3, "lr": 1e-4, "batch_size": 8})
    one = tunelab.train(one).output_dir
    config = objective_config(tmp_path / "launched", files, "sft", train={"max_steps": 3, "lr": 1e-4, "batch_size": 4})
    path = write_yaml(tmp_path / "launched.yaml", config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELAB_CACHE": str(tmp_path / "cache" / "tunelab"), "HF_DATASETS_CACHE": str(tmp_path / "cache" / "hf")}
    if launcher == "--nproc":
        command = [sys.executable, "-m", "tunelab", "train", str(path), "--nproc", "2"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tunelab", "train", str(path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(one, tmp_path / "launched")


def test_nproc_and_ray_address_together_are_refused_before_any_write(files, tmp_path):
    path = write_yaml(tmp_path / "run.yaml", objective_config(tmp_path / "run", files, "sft"))
    before = tree_state(tmp_path)
    assert_clean_failure(invoke("train", path, "--nproc", "2", "--ray-address", "local"), "give --nproc or --ray-address, not both")
    assert tree_state(tmp_path) == before
