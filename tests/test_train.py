"""The training loop, checkpoints, schedule and run artifacts, on the in-process `tiny-random-llama`.

Every run here is fp32 on the CPU with a fixed seed, so two runs that should agree can be compared
exactly (or to float32 rounding where the arithmetic differs on purpose, as with grad accumulation).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from helpers import (
    assert_tensors_equal,
    checkpoint_steps,
    kill_and_resume,
    load_adapter,
    load_checkpoint_weights,
    read_metrics,
    read_report,
    tiny_run_config,
    train_keeping_model,
    write_records_data,
)
from tunelab.errors import TrainingDiverged, TunelabError
from tunelab.models.tiny import tiny_llama, tiny_tokenizer
from tunelab.objectives import sft
from tunelab.runs import load_run
from tunelab.train.schedule import lr_at, warmup_steps

PROBE_TEXT = "On March 3, 2021, Maria Lopez (34) from Lisbon paid $1,299.00."


@pytest.fixture(autouse=True)
def tunelab_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own cache (tokenized data), never the user's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TUNELAB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> tuple[Path, Path]:
    """48 training and 4 eval rows of the synthetic record-extraction task (read-only inputs)."""
    return write_records_data(tmp_path_factory.mktemp("records"), n_train=48, n_eval=4, seed=0)


@torch.no_grad()
def logits_of(model, tokenizer, text: str = PROBE_TEXT) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    return input_ids, model(input_ids=input_ids).logits


# --- 1. gradient accumulation -----------------------------------------------------------------------


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_grad_accumulation_matches_one_big_batch(tmp_path, records, packing):
    train_file, _ = records
    lr = 1e-3
    runs = {}
    for batch_size, grad_accum in [(8, 1), (1, 8)]:
        config = tiny_run_config(
            tmp_path / f"bs{batch_size}",
            train_file,
            # 1024 holds three ~320-token samples, so the 8-sample batch really packs rows together.
            data={"packing": packing, "max_length": 1024 if packing else 384},
            train={"batch_size": batch_size, "grad_accum": grad_accum, "max_steps": 3, "lr": lr, "max_grad_norm": 1.0},
        )
        tunelab.train(config)
        runs[batch_size] = (read_metrics(config["output"]), load_adapter(config["output"]))

    (big_metrics, big_adapter), (accum_metrics, accum_adapter) = runs[8], runs[1]
    assert [m["step"] for m in big_metrics] == [m["step"] for m in accum_metrics] == [1, 2, 3]
    for big, accum in zip(big_metrics, accum_metrics):
        assert big["target_tokens"] == accum["target_tokens"]
        assert accum["loss"] == pytest.approx(big["loss"], rel=1e-5)
        assert accum["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-4)
    # The adapters differ only by float32 rounding: the sums run in another order (other padding,
    # packing and micro-batch splits), ~1e-7 relative in each gradient. Adam divides by sqrt(v), so
    # a rounding difference moves a weight by at most a small fraction of lr per step; 1e-3 * lr
    # leaves wide room for that, while a real accumulation error (e.g. per-micro-batch mean) moves
    # weights by O(lr) and fails.
    assert sorted(big_adapter) == sorted(accum_adapter)
    for name in big_adapter:
        torch.testing.assert_close(accum_adapter[name], big_adapter[name], rtol=1e-4, atol=1e-3 * lr, msg=name)


def test_packed_and_padded_training_give_the_same_losses(tmp_path, records):
    train_file, _ = records
    losses = {}
    for packing in (True, False):
        config = tiny_run_config(
            tmp_path / f"packing-{packing}",
            train_file,
            data={"packing": packing, "max_length": 1024},  # room for three samples per packed row
            train={"batch_size": 8, "max_steps": 3},
        )
        tunelab.train(config)
        losses[packing] = [(m["step"], m["target_tokens"], m["loss"]) for m in read_metrics(config["output"])]
    packed, padded = losses[True], losses[False]
    assert [(step, targets) for step, targets, _ in packed] == [(step, targets) for step, targets, _ in padded]
    assert len(packed) == 3
    assert [loss for *_, loss in packed] == pytest.approx([loss for *_, loss in padded], rel=1e-5)


# --- 2. exact resume after a real kill --------------------------------------------------------------


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, records):
    train_file, eval_file = records
    max_steps, kill_after = 16, 6  # ten steps after step-6 to land the kill in
    config = tiny_run_config(
        tmp_path / "run",
        train_file,
        eval_file,
        # Dropout makes the result depend on the RNG state, which the checkpoint must restore.
        # No packing and 8 x 384-token rows make a step long enough to kill mid-run.
        method={"dropout": 0.1},
        data={"packing": False, "max_length": 384},
        train={"max_steps": max_steps, "batch_size": 8, "save_every": 3, "keep_checkpoints": 2},
    )
    run_dir, reference_dir = kill_and_resume(tmp_path, config, kill_after)
    assert_tensors_equal(load_adapter(run_dir), load_adapter(reference_dir))
    metrics, reference_metrics = read_metrics(run_dir), read_metrics(reference_dir)
    assert [m["step"] for m in metrics] == list(range(1, max_steps + 1))
    assert [m["loss"] for m in metrics] == [m["loss"] for m in reference_metrics]
    report, reference_report = read_report(run_dir), read_report(reference_dir)
    assert report["resumed_from_step"] >= kill_after
    assert reference_report["resumed_from_step"] is None
    assert report["eval_loss"] == reference_report["eval_loss"]
    assert report["tokens"] == reference_report["tokens"]


# --- 3. checkpoints, resume and the output directory ------------------------------------------------


def test_keep_checkpoints_keeps_only_the_newest(tmp_path, records):
    train_file, _ = records
    max_steps, save_every, keep = 7, 1, 3
    config = tiny_run_config(
        tmp_path / "run",
        train_file,
        train={"max_steps": max_steps, "batch_size": 2, "save_every": save_every, "keep_checkpoints": keep},
    )
    tunelab.train(config)
    saved = list(range(save_every, max_steps, save_every))  # the final step is the artifact, not a checkpoint
    assert checkpoint_steps(config["output"]) == saved[-keep:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == sorted(f"step-{s}" for s in saved[-keep:])


def test_resume_ignores_and_cleans_an_interrupted_checkpoint_write(tmp_path, records):
    train_file, _ = records
    config = tiny_run_config(tmp_path / "run", train_file, train={"max_steps": 6, "batch_size": 2, "save_every": 2, "keep_checkpoints": 5})
    tunelab.train(config)
    finished_adapter = load_adapter(config["output"])
    assert checkpoint_steps(config["output"]) == [2, 4]
    # What a crash in the middle of writing the step-5 checkpoint leaves: a staging dir, half written.
    leftover = tmp_path / "run" / "checkpoints" / ".tmp-step-5-4242"
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_bytes(b"\x00garbage")

    report = tunelab.train(config, resume=True).report

    assert report["resumed_from_step"] == 4
    assert not leftover.exists()
    assert [m["step"] for m in read_metrics(config["output"])] == [1, 2, 3, 4, 5, 6]
    assert_tensors_equal(load_adapter(config["output"]), finished_adapter)


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, records):
    train_file, _ = records
    # Resuming into a directory that holds nothing yet is a plain first run.
    fresh = tiny_run_config(tmp_path / "fresh", train_file)
    assert tunelab.train(fresh, resume=True).report["resumed_from_step"] is None
    assert [m["step"] for m in read_metrics(fresh["output"])] == [1, 2, 3]

    # A finished run that saved no checkpoint restarts at step 1, and its metrics are not doubled.
    config = tiny_run_config(tmp_path / "run", train_file, train={"save_every": 0})
    tunelab.train(config)
    first_adapter = load_adapter(config["output"])
    assert checkpoint_steps(config["output"]) == []
    report = tunelab.train(config, resume=True).report
    assert report["resumed_from_step"] is None
    assert [m["step"] for m in read_metrics(config["output"])] == [1, 2, 3]
    assert_tensors_equal(load_adapter(config["output"]), first_adapter)
    assert_tensors_equal(load_adapter(fresh["output"]), first_adapter)


def test_resume_with_a_changed_config_names_the_key(tmp_path, records):
    train_file, _ = records
    config = tiny_run_config(tmp_path / "run", train_file, train={"max_steps": 4, "save_every": 2, "lr": 1e-3})
    tunelab.train(config)
    saved_config = (tmp_path / "run" / "config.yaml").read_text()

    with pytest.raises(TunelabError, match=r"train\.lr") as raised:
        tunelab.train(config, overrides=["train.lr=5e-3"], resume=True)
    assert "train.save_every" not in str(raised.value)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved_config

    # Checkpoint cadence may change on resume: it does not alter the result.
    report = tunelab.train(config, overrides=["train.save_every=1"], resume=True).report
    assert report["resumed_from_step"] == 2


def test_existing_run_needs_resume_or_overwrite(tmp_path, records):
    train_file, _ = records
    output = tmp_path / "run"
    config = tiny_run_config(output, train_file, train={"max_steps": 2, "save_every": 1})
    tunelab.train(config)
    (output / "notes.txt").write_text("mine, not the run's")
    report_before = (output / "report.json").read_text()

    with pytest.raises(TunelabError) as raised:
        tunelab.train(config)
    message = str(raised.value)
    assert str(output) in message and "--resume" in message and "--overwrite" in message
    assert (output / "report.json").read_text() == report_before
    assert checkpoint_steps(output) == [1]

    changed = tiny_run_config(output, train_file, train={"max_steps": 3, "save_every": 0})
    report = tunelab.train(changed, overwrite=True).report
    assert report["steps"] == 3 and report["resumed_from_step"] is None
    assert [m["step"] for m in read_metrics(output)] == [1, 2, 3]
    assert checkpoint_steps(output) == []  # the old run's checkpoints are gone
    assert (output / "notes.txt").read_text() == "mine, not the run's"  # files that are not the run's stay


# --- 4. divergence ---------------------------------------------------------------------------------


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, records, monkeypatch):
    train_file, _ = records
    nan_from_call = 4  # one loss call per step (batch_size=2, grad_accum=1): step 4 diverges
    train = {"max_steps": 6, "batch_size": 2, "save_every": 2, "keep_checkpoints": 5}
    diverged = tiny_run_config(tmp_path / "diverged", train_file, train=train)
    calls = 0
    real_loss = sft.causal_lm_loss

    def loss_turning_nan(model, batch):
        nonlocal calls
        calls += 1
        loss = real_loss(model, batch)
        return loss * float("nan") if calls >= nan_from_call else loss

    monkeypatch.setattr(sft, "causal_lm_loss", loss_turning_nan)
    with pytest.raises(TrainingDiverged, match=r"step 4\b") as raised:
        tunelab.train(diverged)
    assert "step-2" in str(raised.value)
    run_dir = tmp_path / "diverged"
    assert checkpoint_steps(run_dir) == [2]
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not (run_dir / "adapter").exists() and not (run_dir / "report.json").exists()

    monkeypatch.setattr(sft, "causal_lm_loss", real_loss)
    healthy = tiny_run_config(tmp_path / "healthy", train_file, train=train)
    tunelab.train(healthy)
    assert_tensors_equal(load_checkpoint_weights(run_dir, 2), load_checkpoint_weights(healthy["output"], 2))
    # The checkpoint is complete: resuming from it (loss healthy again) ends where the clean run ends.
    assert tunelab.train(diverged, resume=True).report["resumed_from_step"] == 2
    assert_tensors_equal(load_adapter(run_dir), load_adapter(healthy["output"]))


# --- 5. artifacts ----------------------------------------------------------------------------------


def lora_parameter_count(r: int, target) -> int:
    """r * (in + out) over the targeted linear layers of a fresh tiny model (the output head excluded)."""
    model = tiny_llama(len(tiny_tokenizer()))
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        if target == "all-linear" or name.rsplit(".", 1)[-1] in target:
            total += r * (module.in_features + module.out_features)
    return total


@pytest.mark.parametrize("target", ["all-linear", ["q_proj", "down_proj"]], ids=["all-linear", "listed"])
def test_lora_run_report_config_and_reloaded_model(tmp_path, records, monkeypatch, target):
    train_file, eval_file = records
    r = 4
    config = tiny_run_config(tmp_path / "run", train_file, eval_file, method={"r": r, "target": target}, train={"max_steps": 3, "lr": 1e-2})
    result, trained = train_keeping_model(monkeypatch, config)
    output = tmp_path / "run"

    report = read_report(output)
    assert report == result.report
    metrics = read_metrics(output)
    assert report["final_train_loss"] == metrics[-1]["loss"] and math.isfinite(report["final_train_loss"])
    assert report["eval_loss"] == metrics[-1]["eval_loss"] and math.isfinite(report["eval_loss"])
    assert report["tokens"] == sum(m["tokens"] for m in metrics) > 0
    assert all(m["lr"] > 0 for m in metrics), "every step, the last one too, makes an update"
    assert 0 < report["train_seconds"] <= report["total_seconds"]
    assert report["peak_memory_mb"] > 0
    expected_params = lora_parameter_count(r, target)
    assert expected_params > 0
    assert report["trainable_params"] == expected_params
    assert sum(t.numel() for t in load_adapter(output).values()) == expected_params

    # config.yaml is the resolved config, and reads back to the same validated config.
    assert tunelab.load_config(output / "config.yaml") == tunelab.load_config(config)

    loaded = load_run(output)
    ids, logits = logits_of(loaded.model, loaded.tokenizer)
    trained_ids, trained_logits = logits_of(trained["model"], trained["tokenizer"])
    assert torch.equal(ids, trained_ids)
    assert torch.equal(logits, trained_logits)
    # The adapter matters: the untrained base model answers differently.
    _, base_logits = logits_of(tiny_llama(len(tiny_tokenizer())), tiny_tokenizer())
    assert not torch.allclose(logits, base_logits)


def test_full_finetune_writes_a_transformers_model(tmp_path, records, monkeypatch):
    train_file, _ = records
    config = tiny_run_config(tmp_path / "run", train_file, method={"name": "full"}, train={"max_steps": 2, "lr": 1e-3})
    result, trained = train_keeping_model(monkeypatch, config)
    output = tmp_path / "run"
    assert not (output / "adapter").exists()

    model = AutoModelForCausalLM.from_pretrained(output / "model")
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    ids, logits = logits_of(model, tokenizer)
    trained_ids, trained_logits = logits_of(trained["model"], trained["tokenizer"])
    assert torch.equal(ids, trained_ids)
    assert tokenizer.decode(ids[0]) == PROBE_TEXT
    assert torch.equal(logits, trained_logits)
    _, base_logits = logits_of(tiny_llama(len(tiny_tokenizer())), tiny_tokenizer())
    assert not torch.allclose(logits, base_logits)

    base = tiny_llama(len(tiny_tokenizer()))
    assert result.report["trainable_params"] == sum(p.numel() for p in base.parameters())
    assert torch.equal(logits_of(load_run(output).model, tokenizer)[1], logits)


# --- 6. learning -----------------------------------------------------------------------------------


def test_lora_loss_goes_down_on_the_records_task(tmp_path, records):
    train_file, _ = records
    config = tiny_run_config(
        tmp_path / "run",
        train_file,
        method={"r": 8, "alpha": 16.0},
        data={"packing": False},
        train={"max_steps": 30, "batch_size": 4, "lr": 1e-2, "scheduler": "constant"},
    )
    tunelab.train(config)
    losses = [m["loss"] for m in read_metrics(config["output"])]
    assert len(losses) == 30 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < losses[0]


# --- 7. learning-rate schedule ---------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("total, warmup", [(100, 10), (100, 0), (7, 2), (1, 0)])
def test_lr_schedule_shape(schedule, total, warmup):
    peak = 3e-4
    lrs = [lr_at(step, total, peak, schedule, warmup) for step in range(1, total + 1)]
    assert all(0 < lr <= peak for lr in lrs), "every step trains, none above the peak"
    warm, after = lrs[:warmup], lrs[warmup:]
    assert all(a < b for a, b in zip(warm, warm[1:])), "warmup rises strictly"
    assert max(lrs) == pytest.approx(peak)
    assert after[0] == pytest.approx(peak), "the first step after warmup is at the peak"
    if schedule == "constant":
        assert all(lr == pytest.approx(peak) for lr in after)
    else:
        assert all(a >= b for a, b in zip(after, after[1:])), "decay never rises"
        if total - warmup >= 20:
            assert lrs[-1] < 0.02 * peak, "ends near zero"


def test_warmup_fraction_and_step_count():
    assert warmup_steps(0.03, 100) == 3
    assert warmup_steps(0.05, 10) == 1  # a fraction rounds up: any warmup at all is at least one step
    assert warmup_steps(0, 100) == 0
    assert warmup_steps(5, 100) == 5
