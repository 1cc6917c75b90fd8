"""ETHER and ETHER+ against the paper's equations (layer forward, the transforms as matrices,
orthogonality of ETHER's reflections and not of ETHER+'s), gradients, training (frozen weights
stay, the transforms move, reload and merge keep the logits, the loss falls), parameter counts
against the paper's formula, and options that fail clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

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
from tunelab.methods.ether import EtherLinear

# ETHER+ on the tiny model: 32 blocks would leave the 32 outputs of v_proj one feature per block.
PLUS = {"name": "ether", "plus": True, "blocks": 4}


def householder(u: torch.Tensor) -> torch.Tensor:
    """The paper's H: diag(I − 2 u_i u_iᵀ / ‖u_i‖²) over the rows u_i of u."""
    return torch.block_diag(*[torch.eye(len(ui), dtype=u.dtype) - 2 * torch.outer(ui, ui) / ui.dot(ui) for ui in u])


def relaxed(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The paper's H⁺: diag(I − û_i û_iᵀ + v̂_i v̂_iᵀ)."""
    eye = torch.eye(u.shape[1], dtype=u.dtype)
    return torch.block_diag(*[eye - torch.outer(a, a) / a.dot(a) + torch.outer(b, b) / b.dot(b) for a, b in zip(u, v)])


def random_layer(plus: bool, dtype=torch.float32) -> EtherLinear:
    torch.manual_seed(0)
    layer = EtherLinear(nn.Linear(8, 6), blocks=2, plus=plus).to(dtype)  # blocks of 4 inputs, 3 outputs
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("ether_"):
                param.copy_(torch.randn(param.shape))
    return layer


@pytest.mark.parametrize("plus", [False, True], ids=["ether", "ether+"])
def test_forward_is_the_papers_equation(plus):
    """ETHER: y = (W H) x + b. ETHER+: y = (H̃⁺ W H⁺) x + b, H⁺ on the inputs, H̃⁺ on the outputs."""
    layer = random_layer(plus)
    x = torch.randn(3, 5, 8)
    w, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    if plus:
        weight = relaxed(layer.ether_out.u.detach(), layer.ether_out.v.detach()) @ w @ relaxed(layer.ether_in.u.detach(), layer.ether_in.v.detach())
    else:
        weight = w @ householder(layer.ether_in.u.detach())
    with torch.no_grad():
        assert_close(layer(x), x @ weight.t() + b, 1e-6, "forward")
        assert_close(layer.merged_weight(), weight, 1e-6, "merged weight")


@pytest.mark.parametrize("plus", [False, True], ids=["ether", "ether+"])
def test_gradients_pass_gradcheck(plus):
    layer = random_layer(plus, torch.float64)
    names = [name for name, _ in layer.named_parameters()]
    tensors = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)

    def forward(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *tensors))


def test_ether_reflections_are_orthogonal():
    """HᵀH = I, H = Hᵀ, det H = (−1)^n, ‖H_i − I‖_F = 2, at any u, in the model's layers."""
    model, method = attach({"name": "ether", "target": "all-linear"})
    randomize(method, model, scale=0.5)
    for layer in method.adapter_layers(model).values():
        u = layer.ether_in.u.detach().double()
        with torch.no_grad():
            h = layer.ether_in(torch.eye(layer.in_features)).double()  # rows of I ↦ rows of H
        eye = torch.eye(layer.in_features, dtype=torch.float64)
        assert_close(h, householder(u), 1e-6, "H")
        assert_close(h.t() @ h, eye, 1e-6, "HᵀH")
        assert_close(h, h.t(), 1e-6, "Hᵀ")
        n, size = u.shape
        assert torch.linalg.det(h).item() == pytest.approx((-1) ** n, abs=1e-4)
        block_distance = (h - eye).unflatten(0, (n, size)).unflatten(2, (n, size)).diagonal(dim1=0, dim2=2).pow(2).sum((0, 1))
        assert_close(block_distance.sqrt(), torch.full((n,), 2.0, dtype=torch.float64), 1e-6, "‖H_i − I‖")


def test_ether_plus_is_the_relaxed_equation_and_not_orthogonal():
    model, method = attach({**PLUS, "target": "all-linear"})
    randomize(method, model, scale=0.5)
    for layer in method.adapter_layers(model).values():
        for side, features in ((layer.ether_in, layer.in_features), (layer.ether_out, layer.out_features)):
            with torch.no_grad():
                h = side(torch.eye(features)).double()
            assert_close(h, relaxed(side.u.detach().double(), side.v.detach().double()), 1e-6, "H⁺")
            assert_close(h, h.t(), 1e-6, "H⁺ᵀ")
            assert (h.t() @ h - torch.eye(features, dtype=torch.float64)).abs().max() > 0.1


def test_ether_plus_starts_as_the_base_model_and_ether_does_not():
    """ETHER+'s v = −u makes H⁺ = I; ETHER's H is a reflection, never the identity (as in the paper's code)."""
    base = fresh_base()(input_ids=probe_ids()).logits.detach()
    plus, _ = attach({**PLUS, "target": "all-linear"})
    ether, _ = attach({"name": "ether"})
    with torch.no_grad():
        assert torch.equal(plus(input_ids=probe_ids()).logits, base)
        assert (ether(input_ids=probe_ids()).logits - base).abs().max() > 1e-3
    # The official init: u ~ U(−1/√b, 1/√b) (kaiming-uniform, a = √5), b the block size; ETHER+'s v = −u.
    u = ether.model.layers[0].self_attn.q_proj.ether_in.u
    assert u.shape == (32, 2) and u.abs().max() <= 2**-0.5 and u.std() > 0.2
    side = plus.model.layers[0].mlp.down_proj.ether_in
    assert torch.equal(side.v, -side.u)


@pytest.mark.parametrize("options", [{"name": "ether"}, {**PLUS, "target": "all-linear"}], ids=["ether", "ether+"])
def test_merge_exact(options):
    assert_merge_exact(options)


def test_ether_plus_trains_only_its_transforms_and_reloads_exactly(tmp_path, monkeypatch):
    # Plain ETHER's defaults are checked with every registered method (test_methods_all).
    train_tiny_run_checked(monkeypatch, tmp_path, PLUS)


@pytest.mark.parametrize("options", [{"name": "ether"}, PLUS], ids=["ether", "ether+"])
def test_loss_goes_down(options, tmp_path):
    run = train_tiny_run(tmp_path, {**options, "target": "all-linear"}, steps=12, lr=0.1)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.15, losses


def ether_formula(config, plus: bool) -> int:
    """Bini et al.: ETHER trains one vector u per transformed side, d_in per layer, whatever n;
    ETHER+ two (u, v) on each side, 2(d_in + d_out). Targets: queries and values."""
    hidden = config.hidden_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes = [(hidden, hidden), (hidden, kv)]  # (d_in, d_out) of q_proj, v_proj
    return config.num_hidden_layers * sum(2 * (d_in + d_out) if plus else d_in for d_in, d_out in shapes)


def llama2_7b_skeleton():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m", "llama-2-7b"])
@pytest.mark.parametrize("options", [{"name": "ether"}, PLUS], ids=["ether", "ether+"])
def test_trainable_count_matches_formula(options, shape):
    skeleton = {"tiny": fresh_base, "smollm2-135m": smollm2_skeleton, "llama-2-7b": llama2_7b_skeleton}[shape]
    expected = ether_formula(skeleton().config, options.get("plus", False))
    assert trainable_count(options, skeleton()) == expected
    assert trainable_count({**options, "blocks": 1}, skeleton()) == expected  # n does not change the count


def test_llama2_7b_counts_are_the_papers():
    """The paper's Llama-2-7B figures: 0.26M (ETHER) and 1.04M (ETHER+) on queries and values."""
    assert trainable_count({"name": "ether"}, llama2_7b_skeleton()) == 262_144
    assert trainable_count({"name": "ether", "plus": True}, llama2_7b_skeleton()) == 1_048_576


def test_half_precision_base_keeps_fp32_transforms():
    model, method = attach({**PLUS, "target": "all-linear"}, fresh_base().to(torch.bfloat16))
    randomize(method, model)
    assert {p.dtype for p in method.trainable_parameters(model).values()} == {torch.float32}
    out = model(input_ids=probe_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters(model).values())


# ---- Options


@pytest.mark.parametrize("bad", [{"blocks": 0}, {"plus": "sometimes"}])
def test_bad_option_values_fail_at_the_key(bad):
    key = next(iter(bad))
    with pytest.raises(TunelabError, match=f"method.{key}"):
        method_of({"name": "ether", **bad})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"blocks": 3}, r"method.blocks=3 must split the 64 input features of model.layers.0.self_attn.q_proj"),
        ({"blocks": 64}, r"method.blocks=64 must split the 64 input features"),  # blocks of one feature
        ({"plus": True}, r"method.blocks=32 must split the 32 output features of model.layers.0.self_attn.v_proj"),
    ],
)
def test_blocks_that_do_not_fit_a_layer_fail_naming_it(options, message):
    with pytest.raises(TunelabError, match=message):
        attach({"name": "ether", **options})
