"""SubTuning: the greedy layer choice against an independent brute-force greedy on a 4-layer tiny
model, the weights restored after it, the choice saved and restored by load_run and resume without
choosing again, the model's own forward and gradients on the chosen layers, the paper's count,
merge, options, and a short run."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import tunelab
from helpers import assert_tensors_equal, load_adapter, read_metrics, tiny_run_config, write_records_data
from peft_oracle import (
    assert_close,
    assert_merge_exact,
    attach,
    forbid_prepare,
    fresh_base,
    prepare_batches,
    probe_ids,
    randomize,
    smollm2_skeleton,
    train_tiny_run,
    trainable_count,
)
from tunelab.errors import TunelabError
from tunelab.methods.subtuning import SubTuning
from tunelab.objectives.causal_lm import causal_lm_loss
from tunelab.runs import ADAPTER_FILE, load_run


def four_layer_base() -> LlamaForCausalLM:
    config = copy.deepcopy(fresh_base().config)
    config.num_hidden_layers = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        return LlamaForCausalLM(config)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


# ---- Greedy selection


def brute_force_greedy(probe, held_out, k: int, steps: int, lr: float) -> tuple[list[int], list[dict[int, float]]]:
    """Each round, every remaining layer: a fresh model, Adam on (chosen ∪ {layer}) for `steps`
    micro-batches, the held-out loss Σ loss / Σ targets; keep the lowest (ties: the lower layer)."""
    chosen, rounds = [], []
    while len(chosen) < k:
        losses = {}
        for candidate in range(4):
            if candidate in chosen:
                continue
            model = four_layer_base().requires_grad_(False)
            for index in chosen + [candidate]:
                model.model.layers[index].requires_grad_(True)
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
            for step in range(steps):
                batch = probe[step % len(probe)]
                (causal_lm_loss(model, batch) / batch.n_targets).backward()
                optimizer.step()
                optimizer.zero_grad()
            with torch.no_grad():
                losses[candidate] = sum(causal_lm_loss(model, b).item() for b in held_out) / sum(b.n_targets for b in held_out)
        chosen.append(min(losses, key=lambda c: (losses[c], c)))
        rounds.append(losses)
    return sorted(chosen), rounds


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_choice_equals_brute_force_greedy(k):
    options = {"name": "subtuning", "num_layers": k, "probe_steps": 3, "probe_lr": 2e-2, "held_out_steps": 1}
    model, method = attach(options, four_layer_base())
    batches = prepare_batches(4)  # 3 probe steps' batches + 1 held-out step's
    method.prepare(model, batches, causal_lm_loss)
    expected, rounds = brute_force_greedy(batches[:3], batches[3:], k, 3, 2e-2)
    for losses in rounds:
        best, second = sorted(losses.values())[:2]
        assert second - best > 1e-5, f"a near tie would not test the choice: {losses}"
    assert method.layers == expected
    assert torch.equal(method.state_dict(model)["subtuning.layers"], torch.tensor(expected))
    trained = {layer_of(n) for n in method.trainable_parameters(model)}
    assert trained == set(expected)
    # The probes' fine-tunes are undone: every weight is the initial one.
    initial = dict(four_layer_base().named_parameters())
    assert all(torch.equal(p, initial[n]) for n, p in model.named_parameters())


def test_greedy_choice_is_deterministic():
    options = {"name": "subtuning", "num_layers": 2, "probe_lr": 2e-2}
    chosen = []
    for _ in range(2):
        model, method = attach(options, four_layer_base())
        method.prepare(model, prepare_batches(5), causal_lm_loss)
        chosen.append(method.layers)
    assert chosen[0] == chosen[1]


# ---- The model's own forward and gradients, on the chosen layers only


def test_forward_and_gradients_are_the_models_own_on_the_chosen_layers():
    model, method = attach({"name": "subtuning", "num_layers": 1})
    randomize(method, model, scale=0.05)
    trained = method.state_dict(model)
    assert {layer_of(n) for n in trained if n != "subtuning.layers"} == {1}  # the placeholder: the last layer
    expected = fresh_base()
    expected.load_state_dict({k: v for k, v in trained.items() if k != "subtuning.layers"}, strict=False)
    assert_close(model(input_ids=probe_ids()).logits, expected(input_ids=probe_ids()).logits, 1e-6, "logits")
    model(input_ids=probe_ids(), labels=probe_ids()).loss.backward()
    expected(input_ids=probe_ids(), labels=probe_ids()).loss.backward()
    grads = {n: p.grad for n, p in expected.named_parameters()}
    for name, param in model.named_parameters():
        if layer_of(name) == 1:
            assert_close(param.grad, grads[name], 1e-5, f"gradient of {name}")
        else:
            assert param.grad is None, name


# ---- Runs: the choice is saved, and load_run / resume rebuild it without choosing again


def choose_first_layer(monkeypatch):
    """A prepare that picks layer 0, unlike attach's placeholder (the last layer)."""
    monkeypatch.setattr(SubTuning, "prepare", lambda self, model, batches, loss_fn: self._train_layers(model, [0]))


OPTIONS = {"name": "subtuning", "num_layers": 1, "probe_lr": 1e-2}


def test_run_saves_the_choice_and_load_run_restores_it(tmp_path, monkeypatch):
    run = train_tiny_run(tmp_path, OPTIONS, steps=3, lr=1e-3)
    saved = load_file(run / "adapter" / ADAPTER_FILE)
    chosen = saved["subtuning.layers"].tolist()
    forbid_prepare(monkeypatch, SubTuning)
    loaded = load_run(run)
    assert loaded.method.layers == chosen
    base = dict(fresh_base().named_parameters())
    for name, param in loaded.model.named_parameters():
        if layer_of(name) in chosen:
            assert torch.equal(param, saved[name]) and not torch.equal(param, base[name]), name
        else:  # frozen: unchanged by training
            assert torch.equal(param, base[name]), name
    expected = fresh_base()
    expected.load_state_dict({k: v for k, v in saved.items() if k != "subtuning.layers"}, strict=False)
    with torch.no_grad():
        assert_close(loaded.model.eval()(input_ids=probe_ids()).logits, expected.eval()(input_ids=probe_ids()).logits, 1e-6, "reloaded")


def test_run_trains_the_layer_prepare_chose(tmp_path, monkeypatch):
    choose_first_layer(monkeypatch)
    run = train_tiny_run(tmp_path, OPTIONS, steps=2, lr=1e-3)
    saved = load_file(run / "adapter" / ADAPTER_FILE)
    assert saved["subtuning.layers"].tolist() == [0]
    assert {layer_of(n) for n in saved if n != "subtuning.layers"} == {0}


def test_resume_equals_an_uninterrupted_run_without_choosing_again(tmp_path, monkeypatch):
    """With a choice other than attach's placeholder, so the resumed optimizer must move onto it."""
    choose_first_layer(monkeypatch)
    train_file, _ = write_records_data(tmp_path / "data", n_train=8)
    config = tiny_run_config(tmp_path / "run", train_file, method=OPTIONS, train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 5})
    tunelab.train(config)
    finished = load_adapter(config["output"])
    forbid_prepare(monkeypatch, SubTuning)
    assert tunelab.train(config, resume=True).report["resumed_from_step"] == 2
    assert_tensors_equal(load_adapter(config["output"]), finished)


def test_report_counts_the_choice_apart_from_training_and_resume_keeps_it(tmp_path, monkeypatch):
    """prepare_seconds covers at least the measured prepare call; train_seconds excludes it; a
    resumed run (which does not choose again) reports the original run's figure."""
    measured = []
    real_prepare = SubTuning.prepare

    def timed_prepare(self, model, batches, loss_fn):
        started = time.perf_counter()
        real_prepare(self, model, batches, loss_fn)
        measured.append(time.perf_counter() - started)

    monkeypatch.setattr(SubTuning, "prepare", timed_prepare)
    train_file, _ = write_records_data(tmp_path / "data", n_train=8)
    config = tiny_run_config(tmp_path / "run", train_file, method=OPTIONS, train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 5})
    report = tunelab.train(config).report
    assert len(measured) == 1 and measured[0] <= report["prepare_seconds"] <= report["total_seconds"] - report["train_seconds"]
    forbid_prepare(monkeypatch, SubTuning)
    resumed = tunelab.train(config, resume=True).report
    assert resumed["resumed_from_step"] == 2 and resumed["prepare_seconds"] == report["prepare_seconds"]


# ---- Count, merge, training, options


def layer_numel(model) -> int:
    return sum(p.numel() for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    h, i = model.config.hidden_size, model.config.intermediate_size
    kv = model.config.num_key_value_heads * (h // model.config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    assert layer_numel(model) == per_layer
    assert trainable_count({"name": "subtuning"}, model) == 2 * per_layer
    if shape == "smollm2-135m":
        assert trainable_count({"name": "subtuning", "num_layers": 3}, smollm2_skeleton()) == 3 * 3_540_096


def test_merge_exact():
    assert_merge_exact({"name": "subtuning"})


def test_loss_goes_down(tmp_path):
    run = train_tiny_run(tmp_path, {"name": "subtuning", "num_layers": 1, "probe_lr": 1e-2}, steps=12, lr=1e-2)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.15, losses


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_layers": 0}, "num_layers"),
        ({"probe_steps": 0}, "probe_steps"),
        ({"probe_lr": 0.0}, "probe_lr"),
        ({"held_out_steps": 0}, "held_out_steps"),
        ({"layers": [0]}, "layers"),
    ],
)
def test_bad_options_fail_validation(options, message):
    with pytest.raises(Exception, match=message):
        attach({"name": "subtuning", **options})


def test_more_layers_than_the_model_has_fails_clearly():
    with pytest.raises(TunelabError, match=r"method.num_layers: 3 is more than the model's 2 decoder layers"):
        attach({"name": "subtuning", "num_layers": 3})


def test_weights_with_a_bad_choice_fail_clearly():
    model, method = attach({"name": "subtuning", "num_layers": 1})
    state = method.state_dict(model)
    with pytest.raises(TunelabError, match="subtuning.layers"):
        method.load_state_dict(model, {**state, "subtuning.layers": torch.tensor([2])}, "test")
    with pytest.raises(TunelabError, match="no 'subtuning.layers'"):
        method.load_state_dict(model, {k: v for k, v in state.items() if k != "subtuning.layers"}, "test")
