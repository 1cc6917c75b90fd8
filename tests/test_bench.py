"""`tunelab bench`: both sides train the same samples (SFT against HF Trainer + peft, DPO against
TRL's DPOTrainer + peft, GRPO against TRL's GRPOTrainer + peft), the JSON has the contract's keys, and the FLOP count follows its formula.
Speed itself is measured by running the bench, never asserted here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tunelab.bench import Workload, run_bench, runner
from tunelab.bench.flops import training_flops
from tunelab.bench.runner import longest_trainable
from tunelab.bench.workload import ARITHMETIC, RECORD_PAIRS, SYNTHETIC, run_config, write_splits
from tunelab.cli.main import app
from tunelab.methods.lora import Lora, LoraOptions
from tunelab.models.tiny import tiny_llama

TINY = Workload(model="tiny-random-llama", data=SYNTHETIC, steps=2, batch_size=4, max_length=256, eval_samples=4, r=4, alpha=8)


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory, module_cache):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = run_bench(Workload(**TINY.as_dict()), out)
    return result, json.loads(out.read_text())


def test_bench_json_has_the_contract_keys(bench_result):
    result, saved = bench_result
    assert saved == json.loads(json.dumps(result))
    for key in ("workload", "tunelab", "hf_peft", "speedup", "memory_ratio", "matmul_peak_gflops", "tunelab_useful_gflops"):
        assert key in saved, key
    for side in ("tunelab", "hf_peft"):
        for key in ("tokens_per_s", "peak_rss_mb", "eval_loss"):
            assert saved[side][key] > 0, (side, key)
    assert saved["speedup"] == pytest.approx(saved["tunelab"]["tokens_per_s"] / saved["hf_peft"]["tokens_per_s"])
    assert saved["memory_ratio"] == pytest.approx(saved["tunelab"]["peak_rss_mb"] / saved["hf_peft"]["peak_rss_mb"])
    assert saved["matmul_peak_gflops"] > 0 and saved["tunelab_useful_gflops"] > 0


def test_both_sides_train_the_same_samples_to_the_same_model(bench_result):
    _, saved = bench_result
    tunelab, hf = saved["tunelab"], saved["hf_peft"]
    assert tunelab["tokens"] == hf["tokens"] == saved["workload"]["train_tokens"]
    assert tunelab["trainable_params"] == hf["trainable_params"]
    # Same init, samples, order, optimizer and schedule: the two trainers differ only in speed.
    assert tunelab["final_train_loss"] == pytest.approx(hf["final_train_loss"], rel=1e-4)
    assert tunelab["eval_loss"] == pytest.approx(hf["eval_loss"], rel=1e-4)


@pytest.fixture(scope="module")
def dpo_result(tmp_path_factory, module_cache):
    out = tmp_path_factory.mktemp("bench-dpo") / "bench.json"
    # fp32 frozen weights as TRL's: tunelab's default on CPUs with fast bf16 matmuls (bf16 copies of
    # the frozen weights) would move the losses after step 1 by more than the 1e-4 compared here.
    dpo = {"objective": "dpo", "data": None, "batch_size": 2, "eval_samples": 2, "frozen_dtype": "float32"}
    workload = Workload(**(TINY.as_dict() | dpo))
    with pytest.MonkeyPatch.context() as patch:  # the peak is measured by the SFT bench above; skip it here
        patch.setattr(runner, "matmul_peak_gflops", lambda dtype=None: 1.0)
        run_bench(workload, out)
    return json.loads(out.read_text())


def test_dpo_bench_trains_the_same_pairs_as_trl(dpo_result):
    saved = dpo_result
    assert saved["workload"]["objective"] == "dpo" and saved["workload"]["data"] == RECORD_PAIRS
    tunelab, trl = saved["tunelab"], saved["trl"]
    assert "hf_peft" not in saved
    for side in (tunelab, trl):
        assert side["tokens_per_s"] > 0 and side["peak_rss_mb"] > 0 and len(side["train_losses"]) == 2
    # Both count the real tokens of every chosen and rejected sequence; the same LoRA init on both.
    assert tunelab["tokens"] == trl["tokens"] == saved["workload"]["train_tokens"]
    assert tunelab["trainable_params"] == trl["trainable_params"]
    # LoRA starts at B = 0: the policy is its reference, so step 1 is ln 2 on both sides.
    assert trl["step1_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert saved["step1_loss_diff"] == abs(tunelab["step1_loss"] - trl["step1_loss"]) < 1e-4
    assert tunelab["final_train_loss"] == pytest.approx(trl["final_train_loss"], abs=1e-4)
    assert tunelab["eval_loss"] == pytest.approx(trl["eval_loss"], abs=1e-4)
    assert saved["speedup"] == pytest.approx(tunelab["tokens_per_s"] / trl["tokens_per_s"])
    assert saved["memory_ratio"] == pytest.approx(tunelab["peak_rss_mb"] / trl["peak_rss_mb"])


def test_grpo_bench_trains_trl_on_the_same_completions(tmp_path, module_cache):
    """TRL's GRPOTrainer samples its own completions (timed) and trains on tunelab's: the same
    completions each step, the same step-1 loss."""
    out = tmp_path / "bench.json"
    grpo = {"objective": "grpo", "data": None, "batch_size": 2, "frozen_dtype": "float32"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "matmul_peak_gflops", lambda dtype=None: 1.0)
        run_bench(Workload(**(TINY.as_dict() | grpo)), out)
    saved = json.loads(out.read_text())
    tunelab, trl = saved["tunelab"], saved["trl_grpo"]
    assert saved["workload"]["data"] == ARITHMETIC
    assert tunelab["completion_mean_lengths"] == trl["completion_mean_lengths"] and len(trl["completion_mean_lengths"]) == 2
    assert len(trl["train_losses"]) == 2 and saved["step1_loss_diff"] == abs(tunelab["step1_loss"] - trl["step1_loss"]) < 1e-6
    for side in (tunelab, trl):
        assert side["seconds_per_step"] == pytest.approx(side["sampling_seconds_per_step"] + side["update_seconds_per_step"])
        assert side["sampling_seconds_per_step"] > 0 and side["update_seconds_per_step"] > 0
    assert saved["speedup"] == pytest.approx(trl["seconds_per_step"] / tunelab["seconds_per_step"])


def test_dpo_workload_writes_preference_rows(tmp_path):
    for data, kind in ((RECORD_PAIRS, list), (SYNTHETIC, str)):
        workload = Workload(**(TINY.as_dict() | {"objective": "dpo", "data": data}))
        train_path, eval_path = write_splits(workload, tmp_path / data)
        train, held_out = json.loads(train_path.read_text()), json.loads(eval_path.read_text())
        assert len(train) == 8 and len(held_out) == 4
        assert all(isinstance(row["prompt"], kind) and row["chosen"] != row["rejected"] for row in train + held_out)
    config = run_config(workload, train_path, eval_path, tmp_path / "run")
    assert config["objective"] == {"name": "dpo", "beta": 0.1, "loss_type": "sigmoid"}


def test_workload_splits_are_disjoint_and_cycled(tmp_path):
    workload = Workload(**(TINY.as_dict() | {"steps": 3}))
    train_path, eval_path = write_splits(workload, tmp_path)
    train, held_out = json.loads(train_path.read_text()), json.loads(eval_path.read_text())
    assert len(train) == 12 and len(held_out) == 4
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in held_out}
    config = run_config(workload, train_path, eval_path, tmp_path / "run")
    assert config["train"]["max_steps"] == 3 and config["method"]["dropout"] == 0.0


def test_flop_count_follows_the_formula():
    model = tiny_llama(64)
    Lora(LoraOptions(r=4, alpha=8)).attach(model)
    c = model.config
    head = model.get_output_embeddings()
    frozen = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad and m is not head)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attention_width = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    samples = [(10, 4), (7, 7)]
    expected = sum(n * (4 * frozen + 6 * trained) + t * 4 * head.weight.numel() + 6 * c.num_hidden_layers * attention_width * n * n for n, t in samples)
    assert training_flops(model, samples) == pytest.approx(expected)
    assert training_flops(model, [(20, 4)]) > 2 * training_flops(model, [(10, 4)]), "attention grows quadratically"
    forward = sum(2 * n * (frozen + trained) + t * 2 * head.weight.numel() + 2 * c.num_hidden_layers * attention_width * n * n for n, t in samples)
    assert training_flops(model, samples, backward=False) == pytest.approx(forward)


def test_long_context_probe_stops_at_the_memory_budget():
    fits = longest_trainable(TINY, budget_mb=1e6, start=64, limit=64)
    assert fits["tunelab"]["longest_tokens"] == 64 and fits["hf_peft"]["longest_tokens"] == 64
    assert all(t["fits"] and t["peak_rss_mb"] > 0 for side in ("tunelab", "hf_peft") for t in fits[side]["tries"])
    # No process running torch fits in 50 MiB: the probe is stopped and counted as not fitting.
    over = longest_trainable(TINY, budget_mb=50, start=64, limit=64)
    assert over["tunelab"] == {"longest_tokens": 0, "tries": [{"tokens": 64, "fits": False, "peak_rss_mb": None}]}


def test_bench_command_rejects_methods_without_an_hf_counterpart(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--method", "vera", "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 1
    assert "only 'lora'" in result.output
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize(
    "options, message",
    [(["--objective", "kto"], "one of sft, dpo, grpo"), (["--objective", "dpo", "--long-context"], "--objective sft only")],
)
def test_bench_command_rejects_objectives_without_a_peer(tmp_path, options, message):
    result = CliRunner().invoke(app, ["bench", *options, "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "b.json").exists()


def test_matmul_peak_is_positive_and_finite():
    from tunelab.bench.flops import matmul_peak_gflops

    peak = matmul_peak_gflops(torch.device("cpu"), size=256, repeats=2)
    assert 0 < peak < 1e6
