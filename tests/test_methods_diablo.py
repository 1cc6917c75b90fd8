"""DiaBlo against the paper's equation (layer forward block by block, the dense update it merges),
gradients, training (frozen weights stay, the diagonal blocks move, reload and merge keep the
logits, the loss falls), parameter counts against the paper's formula, and options that fail
clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
    trainable_count,
)
from tunelab.errors import TunelabError
from tunelab.methods.diablo import DiabloLinear

PAPER_TARGET = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def random_layer(dtype=torch.float32) -> DiabloLinear:
    torch.manual_seed(0)
    layer = DiabloLinear(nn.Linear(12, 8), blocks=4).to(dtype)  # 4 blocks of 2 outputs × 3 inputs
    with torch.no_grad():
        layer.diablo_D.copy_(torch.randn(layer.diablo_D.shape))
    return layer


def dense_update(blocks: torch.Tensor) -> torch.Tensor:
    """ΔW with D_i at rows i·d_out/N…, columns i·d_in/N…, zeros elsewhere."""
    n, rows, cols = blocks.shape
    delta = torch.zeros(n * rows, n * cols, dtype=blocks.dtype)
    for i in range(n):
        delta[i * rows : (i + 1) * rows, i * cols : (i + 1) * cols] = blocks[i]
    return delta


def test_forward_is_the_papers_equation():
    """y = W x + b + [D_1 x_1; …; D_N x_N], x_i the i-th slice of the inputs; W' = W + blockdiag(D)."""
    layer = random_layer()
    x = torch.randn(3, 5, 12)
    d = layer.diablo_D.detach()
    blockwise = torch.cat([x[..., 3 * i : 3 * (i + 1)] @ d[i].t() for i in range(4)], dim=-1)
    with torch.no_grad():
        assert_close(layer(x), layer.base_layer(x) + blockwise, 1e-6, "forward")
        assert_close(layer.merged_weight(), layer.base_layer.weight + dense_update(d), 1e-6, "merged weight")
        assert_close(layer(x), x @ layer.merged_weight().t() + layer.base_layer.bias, 1e-6, "forward == merged")


def test_forward_never_forms_the_dense_update(monkeypatch):
    layer = random_layer()

    def dense(*_):
        raise AssertionError("the forward formed the dense update")

    monkeypatch.setattr(torch, "block_diag", dense)
    monkeypatch.setattr(DiabloLinear, "delta_weight", dense)
    layer(torch.randn(2, 12)).sum().backward()
    assert layer.diablo_D.grad is not None


def test_gradients_pass_gradcheck():
    layer = random_layer(torch.float64)
    names = [name for name, _ in layer.named_parameters()]
    tensors = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)

    def forward(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *tensors))


def test_starts_as_the_base_model():
    model, method = attach({"name": "diablo"})
    assert sorted({name.rsplit(".", 2)[-2] for name in method.trainable_parameters(model)}) == sorted(PAPER_TARGET)
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.diablo_D.shape == (32, 1, 2)  # 32 outputs × 64 inputs in a 32×32 grid
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe_ids()).logits, fresh_base()(input_ids=probe_ids()).logits)


@pytest.mark.parametrize("options", [{"name": "diablo"}, {"name": "diablo", "blocks": 4, "target": "all-linear"}])
def test_merge_exact(options):
    assert_merge_exact(options)


def test_loss_goes_down(tmp_path):
    # From ~5.53 to ~5.14 in 12 steps at this lr.
    run = train_tiny_run(tmp_path, {"name": "diablo"}, steps=12, lr=0.1)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.15, losses


def diablo_formula(config, blocks: int) -> int:
    """Gurses et al.: a layer trains its N diagonal blocks of (d_out/N × d_in/N): d_out·d_in/N."""
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner)}
    return config.num_hidden_layers * sum(d_out * d_in // blocks for d_out, d_in in (shapes[name] for name in PAPER_TARGET))


@pytest.mark.parametrize("blocks", [None, 4, 16])
@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(shape, blocks):
    skeleton = fresh_base if shape == "tiny" else smollm2_skeleton
    options = {"name": "diablo"} if blocks is None else {"name": "diablo", "blocks": blocks}
    assert trainable_count(options, skeleton()) == diablo_formula(skeleton().config, blocks or 32)


def test_smollm2_count_is_the_known_figure():
    """30 layers × (576² + 2·192·576 + 2·1536·576) / 32."""
    assert trainable_count({"name": "diablo"}, smollm2_skeleton()) == 2_177_280


def test_half_precision_base_keeps_fp32_blocks():
    model, method = attach({"name": "diablo"}, fresh_base().to(torch.bfloat16))
    randomize(method, model)
    assert {p.dtype for p in method.trainable_parameters(model).values()} == {torch.float32}
    out = model(input_ids=probe_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters(model).values())


# ---- Options


@pytest.mark.parametrize("bad", [{"blocks": 0}, {"blocks": -4}, {"block": 4}])
def test_bad_option_values_fail_at_the_key(bad):
    key = next(iter(bad))
    with pytest.raises(TunelabError, match=f"method.{key}"):
        method_of({"name": "diablo", **bad})


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        (3, r"method.blocks=3 must divide both dimensions of model.layers.0.self_attn.q_proj \(64 outputs × 64 inputs\)"),
        # the paper's 64 divides the inputs of k_proj but not its 32 outputs
        (64, r"method.blocks=64 must divide both dimensions of model.layers.0.self_attn.k_proj \(32 outputs × 64 inputs\)"),
    ],
)
def test_blocks_that_do_not_divide_a_layer_fail_naming_it(blocks, message):
    with pytest.raises(TunelabError, match=message):
        attach({"name": "diablo", "blocks": blocks})
