"""LoRA and its variants (rsLoRA, DoRA, PiSSA, OLoRA, LoRA+) against peft, and their parameter counts."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from peft import get_peft_model

from peft_oracle import (
    assert_close,
    assert_equal_to_peft,
    assert_merge_exact,
    assert_round_trips,
    attach,
    fresh_base,
    probe_ids,
    smollm2_skeleton,
    train_tiny_run,
    trainable_count,
)
from tunelab.runs import load_run

QV = ["q_proj", "v_proj"]
VARIANTS = {
    "plain": ({}, {}),
    "rslora": ({"rslora": True}, {"use_rslora": True}),
    "dora": ({"dora": True}, {"use_dora": True}),
    "rslora+dora": ({"rslora": True, "dora": True}, {"use_rslora": True, "use_dora": True}),
}


def lora_options(**extra) -> dict:
    return {"name": "lora", "r": 4, "alpha": 8.0, "target": "all-linear", **extra}


def peft_lora(**extra) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **extra)


@pytest.mark.parametrize("variant", VARIANTS)
def test_equal_to_peft(variant):
    ours, theirs = VARIANTS[variant]
    assert_equal_to_peft(lora_options(**ours), peft_lora(**theirs))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_equal_peft(init):
    """PiSSA/OLoRA: the same factorization of the same weights gives peft's A, B and residual W."""
    model, method = attach(lora_options(init=init))
    peft_model = get_peft_model(fresh_base(), peft_lora(init_lora_weights=init))
    ours = dict(model.named_parameters())
    for name, param in peft_model.named_parameters():
        key = name.removeprefix("base_model.model.").replace(".default", "")
        assert_close(ours[key], param, 1e-5, key)
    with torch.no_grad():
        assert_close(model(input_ids=probe_ids()).logits, peft_model(input_ids=probe_ids()).logits, 1e-5, "logits")
        # ...and at init the model is the original one: W_res + sB₀A₀ = W.
        assert_close(model(input_ids=probe_ids()).logits, fresh_base()(input_ids=probe_ids()).logits, 1e-4, "init")


@pytest.mark.parametrize("variant", ["plain", "dora", "pissa", "olora"])
def test_merge_exact(variant):
    extra = {"plain": {}, "dora": {"dora": True}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"}}[variant]
    assert_merge_exact(lora_options(**extra))


@pytest.mark.parametrize("variant", ["plain", "dora"])
def test_round_trips_with_peft(variant, tmp_path):
    ours, theirs = VARIANTS[variant]
    assert_round_trips(lora_options(**ours, target=QV), peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, **theirs), tmp_path)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_init_exports_as_plain_lora_on_the_original_weights(init, tmp_path):
    """peft's own conversion: rank 2r, [A; A₀] and [B, −B₀], on the untouched base model."""
    from tunelab.export import export_run

    run = train_tiny_run(tmp_path, lora_options(init=init, target=QV))
    export_run(run, "peft", tmp_path / "exported")
    peft_model = peft.PeftModel.from_pretrained(fresh_base(), tmp_path / "exported").eval()
    assert peft_model.peft_config["default"].r == 8
    with torch.no_grad():
        expected = load_run(run).model.eval()(input_ids=probe_ids()).logits
        assert_close(peft_model(input_ids=probe_ids()).logits, expected, 1e-5, "exported pissa/olora")


def test_gaussian_init_scale():
    model, method = attach(lora_options(init="gaussian", r=8))
    a = model.model.layers[0].mlp.down_proj.lora_A.weight
    assert abs(a.std().item() - 1 / 8) < 0.02 and not model.model.layers[0].mlp.down_proj.lora_B.weight.any()


def test_rslora_scaling():
    _, method = attach(lora_options(rslora=True, r=16, alpha=8.0))
    assert method.scaling == pytest.approx(8.0 / math.sqrt(16))


def test_lora_plus_gives_b_its_learning_rate(tmp_path):
    model, method = attach(lora_options(lora_plus_ratio=16.0))
    groups = method.param_groups(model)
    b_params = {id(p) for name, p in method.trainable_parameters(model).items() if ".lora_B." in name}
    assert [g["lr_scale"] for g in groups] == [1.0, 16.0]
    assert {id(p) for p in groups[1]["params"]} == b_params and not b_params & {id(p) for p in groups[0]["params"]}
    run = train_tiny_run(tmp_path, lora_options(lora_plus_ratio=16.0), steps=2)
    assert load_run(run).model is not None


def lora_formula(config, r: int, dora: bool = False) -> int:
    """Hu et al.: r·(d_in + d_out) per adapted matrix; DoRA adds a d_out magnitude vector."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    return layers * sum(r * (d_in + d_out) + (d_out if dora else 0) for d_in, d_out in shapes)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(dora, shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    assert trainable_count(lora_options(r=16, dora=dora), model) == lora_formula(model.config, 16, dora)


def test_smollm2_lora_r16_count_is_the_known_figure():
    """4,884,480: the figure peft prints for r=16 on every linear layer of SmolLM2-135M."""
    assert trainable_count(lora_options(r=16), smollm2_skeleton()) == 4_884_480
