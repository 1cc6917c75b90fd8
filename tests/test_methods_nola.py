"""NOLA: every adapted layer against the equation with bases regenerated from the seed, a gradient
check, training (frozen weights stay, coefficients move; loss falls), the parameter count against
the paper's k + l per layer, save/load (the same bases, checked), the merge and bad options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import read_metrics
from peft_oracle import (
    assert_close,
    assert_merge_exact,
    attach,
    fresh_base,
    probe_ids,
    randomize,
    smollm2_skeleton,
    train_tiny_run,
    train_tiny_run_checked,
    trainable_count,
)
from tunelab.errors import TunelabError
from tunelab.methods.nola import NolaBases, NolaLinear, NolaOptions
from tunelab.runs import load_run

SMALL = {"name": "nola", "r": 3, "num_basis_a": 5, "num_basis_b": 7, "alpha": 6.0, "seed": 11}


def bases_from_seed(seed: int, r: int, k: int, l: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented bases: a CPU generator seeded with `seed` draws A's stack (k × r × max_in), then
    B's (l × max_out × r), entries U(−1, 1), divided by √k and √l."""
    generator = torch.Generator().manual_seed(seed)
    basis_a = torch.empty(k, r, max_in).uniform_(-1.0, 1.0, generator=generator) / math.sqrt(k)
    basis_b = torch.empty(l, max_out, r).uniform_(-1.0, 1.0, generator=generator) / math.sqrt(l)
    return basis_a, basis_b


@pytest.mark.parametrize("target", ["all-linear", ["k_proj", "down_proj"]])
def test_every_layer_equals_the_equation(target):
    """y = W x + (alpha/r) · B A x, A = Σ α_i A_i[:, :d_in], B = Σ β_j B_j[:d_out, :]."""
    model, method = attach({**SMALL, "target": target})
    randomize(method, model, scale=0.3)
    layers = method.adapter_layers(model)
    max_in, max_out = max(m.in_features for m in layers.values()), max(m.out_features for m in layers.values())
    basis_a, basis_b = bases_from_seed(11, 3, 5, 7, max_in, max_out)
    generator = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        d_in, d_out = layer.in_features, layer.out_features
        alpha, beta = layer.nola_alpha.detach(), layer.nola_beta.detach()
        a = sum(alpha[i] * basis_a[i, :, :d_in] for i in range(5))
        b = sum(beta[j] * basis_b[j, :d_out, :] for j in range(7))
        x = torch.randn(2, 4, d_in, generator=generator)
        expected = x @ layer.base_layer.weight.T + (6.0 / 3) * (x @ a.T) @ b.T
        with torch.no_grad():
            assert_close(layer(x), expected, 1e-6, name)
            assert_close(layer.delta_weight(), (6.0 / 3) * b @ a, 1e-6, f"ΔW of {name}")


def test_starts_as_the_base_model():
    model, method = attach({"name": "nola"})
    for layer in method.adapter_layers(model).values():
        bound = math.sqrt(3 / layer.in_features)  # α ~ U(−√(3/d_in), √(3/d_in)): LoRA's A variance
        assert torch.count_nonzero(layer.nola_beta) == 0 and 0 < layer.nola_alpha.abs().max() <= bound
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe_ids()).logits, fresh_base()(input_ids=probe_ids()).logits)


def test_gradcheck():
    options = NolaOptions(r=2, num_basis_a=3, num_basis_b=4, seed=5)
    # Bases wider than the layer (7 > 6 inputs, 8 > 5 outputs): the layer uses slices.
    layer = NolaLinear(nn.Linear(6, 5), NolaBases(options, 7, 8, torch.device("cpu")), scaling=1.5).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(3, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, alpha, beta):
        return torch.func.functional_call(layer, {"nola_alpha": alpha, "nola_beta": beta}, (x,))

    assert torch.autograd.gradcheck(f, (x, alpha, beta))


def test_one_pair_of_bases_for_every_layer_outside_the_model_state():
    model, method = attach(SMALL)
    bases = {id(layer.nola_bases) for layer in method.adapter_layers(model).values()}
    assert len(bases) == 1
    shared = method.bases(model)
    assert shared.nola_basis_a.shape == (5, 3, 128) and shared.nola_basis_b.shape == (7, 128, 3)  # max d_in, d_out: the MLP's
    assert not any("nola_basis" in key for key in model.state_dict())
    assert sorted({key.rsplit(".", 1)[-1] for key in method.state_dict(model)}) == ["nola_alpha", "nola_basis_check", "nola_beta"]


def test_half_precision_base_keeps_fp32_coefficients():
    model, method = attach({"name": "nola"}, fresh_base().to(torch.bfloat16))
    randomize(method, model)
    assert {p.dtype for p in method.trainable_parameters(model).values()} == {torch.float32}
    assert method.bases(model).nola_basis_a.dtype == torch.float32
    out = model(input_ids=probe_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters(model).values())


# ---- Training, saving, merging


def test_reloaded_run_has_the_same_bases_and_logits(tmp_path, monkeypatch):
    run, kept = train_tiny_run_checked(monkeypatch, tmp_path, {"name": "nola", "seed": 3})
    loaded = load_run(run)
    ours, theirs = loaded.method.bases(loaded.model), next(m for m in kept["model"].modules() if isinstance(m, NolaBases))
    assert torch.equal(ours.nola_basis_a, theirs.nola_basis_a) and torch.equal(ours.nola_basis_b, theirs.nola_basis_b)


def test_load_checks_the_bases():
    model, method = attach(SMALL)
    randomize(method, model)
    state = method.state_dict(model)
    same, same_method = attach(SMALL)
    same_method.load_state_dict(same, state, "test")
    with torch.no_grad():
        assert torch.equal(same(input_ids=probe_ids()).logits, model(input_ids=probe_ids()).logits)
    other, other_method = attach({**SMALL, "seed": 12})
    with pytest.raises(TunelabError, match="bases drawn from seed 12 differ from those the adapter was trained with"):
        other_method.load_state_dict(other, state, "test")
    with pytest.raises(TunelabError, match="no nola_basis_check"):
        same_method.load_state_dict(same, {k: v for k, v in state.items() if k != "nola_basis_check"}, "test")


@pytest.mark.parametrize("options", [SMALL, {"name": "nola"}, {"name": "nola", "target": ["q_proj", "v_proj"], "alpha": 32.0}])
def test_merge_exact(options):
    assert_merge_exact(options)


def test_loss_goes_down(tmp_path):
    # From ~5.53 (uniform over the byte vocabulary) to ~5.26 in 12 steps at this lr.
    run = train_tiny_run(tmp_path, {"name": "nola"}, steps=12, lr=3e-2)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.2, losses


LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # per decoder layer


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(shape):
    """Koohpayegani et al.: k + l coefficients per adapted matrix, whatever its size and r."""
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    layers, matrices = model.config.num_hidden_layers, len(LLAMA_LINEARS)
    expected = layers * matrices * (512 + 512)
    assert trainable_count({"name": "nola"}, model) == expected
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    qv = {"name": "nola", "target": ["q_proj", "v_proj"], "num_basis_a": 100, "num_basis_b": 30, "r": 4}
    assert trainable_count(qv, model) == layers * 2 * 130
    if shape == "smollm2-135m":  # 30 layers · 7 matrices · 1024
        assert expected == 215_040


# ---- Options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 0}, "r"),
        ({"num_basis_a": 0}, "num_basis_a"),
        ({"num_basis_b": 0}, "num_basis_b"),
        ({"alpha": 0.0}, "alpha"),
        ({"seed": -1}, "seed"),
        ({"target": ["nope"]}, "no linear layer matches"),
        ({"dropout": 0.1}, "dropout"),  # not an option of NOLA
    ],
)
def test_bad_options_fail_clearly(options, message):
    with pytest.raises(TunelabError, match=message):
        attach({"name": "nola", **options})


def test_defaults_are_the_papers_llama_setting():
    options = NolaOptions()
    chosen = (options.r, options.num_basis_a, options.num_basis_b, options.alpha, options.seed, options.target)
    assert chosen == (16, 512, 512, 4.0, 0, "all-linear")
