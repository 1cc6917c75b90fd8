"""Layerwise sampled fine-tuning (`lisa`, `owlore`): at every step the embeddings/head/final norm and
exactly γ decoder layers get gradients and change, the other layers none; the layers are re-drawn
every K steps as a pure function of (seed, period); OwLore draws with probabilities ∝ OWL's outlier
ratios (computed here independently); resume across a re-draw is bitwise exact; the forward is the
plain model's; counts, reload, merge, loss and bad options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tunelab
from helpers import assert_tensors_equal, load_adapter, read_metrics, tiny_run_config, train_keeping_model, write_records_data
from peft_oracle import (
    assert_close,
    assert_merge_exact,
    attach,
    fresh_base,
    probe_ids,
    randomize,
    smollm2_skeleton,
    tiny_method_config,
    train_tiny_run,
    trainable_count,
)
from tunelab.errors import TunelabError
from tunelab.methods.layer_sampling import Lisa
from tunelab.models.tiny import tiny_tokenizer
from tunelab.runs import load_run

OUTSIDE = {"model.embed_tokens.weight", "model.norm.weight"}  # the tiny model ties lm_head to the embeddings
# Seed 1 draws, with γ = 1 of the tiny model's 2 layers, layer 0 in period 0 and layer 1 in periods 1, 2.
ONE_LAYER = {"n_layers": 1, "seed": 1}
METHODS = ["lisa", "owlore"]


def layer_names(model, index: int) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.startswith(f"model.layers.{index}.")}


def deep_base(layers: int, seed: int = 7) -> LlamaForCausalLM:
    """The tiny model's shape with more decoder layers (to sample from)."""
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def uniform_draw(seed: int, step: int, interval: int, n_layers: int, layers: int, p=None) -> list[int]:
    """The specification of the draw: period ⌊(step − 1) / K⌋, numpy's Generator seeded (seed, period)."""
    rng = np.random.default_rng([seed, (step - 1) // interval])
    return sorted(rng.choice(layers, size=n_layers, replace=False, p=p).tolist())


# ---- Forward and gradients: the plain model, gradients to exactly the active tensors


@pytest.mark.parametrize("name", METHODS)
def test_forward_is_the_plain_model_with_the_same_tensors(name):
    model, method = attach({"name": name})
    assert sum(1 for _ in model.named_modules()) == sum(1 for _ in fresh_base().named_modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe_ids()).logits, fresh_base()(input_ids=probe_ids()).logits)
    randomize(method, model)
    reference = fresh_base()
    reference.load_state_dict({k: v.clone() for k, v in method.state_dict(model).items()}, strict=False)
    with torch.no_grad():
        assert_close(model(input_ids=probe_ids()).logits, reference(input_ids=probe_ids()).logits, 1e-6, "logits")


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_exactly_the_active_layers_and_equal_full_fine_tuning(name):
    model, method = attach({"name": name, **ONE_LAYER})
    randomize(method, model)
    everything = fresh_base()
    everything.load_state_dict({k: v.clone() for k, v in method.state_dict(model).items()}, strict=False)
    ids = probe_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    everything(input_ids=ids, labels=ids).loss.backward()
    full = dict(everything.named_parameters())
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert method.active_layers(1) == [0]
    assert with_grad == OUTSIDE | layer_names(model, 0)
    for n in with_grad:
        assert_close(dict(model.named_parameters())[n].grad, full[n].grad, 1e-6, f"gradient of {n}")


# ---- Training: per step, exactly γ layers (and the outside) get gradients and change


def train_recording_steps(tmp_path, monkeypatch, options: dict, steps: int):
    """A tiny run; per step (seen in after_step: gradients still present, update done), the tensors
    with a gradient and the tensors that changed in the step; and the trained model."""
    record: list[dict] = []
    after_step = Lisa.after_step
    previous = {n: p.detach().clone() for n, p in fresh_base().named_parameters()}

    def recording_after_step(self, model, step, total_steps):
        now = {n: p.detach().clone() for n, p in model.named_parameters()}
        record.append(
            {
                "step": step,
                "active": self.active_layers(step),
                "with_grad": {n for n, p in model.named_parameters() if p.grad is not None},
                "changed": {n for n in now if not torch.equal(now[n], previous[n])},
                "trainable_now": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
        )
        previous.update(now)
        after_step(self, model, step, total_steps)

    monkeypatch.setattr(Lisa, "after_step", recording_after_step)
    result, kept = train_keeping_model(monkeypatch, tiny_method_config(tmp_path, options, steps))
    return result.output_dir, record, kept["model"]


@pytest.mark.parametrize("name", METHODS)
def test_each_step_trains_exactly_the_sampled_layers(name, tmp_path, monkeypatch):
    interval = 2
    options = {"name": name, **ONE_LAYER, "interval": interval}
    run, record, trained = train_recording_steps(tmp_path, monkeypatch, options, steps=6)
    layer_size = sum(p.numel() for p in trained.model.layers[0].parameters())
    outside_size = sum(p.numel() for n, p in trained.named_parameters() if n in OUTSIDE)
    assert [r["step"] for r in record] == list(range(1, 7))
    for r in record:
        expected_layers = uniform_draw(seed=1, step=r["step"], interval=interval, n_layers=1, layers=2)
        assert r["active"] == expected_layers
        trained_now = OUTSIDE | layer_names(trained, expected_layers[0])
        assert r["with_grad"] == trained_now, r["step"]
        assert r["changed"] == trained_now, r["step"]  # every other tensor bitwise as before the step
        assert r["trainable_now"] == outside_size + layer_size  # the paper's memory figure, γ = 1
    actives = [r["active"] for r in record]
    assert actives == [[0], [0], [1], [1], [1], [1]]  # constant in a period, re-drawn at steps 3 and 5
    # The adapter holds every tensor that may train: all of the model's, as trained.
    adapter = load_adapter(run)
    assert set(adapter) == set(dict(trained.named_parameters()))
    assert all(torch.equal(adapter[n], p) for n, p in trained.named_parameters())


def test_a_frozen_layer_keeps_its_adam_moments_and_gets_no_weight_decay():
    """One AdamW for the run: a layer's moments and step count stand still while it is frozen."""
    model, method = attach({"name": "lisa", **ONE_LAYER, "interval": 1})
    optimizer = torch.optim.AdamW(method.trainable_parameters(model).values(), lr=1e-2, weight_decay=0.1)
    layer0 = model.model.layers[0].mlp.down_proj.weight
    ids = probe_ids()
    for step in (1, 2):  # layer 0 trains at step 1 (period 0), layer 1 at step 2 (period 1)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if step == 1:
            after_first = {k: v.clone() for k, v in optimizer.state[layer0].items()}
            weight_after_first = layer0.detach().clone()
        method.after_step(model, step, 2)
        optimizer.zero_grad(set_to_none=True)
    assert method.active_layers(2) == [1]
    assert all(torch.equal(optimizer.state[layer0][k], v) for k, v in after_first.items())
    assert torch.equal(layer0, weight_after_first)


# ---- The draw: a pure function of (seed, period)


def test_lisa_draw_is_a_seeded_function_of_the_period_and_uniform():
    layers, n_layers, interval = 8, 2, 5
    model, method = attach({"name": "lisa", "n_layers": n_layers, "interval": interval, "seed": 3}, deep_base(layers))
    steps = range(1, 400 * interval + 1)
    drawn = {step: method.active_layers(step) for step in steps}
    assert all(len(set(d)) == n_layers and all(0 <= k < layers for k in d) for d in drawn.values())
    assert all(drawn[s] == uniform_draw(3, s, interval, n_layers, layers) for s in steps)
    assert all(drawn[s] == drawn[s - 1] for s in steps if (s - 1) % interval)  # constant inside a period
    per_period = [drawn[s] for s in steps if (s - 1) % interval == 0]
    assert sum(a != b for a, b in zip(per_period, per_period[1:])) > 300  # re-drawn, mostly different
    # Uniform: each layer is in n_layers/layers = 1/4 of the 400 draws (100 expected; ± 4σ ≈ 35).
    counts = np.bincount(np.concatenate(per_period), minlength=layers)
    assert all(65 <= c <= 135 for c in counts), counts
    # Not the global RNG's order: reseeding it changes nothing; another seed draws otherwise.
    torch.manual_seed(99), np.random.seed(99)
    _, again = attach({"name": "lisa", "n_layers": n_layers, "interval": interval, "seed": 3}, deep_base(layers))
    assert all(again.active_layers(s) == drawn[s] for s in steps)
    _, other = attach({"name": "lisa", "n_layers": n_layers, "interval": interval, "seed": 4}, deep_base(layers))
    assert [other.active_layers(s) for s in steps] != [drawn[s] for s in steps]


def test_the_requires_grad_state_follows_the_draw_at_step_boundaries():
    model, method = attach({"name": "lisa", "n_layers": 3, "interval": 4, "seed": 5}, deep_base(6))
    for step in range(1, 13):
        active = {k for k, layer in enumerate(model.model.layers) if all(p.requires_grad for p in layer.parameters())}
        frozen = {k for k, layer in enumerate(model.model.layers) if not any(p.requires_grad for p in layer.parameters())}
        assert active == set(uniform_draw(5, step, 4, 3, 6)) and frozen == set(range(6)) - active, step
        assert model.model.embed_tokens.weight.requires_grad and model.model.norm.weight.requires_grad
        method.after_step(model, step, 12)


# ---- OwLore: probabilities ∝ outlier ratios


def plant_outliers(model, per_layer: list[int]) -> None:
    """Set `per_layer[l]` weights of layer l's linear layers to a large value (heavy tails)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, count in zip(model.model.layers, per_layer):
            linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            for k in range(count):
                weight = linears[k % len(linears)].weight
                row, col = (int(torch.randint(n, (1,), generator=generator)) for n in weight.shape)
                weight[row, col] = 1.0 + k / 100


def outlier_ratios_by_hand(model, threshold: float) -> np.ndarray:
    """OWL's layer outlier ratio with the |W| score: all linear weights of a layer in one vector."""
    ratios = []
    for layer in model.model.layers:
        scores = torch.cat([m.weight.detach().abs().flatten() for m in layer.modules() if isinstance(m, torch.nn.Linear)])
        ratios.append((scores > threshold * scores.mean()).sum().item() / scores.numel())
    return np.array(ratios)


def test_owlore_probabilities_follow_the_outlier_ratios():
    model = deep_base(5)
    assert not outlier_ratios_by_hand(model, 13.0).any()  # random init: no weight is 13x the mean |W|
    plant_outliers(model, [0, 3, 10, 20, 40])
    ratios = outlier_ratios_by_hand(model, 13.0)
    assert ratios[0] == 0 and all(ratios[1:] > 0) and len(set(ratios)) == 5
    expected = ratios / ratios.sum()
    model, method = attach({"name": "owlore", "n_layers": 1, "interval": 1, "seed": 2}, model)
    np.testing.assert_allclose(method.probabilities, expected, rtol=1e-9)
    assert all(method.active_layers(s) == uniform_draw(2, s, 1, 1, 5, expected) for s in range(1, 50))
    # Empirical frequencies over 4000 periods follow p (σ ≤ 0.008); layer 0, without outliers, never trains.
    frequencies = np.bincount([method.active_layers(s)[0] for s in range(1, 4001)], minlength=5) / 4000
    assert frequencies[0] == 0
    np.testing.assert_allclose(frequencies, expected, atol=0.03)
    # A lower threshold counts more outliers, so other probabilities.
    _, lower = attach({"name": "owlore", "n_layers": 1, "outlier_threshold": 3.0}, model)
    np.testing.assert_allclose(lower.probabilities, (r := outlier_ratios_by_hand(model, 3.0)) / r.sum(), rtol=1e-9)
    assert not np.allclose(lower.probabilities, expected)


def test_owlore_draws_uniformly_when_fewer_than_gamma_layers_have_outliers():
    model = deep_base(4)
    plant_outliers(model, [0, 0, 0, 5])  # one layer with outliers, γ = 2
    _, owlore = attach({"name": "owlore", "n_layers": 2, "seed": 4}, model)
    _, lisa = attach({"name": "lisa", "n_layers": 2, "seed": 4}, deep_base(4))
    assert owlore.probabilities is None
    assert all(owlore.active_layers(s) == lisa.active_layers(s) for s in range(1, 200, 20))


@pytest.mark.parametrize("name", METHODS)
def test_attach_works_on_meta(name):
    model, method = attach({"name": name}, smollm2_skeleton())
    assert all(p.is_meta for p in method.trainable_parameters(model).values())


# ---- Resume across a re-draw


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(("interval", "resumed_period"), [(2, 2), (3, 1)])
def test_resume_across_a_redraw_is_bitwise_exact(name, interval, resumed_period, tmp_path):
    """Checkpoint at step 4, resume at step 5: the first step of period 2 (K = 2) or the middle of
    period 1 (K = 3). Both draw another layer than period 0, which a fresh attach would start with."""
    assert uniform_draw(1, 5, interval, 1, 2) != uniform_draw(1, 1, interval, 1, 2)
    assert (5 - 1) // interval == resumed_period
    train_file = write_records_data(tmp_path / "data", n_train=8)[0]
    config = tiny_run_config(
        tmp_path / "run",
        train_file,
        method={"name": name, **ONE_LAYER, "interval": interval},
        train={"max_steps": 6, "save_every": 4, "keep_checkpoints": 5, "lr": 1e-2},
    )
    tunelab.train(config)
    finished, losses = load_adapter(config["output"]), [m["loss"] for m in read_metrics(config["output"])]
    report = tunelab.train(config, resume=True).report
    assert report["resumed_from_step"] == 4
    assert_tensors_equal(load_adapter(config["output"]), finished)
    assert [m["loss"] for m in read_metrics(config["output"])] == losses


# ---- Counts


def layer_parameters(config) -> int:
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_counts(name, shape):
    """May train: tied embeddings V·h + final norm h + L layers. At once (the paper's memory): γ layers."""
    make = fresh_base if shape == "tiny" else smollm2_skeleton
    config = make().config
    outside = config.vocab_size * config.hidden_size + config.hidden_size
    layer = layer_parameters(config)
    assert trainable_count({"name": name}, make()) == outside + config.num_hidden_layers * layer
    model, _ = attach({"name": name}, make())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == outside + 2 * layer  # γ = 2
    if shape == "smollm2-135m":
        assert outside + config.num_hidden_layers * layer == 134_515_008  # every parameter of SmolLM2-135M
        assert outside + 2 * layer == 35_392_320  # 49152·576 + 576 + 2 · 3,540,096


# ---- Reload, merge, loss


@pytest.mark.parametrize("name", METHODS)
def test_trained_run_reloads_with_the_same_logits(name, tmp_path, monkeypatch):
    run, _, trained = train_recording_steps(tmp_path, monkeypatch, {"name": name, **ONE_LAYER, "interval": 2}, steps=4)
    loaded = load_run(run).model.eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe_ids()).logits, trained.eval()(input_ids=probe_ids()).logits)


@pytest.mark.parametrize("name", METHODS)
def test_merge_exact(name):
    assert_merge_exact({"name": name})


# From ~5.53 (uniform over the byte vocabulary) in 12 steps at lr 1e-2: the embeddings always train.
@pytest.mark.parametrize("name", METHODS)
def test_loss_goes_down(name, tmp_path):
    run = train_tiny_run(tmp_path, {"name": name, **ONE_LAYER, "interval": 4}, steps=12, lr=1e-2)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 1.5, losses


# ---- Options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "lisa", "n_layers": 3}, r"method.n_layers: 3 layers cannot train at a time: LlamaForCausalLM has 2"),
        ({"name": "owlore", "n_layers": 3}, r"method.n_layers: 3 layers cannot train"),
        ({"name": "lisa", "n_layers": 0}, r"method.n_layers"),
        ({"name": "lisa", "interval": 0}, r"method.interval"),
        ({"name": "lisa", "seed": -1}, r"method.seed"),
        ({"name": "owlore", "outlier_threshold": 1.0}, r"method.outlier_threshold"),
        ({"name": "owlore", "outlier_score": "wanda"}, r"method.outlier_score"),
        ({"name": "lisa", "outlier_threshold": 5.0}, r"method.outlier_threshold`: unknown key"),
        ({"name": "lisa", "layers": 2}, r"method.layers`: unknown key"),
    ],
)
def test_bad_options_fail_clearly(options, message):
    with pytest.raises(TunelabError, match=message):
        attach(options)
