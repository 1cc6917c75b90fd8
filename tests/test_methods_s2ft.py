"""S2FT: the forward against its equation, gradients (only the selected columns of W_O and W_down
train), the selection (whole heads, seeded), training, reload, merge, the parameter count against
the paper's formula, and its options."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import read_metrics
from peft_oracle import (
    assert_close,
    assert_merge_exact,
    attach,
    fresh_base,
    method_of,
    probe_ids,
    randomize,
    smollm2_skeleton,
    train_tiny_run,
    train_tiny_run_checked,
    trainable_count,
)
from tunelab.errors import TunelabError
from tunelab.methods.s2ft import S2ftLinear
from tunelab.runs import load_run


def test_layer_forward_is_the_defining_equation():
    """y = (W + ΔW_sub scattered into the columns C) x + b, written with a dense W'."""
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 6)
    columns = torch.tensor([1, 4, 7])
    layer = S2ftLinear(base, columns)
    with torch.no_grad():
        layer.s2ft_delta.normal_()
    x = torch.randn(2, 5, 10)
    dense = base.weight.detach().clone()
    for j, column in enumerate(columns.tolist()):
        dense[:, column] += layer.s2ft_delta.detach()[:, j]
    expected = x @ dense.T + base.bias.detach()
    with torch.no_grad():
        assert_close(layer(x), expected, 1e-6, "forward")
        assert_close(layer.merged_weight(), dense, 1e-6, "merged weight")


def test_model_forward_equals_the_base_with_the_columns_added():
    model, method = attach({"name": "s2ft"})
    randomize(method, model)
    reference = fresh_base()
    with torch.no_grad():
        for name, layer in method.adapter_layers(model).items():
            weight = reference.get_submodule(name).weight
            weight[:, layer.s2ft_columns] += layer.s2ft_delta
        assert_close(model(input_ids=probe_ids()).logits, reference(input_ids=probe_ids()).logits, 1e-6, "logits")


def test_gradient_lands_only_on_the_selected_columns():
    """∂L/∂ΔW_sub equals the selected columns of the dense gradient ∂L/∂W' (autograd through the
    equation); the columns left out get nothing, since nothing else trains."""
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 6).double().requires_grad_(False)
    columns = torch.tensor([0, 3, 4, 9])
    layer = S2ftLinear(base, columns).double()
    with torch.no_grad():
        layer.s2ft_delta.normal_()
    x = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d: torch.func.functional_call(layer, {"s2ft_delta": d}, (x,)), (x, layer.s2ft_delta.detach().requires_grad_()))

    target = torch.randn(7, 6, dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    dense_delta = torch.zeros(6, 10, dtype=torch.float64, requires_grad=True)
    weight = base.weight.detach() + dense_delta + torch.zeros(6, 10, dtype=torch.float64).index_copy(1, columns, layer.s2ft_delta.detach())
    ((x.detach() @ weight.T + base.bias.detach() - target) ** 2).sum().backward()
    assert_close(layer.s2ft_delta.grad, dense_delta.grad[:, columns], 1e-10, "gradient of the sub-block")
    outside = torch.ones(10, dtype=torch.bool)
    outside[columns] = False
    assert (dense_delta.grad[:, outside] != 0).all()  # the dense gradient is not zero there: S2FT leaves it out
    assert [name for name, p in layer.named_parameters() if p.grad is not None] == ["s2ft_delta"]


def test_selection_is_whole_heads_and_channels_drawn_with_the_seed():
    torch.manual_seed(3)
    model, method = attach({"name": "s2ft", "heads_per_layer": 2, "channels_per_layer": 5})
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    layers = method.adapter_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj"))
    for name, layer in layers.items():
        columns = layer.s2ft_columns
        assert len(set(columns.tolist())) == len(columns)
        if name.endswith("o_proj"):
            blocks = columns.view(2, head_dim)
            assert torch.equal(blocks - blocks[:, :1], torch.arange(head_dim).expand(2, -1))
            assert (blocks[:, 0] % head_dim == 0).all()
        else:
            assert len(columns) == 5 and columns.max() < model.config.intermediate_size
    torch.manual_seed(3)
    again, method_again = attach({"name": "s2ft", "heads_per_layer": 2, "channels_per_layer": 5})
    assert all(torch.equal(layers[n].s2ft_columns, layer.s2ft_columns) for n, layer in method_again.adapter_layers(again).items())
    # The layers draw independently: not every layer selected the same heads.
    assert len({tuple(layers[f"model.layers.{i}.mlp.down_proj"].s2ft_columns.tolist()) for i in range(2)}) == 2


def test_training_changes_only_the_selected_columns_and_reloads_them(monkeypatch, tmp_path):
    run, kept = train_tiny_run_checked(monkeypatch, tmp_path, {"name": "s2ft"})
    model, method = kept["model"], kept["method"]
    # The weight update is nonzero exactly on the selected columns.
    for name, layer in method.adapter_layers(model).items():
        change = (layer.merged_weight() - layer.base_layer.weight).detach()
        selected = torch.zeros(layer.in_features, dtype=torch.bool)
        selected[layer.s2ft_columns] = True
        assert (change[:, ~selected] == 0).all() and (change[:, selected] != 0).any(dim=0).all(), name

    loaded = load_run(run)
    reloaded_columns = {n: layer.s2ft_columns for n, layer in loaded.method.adapter_layers(loaded.model).items()}
    assert all(torch.equal(reloaded_columns[n], layer.s2ft_columns) for n, layer in method.adapter_layers(model).items())


def test_merge_exact():
    assert_merge_exact({"name": "s2ft", "heads_per_layer": 2, "channel_fraction": 0.1})


def s2ft_formula(config, heads: int, channels: int) -> int:
    """Yang et al.: each layer trains a d × (heads · d_head) block of W_O and a d × channels block of W_down."""
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * config.hidden_size * (heads * head_dim + channels)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    config = model.config
    heads, channels = math.ceil(0.05 * config.num_attention_heads), math.ceil(0.02 * config.intermediate_size)
    assert trainable_count({"name": "s2ft"}, model) == s2ft_formula(config, heads, channels)
    if shape == "smollm2-135m":  # 30 · 576 · (1 · 64 + 31)
        assert s2ft_formula(config, heads, channels) == 1_641_600
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    assert trainable_count({"name": "s2ft", "heads_per_layer": 3, "channels_per_layer": 0}, model) == s2ft_formula(config, 3, 0)


def test_loss_goes_down(tmp_path):
    run = train_tiny_run(tmp_path, {"name": "s2ft", "head_fraction": 0.5, "channel_fraction": 0.25}, steps=12, lr=0.05)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.15, losses


def test_half_precision_base_keeps_fp32_deltas():
    model, method = attach({"name": "s2ft"}, fresh_base().to(torch.bfloat16))
    randomize(method, model)
    assert {p.dtype for p in method.trainable_parameters(model).values()} == {torch.float32}
    out = model(input_ids=probe_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters(model).values())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"heads_per_layer": 1, "head_fraction": 0.5}, "`method`: set heads_per_layer or head_fraction, not both"),
        ({"channels_per_layer": 2, "channel_fraction": 0.5}, "`method`: set channels_per_layer or channel_fraction"),
        ({"head_fraction": 0, "channel_fraction": 0}, "`method`: S2FT selects no head and no channel"),
        ({"head_fraction": 1.5}, "`method.head_fraction`: Input should be less than or equal to 1"),
        ({"heads_per_layer": -1}, "`method.heads_per_layer`: Input should be greater than or equal to 0"),
    ],
)
def test_bad_options_fail_in_validation(options, message):
    with pytest.raises(TunelabError, match=message):
        method_of({"name": "s2ft", **options})


def test_budget_beyond_the_model_fails_naming_the_key():
    with pytest.raises(TunelabError, match=r"method.heads_per_layer: 5 exceeds the 4"):
        attach({"name": "s2ft", "heads_per_layer": 5})
