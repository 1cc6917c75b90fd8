"""(IA)^3 against peft (logits, gradients, round trips), its merge (bias included), its parameter
count against the paper's formula, options and peft configs, and a short training run."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict

from helpers import read_metrics
from peft_oracle import (
    assert_close,
    assert_equal_to_peft,
    assert_merge_exact,
    assert_round_trips,
    attach,
    fresh_base,
    probe_ids,
    randomize,
    smollm2_skeleton,
    train_tiny_run,
    trainable_count,
)
from tunelab.errors import TunelabError
from tunelab.methods.ia3 import Ia3, Ia3Linear

PAPER_TARGET = ["k_proj", "v_proj", "down_proj"]
# (tunelab options, the same as a peft config)
REGIMES = {
    "defaults": ({"name": "ia3"}, lambda: peft.IA3Config()),  # both: Llama's k, v, down (down scales inputs)
    "all-linear": (
        {"name": "ia3", "target": "all-linear", "feedforward": ["down_proj", "up_proj"]},
        lambda: peft.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj", "up_proj"]),
    ),
    "no feedforward": (
        {"name": "ia3", "target": ["q_proj", "down_proj"], "feedforward": []},
        lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=[]),
    ),
}


@pytest.mark.parametrize("regime", REGIMES)
def test_equal_to_peft(regime):
    ours, theirs = REGIMES[regime]
    assert_equal_to_peft(ours, theirs())


def test_starts_as_the_base_model():
    model, _ = attach({"name": "ia3"})
    layers = model.model.layers[0]
    assert layers.self_attn.k_proj.ia3_l.shape == (layers.self_attn.k_proj.out_features, 1)
    assert layers.mlp.down_proj.ia3_l.shape == (1, layers.mlp.down_proj.in_features)
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe_ids()).logits, fresh_base()(input_ids=probe_ids()).logits)


@pytest.mark.parametrize("regime", ["defaults", "all-linear"])
def test_merge_exact(regime):
    assert_merge_exact(REGIMES[regime][0])


@pytest.mark.parametrize("feedforward", [False, True])
def test_merge_scales_the_bias_only_on_the_output_side(feedforward):
    """(l ⊙ (Wx + b)) merges as diag(l)W and l ⊙ b; W(l ⊙ x) + b as W diag(l), b unchanged."""
    torch.manual_seed(0)
    layer = Ia3Linear(torch.nn.Linear(6, 4), feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l.add_(torch.randn(layer.ia3_l.shape) * 0.3)
    x = torch.randn(3, 6)
    l = layer.ia3_l.detach().flatten()
    expected = layer.base_layer(x * l) if feedforward else layer.base_layer(x) * l
    with torch.no_grad():
        assert_close(layer(x), expected, 1e-6, "forward")
        assert_close(layer.merged()(x), expected, 1e-6, "merged")


def test_round_trips_with_peft(tmp_path):
    assert_round_trips({"name": "ia3"}, peft.IA3Config(target_modules=PAPER_TARGET, feedforward_modules=["down_proj"]), tmp_path)


def ia3_formula(config, targets: dict[str, bool]) -> int:
    """Liu et al.: one scale per output of each attention-side target, one per input of each
    feedforward target (d_out or d_in per adapted matrix)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return layers * sum(shapes[name][0] if feedforward else shapes[name][1] for name, feedforward in targets.items())


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    expected = ia3_formula(model.config, {"k_proj": False, "v_proj": False, "down_proj": True})
    assert trainable_count({"name": "ia3"}, model) == expected
    if shape == "smollm2-135m":  # 30 · (192 + 192 + 1536): what peft reports for its defaults
        assert expected == 57_600


def test_loss_goes_down(tmp_path):
    # From ~5.53 (uniform over the byte vocabulary) to ~5.33 in 12 steps at this lr.
    run = train_tiny_run(tmp_path, {"name": "ia3", "target": "all-linear"}, steps=12, lr=0.1)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.15, losses


def test_half_precision_base_keeps_fp32_vectors():
    model, method = attach({"name": "ia3"}, fresh_base().to(torch.bfloat16))
    randomize(method, model)
    assert {p.dtype for p in method.trainable_parameters(model).values()} == {torch.float32}
    out = model(input_ids=probe_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters(model).values())


# ---- Options and peft configs


def test_feedforward_pattern_matching_no_target_fails_clearly():
    with pytest.raises(TunelabError, match=r"method.feedforward: \['down_prj'\] match none"):
        attach({"name": "ia3", "feedforward": ["down_prj"]})


def test_default_feedforward_need_not_be_targeted():
    """The default feedforward pattern (down_proj) may select no target: q and v scale outputs."""
    model, method = attach({"name": "ia3", "target": ["q_proj", "v_proj"]})
    assert not any(layer.feedforward for layer in method.adapter_layers(model).values())


@pytest.mark.parametrize(
    "given",
    [
        {"name": "ia3"},
        {"name": "ia3", "target": "all-linear", "feedforward": ["down_proj", "up_proj"]},
        # one down_proj scales its input, the other its output: peft gets them by full name
        {"name": "ia3", "feedforward": ["model.layers.0.mlp.down_proj"]},
    ],
)
def test_peft_config_builds_the_same_layers_in_peft(given):
    model, method = attach(given)
    config, _ = method.peft_export(model)
    peft_config = peft.IA3Config(**{k: v for k, v in config.items() if k not in ("peft_type", "task_type")})
    peft_model = get_peft_model(fresh_base(), peft_config)
    ours = {name: layer.feedforward for name, layer in method.adapter_layers(model).items()}
    theirs = {name.removeprefix("base_model.model."): m.is_feedforward for name, m in peft_model.named_modules() if hasattr(m, "is_feedforward")}
    assert theirs == ours
    assert sorted(get_peft_model_state_dict(peft_model)) == sorted(f"base_model.model.{k}" for k in method.state_dict(model))
    # ...and reads back as options that build the same layers in tunelab.
    again, method_again = attach(method.options_from_peft(config, "test"))
    assert {name: layer.feedforward for name, layer in method_again.adapter_layers(again).items()} == ours


def test_options_from_peft_rejects_what_tunelab_does_not_implement():
    config = {"peft_type": "IA3", "target_modules": PAPER_TARGET, "feedforward_modules": ["down_proj"], "layers_to_transform": [0]}
    with pytest.raises(TunelabError, match="layers_to_transform"):
        Ia3.options_from_peft(config, "test")
    # A regex feedforward_modules becomes one pattern, matched in full like a target regex.
    options = Ia3.options_from_peft({"target_modules": PAPER_TARGET, "feedforward_modules": r".*\.down_proj"}, "test")
    assert options["feedforward"] == [r".*\.down_proj"]
    model, method = attach(options)
    assert sum(layer.feedforward for layer in method.adapter_layers(model).values()) == 2
