"""OFT and BOFT against peft (logits, gradients, dropout draws, round trips), orthogonality of their
rotations, their merges, their parameter counts against the papers' formulas, options and peft
configs, and short training runs.

peft's BOFT assembles its block-diagonal factors with a CUDA extension (`fbd_cuda`), compiled on
first use; where that fails it silently sets boft_n_butterfly_factor to 1 (plain OFT). The autouse
fixture below gives peft a Python stand-in for the extension: peft then runs its butterfly path on
the CPU, and no test compiles anything.
"""

from __future__ import annotations

import peft
import peft.tuners.boft.layer as peft_boft_layer
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
from tunelab.methods.oft import Boft, BoftLinear, Oft, butterfly_permutation, cayley, cayley_neumann, skew_from_packed

QV = ["q_proj", "v_proj"]
# Random parameters of this size keep ‖Q‖ well under 1 for OFT's 32×32 blocks (a random skew
# matrix of side b with entries σ has spectral norm ≈ 2σ√b), where the Cayley transform and its
# Neumann series are well conditioned. BOFT's default 4×4 blocks take the harness's 0.1.
OFT_SCALE = 0.02


class PythonBlockDiag:
    """peft's fbd_cuda interface (block-diagonal assembly of (N, D, b, b) blocks) in plain torch."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        with torch.enable_grad():
            leaf = blocks.detach().requires_grad_()
            return [torch.autograd.grad(PythonBlockDiag.forward(leaf)[0], leaf, grad)[0]]


@pytest.fixture(autouse=True)
def peft_boft_without_compiling(monkeypatch):
    monkeypatch.setattr(peft_boft_layer, "_FBD_CUDA", PythonBlockDiag())


# ---- OFT

OFT_REGIMES = {
    # peft's defaults: block size 32, Cayley–Neumann with 5 terms, q_proj and v_proj.
    "defaults": ({}, {}),
    "exact cayley": ({"cayley_neumann": False}, {"use_cayley_neumann": False}),
    "3 neumann terms": ({"neumann_terms": 3}, {"num_cayley_neumann_terms": 3}),
    "8 neumann terms": ({"neumann_terms": 8}, {"num_cayley_neumann_terms": 8}),
    "r blocks, all-linear": ({"r": 4, "target": "all-linear"}, {"r": 4, "oft_block_size": 0, "target_modules": "all-linear"}),
    "block share": ({"block_share": True, "block_size": 16}, {"block_share": True, "oft_block_size": 16}),
    # eps large enough that some blocks lie inside the radius and some are scaled back onto it
    "coft": ({"coft": True, "eps": 1.0, "cayley_neumann": False}, {"coft": True, "eps": 1.0, "use_cayley_neumann": False}),
}


def oft_options(**extra) -> dict:
    return {"name": "oft", **extra}


def peft_oft(**extra) -> peft.OFTConfig:
    return peft.OFTConfig(**{"target_modules": QV, **extra})


@pytest.mark.parametrize("regime", OFT_REGIMES)
def test_oft_equal_to_peft(regime):
    ours, theirs = OFT_REGIMES[regime]
    assert_equal_to_peft(oft_options(**ours), peft_oft(**theirs), scale=OFT_SCALE)


def test_oft_starts_as_the_base_model():
    model, _ = attach(oft_options(target="all-linear"))
    assert model.model.layers[0].mlp.down_proj.oft_R.weight.shape == (128 // 32, 32 * 31 // 2)
    with torch.no_grad():
        assert_close(model(input_ids=probe_ids()).logits, fresh_base()(input_ids=probe_ids()).logits, 1e-6, "init")


def test_cayley_is_orthogonal_and_neumann_approximates_the_transform_of_minus_q():
    """Exact: RᵀR = I at random Q. peft's series is (I + Q)(I − Q)⁻¹ truncated: Cayley(−Q) = Cayley(Q)ᵀ."""
    q = skew_from_packed(torch.randn(3, 8 * 7 // 2, dtype=torch.float64), 8)
    rotation = cayley(q)
    assert_close(rotation.transpose(1, 2) @ rotation, torch.eye(8, dtype=torch.float64).expand(3, 8, 8), 1e-12, "RᵀR")
    small = q * 0.01
    assert_close(cayley_neumann(small, 8), cayley(small).transpose(1, 2), 1e-9, "series")


def test_oft_rotation_is_orthogonal_in_the_model():
    model, method = attach(oft_options(cayley_neumann=False, target="all-linear"))
    randomize(method, model, scale=0.5)  # far from the identity: orthogonality is exact, not small-angle
    for layer in method.adapter_layers(model).values():
        blocks = layer.blocks(training=False).double()
        assert_close(blocks.transpose(1, 2) @ blocks, torch.eye(blocks.shape[-1], dtype=torch.float64).expand_as(blocks), 1e-5, "RᵀR")


@pytest.mark.parametrize("extra", [{}, {"cayley_neumann": False}, {"block_share": True}, {"coft": True, "eps": 1.0}])
def test_oft_merge_exact(extra):
    assert_merge_exact(oft_options(target="all-linear", **extra), scale=OFT_SCALE)


def test_oft_module_dropout_replaces_blocks_by_the_identity_in_training_only():
    model, method = attach(oft_options(module_dropout=0.5, block_size=8))  # 8 blocks per layer
    randomize(method, model, scale=OFT_SCALE)
    layer = model.model.layers[0].self_attn.q_proj
    eye = torch.eye(8)
    identities = [sum(torch.equal(b, eye) for b in layer.blocks(training=True)) for _ in range(5)]
    assert identities == [4] * 5
    assert not any(torch.equal(b, eye) for b in layer.blocks(training=False))
    with torch.no_grad():
        model.eval()
        reference, _ = attach(oft_options(block_size=8))
        reference.load_state_dict(model.state_dict())
        assert torch.equal(model(input_ids=probe_ids()).logits, reference.eval()(input_ids=probe_ids()).logits)


def test_oft_round_trips_with_peft(tmp_path):
    assert_round_trips(oft_options(target=QV), peft_oft(), tmp_path, scale=OFT_SCALE)


def oft_formula(config, block_size: int, shared: bool = False) -> int:
    """Qiu et al.: d_in/b blocks of b(b−1)/2 free entries (a skew-symmetric b×b matrix) per adapted
    matrix, or one block in all with block sharing; q_proj and v_proj both read the hidden size."""
    per_block = block_size * (block_size - 1) // 2
    blocks = 1 if shared else config.hidden_size // block_size
    return config.num_hidden_layers * 2 * blocks * per_block


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_oft_trainable_count_matches_formula(shape, shared):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    assert trainable_count(oft_options(block_share=shared), model) == oft_formula(model.config, 32, shared)


def test_oft_loss_goes_down(tmp_path):
    # From ~5.53 (uniform over the byte vocabulary) to ~5.26 in 12 steps at this lr.
    run = train_tiny_run(tmp_path, oft_options(target="all-linear"), steps=12, lr=1e-2)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.15, losses


# ---- BOFT

BOFT_REGIMES = {
    # peft's defaults: 4×4 blocks, one factor (OFT with full-tensor blocks and output scales), q and v.
    "defaults": ({}, {}),
    "2 factors": ({"n_butterfly_factor": 2}, {"boft_n_butterfly_factor": 2}),
    "4 factors, all-linear": ({"n_butterfly_factor": 4, "target": "all-linear"}, {"boft_n_butterfly_factor": 4, "target_modules": "all-linear"}),
    "block_num": ({"block_num": 8, "n_butterfly_factor": 3}, {"boft_block_num": 8, "boft_block_size": 0, "boft_n_butterfly_factor": 3}),
}


def boft_options(**extra) -> dict:
    return {"name": "boft", **extra}


def peft_boft(**extra) -> peft.BOFTConfig:
    return peft.BOFTConfig(**{"target_modules": QV, **extra})


@pytest.mark.parametrize("regime", BOFT_REGIMES)
def test_boft_equal_to_peft(regime):
    ours, theirs = BOFT_REGIMES[regime]
    assert_equal_to_peft(boft_options(**ours), peft_boft(**theirs))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_butterfly_permutations_are_peft_s(level):
    features, block_size = 64, 4
    theirs = peft_boft_layer.BOFTLayer.block_butterfly_perm(None, features, features // block_size // 2**level, block_size // 2, 3)
    assert torch.equal(butterfly_permutation(features, block_size, level), theirs)


def test_boft_dropout_draws_as_peft():
    """peft's multiplicative dropout picks one factor, then int(p·D) of its blocks: the same seeded
    draws give the same training forward."""
    ours_options, theirs = boft_options(n_butterfly_factor=2, dropout=0.5), peft_boft(boft_n_butterfly_factor=2, boft_dropout=0.5)
    model, method = attach(ours_options)
    randomize(method, model)
    peft_model = get_peft_model(fresh_base(), theirs)
    copy_into_peft(method, model, peft_model)
    model.train(), peft_model.train()
    with torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            ours = model(input_ids=probe_ids()).logits
            torch.manual_seed(seed)
            assert_close(ours, peft_model(input_ids=probe_ids()).logits, 1e-5, f"seed {seed}")
        assert not torch.allclose(ours, model.eval()(input_ids=probe_ids()).logits), "the dropout changed nothing"


def test_boft_rotation_is_orthogonal():
    model, method = attach(boft_options(n_butterfly_factor=3, target="all-linear"))
    randomize(method, model, scale=1.0)
    for layer in method.adapter_layers(model).values():
        rotation = layer.rotate(torch.eye(layer.in_features), training=False).double()
        assert_close(rotation.t() @ rotation, torch.eye(layer.in_features, dtype=torch.float64), 1e-5, "RᵀR")


@pytest.mark.parametrize("factors", [1, 3])
def test_boft_merge_exact(factors):
    assert_merge_exact(boft_options(n_butterfly_factor=factors, target="all-linear"))


def test_boft_scales_outputs_but_not_the_bias():
    torch.manual_seed(0)
    layer = BoftLinear(torch.nn.Linear(8, 3), block_size=2, factors=2, dropout=0.0)
    with torch.no_grad():
        for p in (layer.boft_R, layer.boft_s):
            p.add_(torch.randn(p.shape) * 0.3)
        x = torch.randn(5, 8)
        rotation = layer.rotate(torch.eye(8), training=False)
        expected = layer.boft_s.flatten() * ((x @ rotation) @ layer.base_layer.weight.t()) + layer.base_layer.bias
        assert_close(layer(x), expected, 1e-6, "forward")
        assert_close(layer.merged()(x), expected, 1e-6, "merged")


def test_boft_round_trips_with_peft(tmp_path):
    assert_round_trips(boft_options(n_butterfly_factor=2, target=QV), peft_boft(boft_n_butterfly_factor=2), tmp_path)


def boft_formula(config, block_size: int, factors: int) -> int:
    """Liu et al.: m factors of d_in/b blocks each, plus d_out scales per adapted matrix. peft stores
    each block as a full b×b tensor (its skew-symmetric part, b(b−1)/2 free entries, is used), so
    a factor holds d_in·b numbers; q_proj reads and writes the hidden size, v_proj writes kv."""
    h = config.hidden_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_matrix = factors * (h // block_size) * block_size**2
    return config.num_hidden_layers * ((per_matrix + h) + (per_matrix + kv))


@pytest.mark.parametrize("factors", [1, 2])
@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_boft_trainable_count_matches_formula(shape, factors):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    assert trainable_count(boft_options(n_butterfly_factor=factors), model) == boft_formula(model.config, 4, factors)


def test_boft_loss_goes_down(tmp_path):
    # From ~5.53 to ~5.27 in 12 steps at this lr.
    run = train_tiny_run(tmp_path, boft_options(n_butterfly_factor=2, target="all-linear"), steps=12, lr=3e-2)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.15, losses


# ---- Both


@pytest.mark.parametrize("options", [oft_options(), boft_options(n_butterfly_factor=2)])
def test_half_precision_base_keeps_fp32_rotations(options):
    """On a bf16 base the parameters stay fp32 and the rotation runs in fp32 (bf16 from W's matmul on)."""
    model, method = attach(options, fresh_base().to(torch.bfloat16))
    randomize(method, model, scale=OFT_SCALE)
    reference, _ = attach(options)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert {p.dtype for p in method.trainable_parameters(model).values()} == {torch.float32}
    logits = model(input_ids=probe_ids()).logits
    assert logits.dtype == torch.bfloat16
    with torch.no_grad():
        assert_close(logits.float(), reference(input_ids=probe_ids()).logits, 5e-2, "bf16 logits")
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters(model).values())


# ---- Options and peft configs


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"name": "oft", "block_size": 16, "r": 4}, "give either block_size or r"),
        ({"name": "oft", "block_size": 0}, "give either block_size or r"),
        ({"name": "oft", "neumann_terms": 2}, "method.neumann_terms"),
        ({"name": "oft", "module_dropout": 1.0}, "method.module_dropout"),
        ({"name": "boft", "block_size": 4, "block_num": 8}, "give either block_size or block_num"),
        ({"name": "boft", "n_butterfly_factor": 0}, "method.n_butterfly_factor"),
    ],
)
def test_bad_options_fail_clearly(bad, key):
    with pytest.raises(TunelabError, match=key):
        method_of(bad)


@pytest.mark.parametrize(
    "options, message",
    [
        (oft_options(block_size=48), r"method.block_size=48 does not divide the 64 input features of model.layers.0.self_attn.q_proj"),
        (oft_options(r=3), r"method.r=3 does not divide the 64"),
        (boft_options(block_size=3), r"method.block_size=3 does not divide"),
        # 64 features in 4×4 blocks: 16 blocks, not divisible by 2^5
        (boft_options(n_butterfly_factor=6), r"needs an even block size \(got 4\) and a block count divisible by 2\^5"),
        (boft_options(block_num=16, n_butterfly_factor=2, target=["down_proj"]), None),  # 128 features: fine
        (boft_options(block_size=1, n_butterfly_factor=2), r"needs an even block size \(got 1\)"),
    ],
)
def test_shapes_that_do_not_fit_a_layer_fail_clearly(options, message):
    if message is None:
        attach(options)
        return
    with pytest.raises(TunelabError, match=message):
        attach(options)


@pytest.mark.parametrize(
    "given, peft_class",
    [
        (oft_options(r=4, module_dropout=0.1, coft=True, eps=1e-3, cayley_neumann=False, target=QV), peft.OFTConfig),
        (oft_options(block_size=16, block_share=True, neumann_terms=7, target="all-linear"), peft.OFTConfig),
        (boft_options(block_num=8, n_butterfly_factor=2, dropout=0.1, target=QV), peft.BOFTConfig),
        (boft_options(target="all-linear"), peft.BOFTConfig),
    ],
)
def test_peft_config_reads_back_as_the_same_options(given, peft_class):
    model, method = attach(given)
    config, _ = method.peft_export(model)
    again = method_of(method.options_from_peft(config, "test"))
    # "all-linear" comes back as the layer names it selected.
    assert again.options.model_dump(exclude={"target"}) == method.options.model_dump(exclude={"target"})
    model_again = fresh_base()
    again.attach(model_again)
    assert list(again.adapter_layers(model_again)) == list(method.adapter_layers(model))
    # ...and peft builds the same tensors from it.
    peft_config = peft_class(**{k: v for k, v in config.items() if k not in ("peft_type", "task_type")})
    peft_model = get_peft_model(fresh_base(), peft_config)
    theirs = {k: tuple(t.shape) for k, t in get_peft_model_state_dict(peft_model).items()}
    assert theirs == {f"base_model.model.{k}": tuple(t.shape) for k, t in method.state_dict(model).items()}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"peft_version": "0.17.1", "use_cayley_neumann": True, "oft_block_size": 32}, "series peft changed in 0.18"),
        ({"r": 8}, "from peft < 0.14"),
        ({"oft_block_size": 32, "bias": "all"}, "bias='all'"),
    ],
)
def test_oft_peft_configs_tunelab_cannot_read_fail_clearly(config, message):
    with pytest.raises(TunelabError, match=message):
        Oft.options_from_peft({"target_modules": QV, **config}, "test")


def test_oft_exact_cayley_adapters_of_older_peft_read_fine():
    options = Oft.options_from_peft({"target_modules": QV, "oft_block_size": 32, "use_cayley_neumann": False, "peft_version": "0.17.0"}, "test")
    assert options["cayley_neumann"] is False


def test_boft_peft_configs_tunelab_cannot_read_fail_clearly():
    with pytest.raises(TunelabError, match="fan_in_fan_out=True"):
        Boft.options_from_peft({"target_modules": QV, "fan_in_fan_out": True}, "test")
