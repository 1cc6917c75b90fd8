"""LoHa and LoKr against peft (logits, gradients, init, dropouts, round trips), their merges, their
parameter counts against the papers' formulas, and short training runs."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from peft.tuners.lokr.layer import factorization as peft_factorization

from helpers import read_metrics
from peft_oracle import (
    assert_close,
    assert_equal_to_peft,
    assert_merge_exact,
    assert_round_trips,
    attach,
    copy_into_peft,
    fresh_base,
    method_of,
    probe_ids,
    randomize,
    smollm2_skeleton,
    train_tiny_run,
    trainable_count,
)
from tunelab.errors import TunelabError
from tunelab.methods.lycoris import Loha, Lokr, LokrLinear, factorization

QV = ["q_proj", "v_proj"]
PEFT_CONFIGS = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}


def options(name: str, **extra) -> dict:
    return {"name": name, "target": "all-linear", **extra}


def peft_config(name: str, **extra):
    return PEFT_CONFIGS[name](target_modules="all-linear", **extra)


# ---- LoHa


@pytest.mark.parametrize("regime", ["all-linear r=4", "peft defaults"])
def test_loha_equal_to_peft(regime):
    if regime == "peft defaults":  # r=8, alpha=8 and peft's Llama targets (q_proj, v_proj)
        assert_equal_to_peft({"name": "loha"}, peft.LoHaConfig())
    else:
        assert_equal_to_peft(options("loha", r=4, alpha=3.0), peft_config("loha", r=4, alpha=3.0))


# ---- LoKr: which factors are rank-r products depends on r, the shapes and decompose_both.

LOKR_REGIMES = {
    # r >= half of every W2 side on the tiny model: W1 and W2 full, s = alpha/r all the same.
    "w2 full": ({"r": 8}, {"lokr_w1", "lokr_w2"}),
    "w2 low rank": ({"r": 2}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "both low rank": ({"r": 2, "decompose_both": True}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    # factor 8 splits 64 into 8 x 8, 128 into 8 x 16 and 32 into 8 x 4 (the factor first, even when
    # larger): with r=4, W2 is low rank where a side is 16, full elsewhere.
    "factor 8, mixed": ({"r": 4, "decompose_factor": 8}, {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}),
}


@pytest.mark.parametrize("regime", LOKR_REGIMES)
def test_lokr_equal_to_peft(regime):
    extra, tensors = LOKR_REGIMES[regime]
    model, _ = attach(options("lokr", **extra))
    assert {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad} == tensors
    assert_equal_to_peft(options("lokr", alpha=3.0, **extra), peft_config("lokr", alpha=3.0, **extra))


def test_lokr_peft_defaults_equal_to_peft():
    assert_equal_to_peft({"name": "lokr"}, peft.LoKrConfig())


def test_factorization_is_peft_s():
    for dimension in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


# ---- Both


@pytest.mark.parametrize(
    "name, extra",
    [("loha", {}), ("lokr", {"r": 2, "decompose_both": True})],
)
def test_init_is_peft_s_under_the_same_seed(name, extra):
    """Same shapes, same init, same order of random draws: equal tensors from the same seed."""
    torch.manual_seed(7)
    model, method = attach(options(name, **extra))
    torch.manual_seed(7)
    peft_model = get_peft_model(fresh_base(), peft_config(name, **extra))
    theirs = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(peft_model).items()}
    ours = method.state_dict(model)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():  # ΔW = 0 at init: the wrapped model is the base model
        assert torch.equal(model(input_ids=probe_ids()).logits, fresh_base()(input_ids=probe_ids()).logits)


DROPOUTS = [
    ("loha", {"rank_dropout": 0.5}),
    ("loha", {"rank_dropout": 0.3, "module_dropout": 0.5}),
    ("lokr", {"rank_dropout": 0.5}),
    ("lokr", {"rank_dropout": 0.5, "rank_dropout_scale": True, "module_dropout": 0.3}),
    ("lokr", {"module_dropout": 0.5}),
]


@pytest.mark.parametrize("name, dropouts", DROPOUTS)
def test_dropouts_equal_peft_s_from_the_same_seed(name, dropouts):
    """The training-only dropouts draw what peft draws, in its order: equal seeded train forwards."""
    model, method = attach(options(name, **dropouts))
    randomize(method, model)
    peft_model = get_peft_model(fresh_base(), peft_config(name, **dropouts))
    copy_into_peft(method, model, peft_model)
    model.eval()
    with torch.no_grad():
        no_dropout = model(input_ids=probe_ids()).logits
        model.train(), peft_model.train()
        for seed in range(3):
            torch.manual_seed(seed)
            ours = model(input_ids=probe_ids()).logits
            torch.manual_seed(seed)
            assert_close(ours, peft_model(input_ids=probe_ids()).logits, 1e-5, f"seed {seed}")
    assert not torch.allclose(ours, no_dropout), "the dropouts changed nothing"


@pytest.mark.parametrize("name, extra", [("loha", {}), ("lokr", {}), ("lokr", {"r": 2, "decompose_both": True})])
def test_merge_exact(name, extra):
    assert_merge_exact(options(name, **extra))


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_round_trips_with_peft(name, tmp_path):
    extra = {"r": 4, "alpha": 6.0}
    assert_round_trips(options(name, target=QV, **extra), PEFT_CONFIGS[name](target_modules=QV, **extra), tmp_path)


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_loss_goes_down(name, tmp_path):
    # From ~5.53 (uniform over the byte vocabulary) both reach ~5.0-5.1 in 20 steps at this lr.
    run = train_tiny_run(tmp_path, options(name), steps=20, lr=3e-2)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 20 and max(losses[-3:]) < losses[0] - 0.25, losses


def test_half_precision_base_keeps_fp32_adapters():
    """On a bf16 base the factors stay fp32 and the update is added in fp32 (bf16 only at the output)."""
    model, method = attach(options("lokr", r=2), fresh_base().to(torch.bfloat16))
    randomize(method, model, scale=0.01)
    assert {p.dtype for p in method.trainable_parameters(model).values()} == {torch.float32}
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features, dtype=torch.bfloat16)
    y = layer(x)
    expected = x.double() @ (layer.base_layer.weight.double() + layer.delta_weight().double()).t()
    assert y.dtype == torch.bfloat16
    assert_close(y.double(), expected, 1e-2, "bf16 output")
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in layer.named_parameters() if n.startswith("lokr_"))


# ---- Options and peft configs


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "lokr", "decompose_factor": 0},
        {"name": "lokr", "decompose_factor": -2},
        {"name": "loha", "rank_dropout": 1.0},
        {"name": "loha", "r": 0},
        {"name": "lokr", "module_dropout": -0.1},
    ],
)
def test_bad_options_fail_clearly(bad):
    key = next(k for k in bad if k != "name")
    with pytest.raises(TunelabError, match=f"method.{key}"):
        method_of(bad)


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_peft_config_reads_back_as_the_same_options(name):
    extra = {"lokr": {"decompose_both": True, "decompose_factor": 4, "rank_dropout_scale": True}}.get(name, {})
    given = options(name, r=4, alpha=6.0, rank_dropout=0.1, module_dropout=0.2, target=QV, **extra)
    model, method = attach(given)
    config, _ = method.peft_export(model)
    assert method_of(method.options_from_peft(config, "test")).options == method.options
    # ...and peft builds the same layers from it.
    peft_config_object = PEFT_CONFIGS[name](**{k: v for k, v in config.items() if k not in ("peft_type", "task_type")})
    peft_model = get_peft_model(fresh_base(), peft_config_object)
    assert sorted(get_peft_model_state_dict(peft_model)) == sorted(f"base_model.model.{k}" for k in method.state_dict(model))


@pytest.mark.parametrize("cls", [Loha, Lokr])
@pytest.mark.parametrize("unsupported", [{"rank_pattern": {"q_proj": 2}}, {"alpha_pattern": {"q_proj": 2}}, {"layers_to_transform": [0]}])
def test_unsupported_peft_settings_are_rejected(cls, unsupported):
    config = {"peft_type": cls.peft_type, "r": 4, "target_modules": QV, **unsupported}
    with pytest.raises(TunelabError, match=next(iter(unsupported))):
        cls.options_from_peft(config, "adapter_config.json")


def test_lycoris_style_init_is_read():
    """peft's init_weights='lycoris' only changes the starting values, which the adapter replaces."""
    config = {"peft_type": "LOKR", "r": 4, "alpha": 2, "target_modules": QV, "init_weights": "lycoris"}
    assert Lokr.options_from_peft(config, "adapter_config.json")["r"] == 4


# ---- Parameter counts


def near_square_pair(dimension: int) -> tuple[int, int]:
    """The divisor pair of `dimension` closest to its square root, smaller first."""
    m = max(k for k in range(1, math.isqrt(dimension) + 1) if dimension % k == 0)
    return m, dimension // m


def linear_shapes(config) -> list[tuple[int, int]]:
    """(d_in, d_out) of every linear layer but the head: q k v o gate up down, in every layer."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return config.num_hidden_layers * [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def loha_formula(config, r: int) -> int:
    """Hyeon-Woo et al.: two rank-r pairs per matrix, 2r(d_in + d_out)."""
    return sum(2 * r * (d_in + d_out) for d_in, d_out in linear_shapes(config))


def lokr_formula(config, r: int, decompose_both: bool = False) -> int:
    """W1 (a x c) and W2 (b x d) with d_out = ab, d_in = cd; a factor is a rank-r pair r(rows + cols)
    when r is under half its larger side (W1 only with decompose_both), else full."""

    def factor(rows: int, cols: int, may_decompose: bool) -> int:
        return r * (rows + cols) if may_decompose and r < max(rows, cols) / 2 else rows * cols

    total = 0
    for d_in, d_out in linear_shapes(config):
        (a, b), (c, d) = near_square_pair(d_out), near_square_pair(d_in)
        total += factor(a, c, decompose_both) + factor(b, d, True)
    return total


COUNT_CASES = [
    ("loha", {"r": 8}, lambda config: loha_formula(config, 8)),
    ("loha", {"r": 2}, lambda config: loha_formula(config, 2)),
    ("lokr", {"r": 8}, lambda config: lokr_formula(config, 8)),
    ("lokr", {"r": 2, "decompose_both": True}, lambda config: lokr_formula(config, 2, True)),
]


@pytest.mark.parametrize("name, extra, formula", COUNT_CASES)
@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(name, extra, formula, shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    assert trainable_count(options(name, **extra), model) == formula(model.config)


def test_smollm2_counts_are_the_known_figures():
    """The figures peft prints on every linear layer of SmolLM2-135M with its defaults (r=8, alpha=8)."""
    assert trainable_count(options("loha"), smollm2_skeleton()) == 4_884_480
    assert trainable_count(options("lokr"), smollm2_skeleton()) == 215_040


def test_lokr_layer_shapes_on_smollm2():
    """576 = 24 x 24, 1536 = 32 x 48: W1 is 24 x 24 (full), W2 24 x 24 is rank 8 (8 < 24/2)."""
    model, _ = attach(options("lokr"), smollm2_skeleton())
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, LokrLinear)
    assert up.lokr_w1.shape == (32, 24) and up.lokr_w2_a.shape == (48, 8) and up.lokr_w2_b.shape == (8, 24)
