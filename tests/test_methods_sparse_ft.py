"""SpIEL (sparse_ft): the forward against its equation, gradients (k entries, and the dense
gradient sums of an accumulation phase), prune and regrow against an independent computation,
optimizer moments of regrown slots, exact resume across a regrowth, training, reload, merge, the
parameter count against the paper's formula, and its options."""

from __future__ import annotations

import pytest
import torch

import tunelab
from helpers import (
    assert_tensors_equal,
    load_adapter,
    load_checkpoint_weights,
    read_metrics,
    tiny_run_config,
    write_records_data,
)
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
from tunelab.methods.sparse_ft import GRADIENT_SUM, SparseDeltaProduct, SparseFtLinear
from tunelab.runs import load_run

# Regrowth every 2 steps from the gradients of both, half the entries at first (tiny runs).
OFTEN = {"name": "sparse_ft", "update_every": 2, "accumulation_steps": 2, "regrow_fraction": 0.5}


def dense_weight(weight: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + Δ at the flat indices, entry by entry."""
    dense = weight.detach().clone()
    for index, value in zip(indices.tolist(), delta.detach().tolist()):
        dense.view(-1)[index] += value
    return dense


def test_layer_forward_is_the_defining_equation():
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 6)
    layer = SparseFtLinear(base, k=7)
    assert len(set(layer.sparse_ft_indices.tolist())) == 7
    with torch.no_grad():
        layer.sparse_ft_delta.normal_()
    x = torch.randn(2, 5, 10)
    dense = dense_weight(base.weight, layer.sparse_ft_indices, layer.sparse_ft_delta)
    with torch.no_grad():
        assert_close(layer(x), x @ dense.T + base.bias, 1e-6, "forward")
        assert_close(layer.merged_weight(), dense, 1e-6, "merged weight")


def test_model_forward_equals_the_base_with_the_entries_added():
    model, method = attach({"name": "sparse_ft"})
    randomize(method, model)
    reference = fresh_base()
    with torch.no_grad():
        for name, layer in method.adapter_layers(model).items():
            weight = reference.get_submodule(name).weight
            weight.copy_(dense_weight(weight, layer.sparse_ft_indices, layer.sparse_ft_delta))
        assert_close(model(input_ids=probe_ids()).logits, reference(input_ids=probe_ids()).logits, 1e-6, "logits")


def test_gradients_of_the_entries_and_the_dense_gradient_sum():
    torch.manual_seed(0)
    indices = torch.tensor([0, 7, 13, 22, 59])
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d: SparseDeltaProduct.apply(x, d, indices, (6, 10), None), (x, delta))

    # The gradient sum: ∂L/∂W' of the dense equation, added up over two backward passes.
    gradient_sum = torch.zeros(6, 10, dtype=torch.float64)
    expected = torch.zeros(6, 10, dtype=torch.float64)
    for _ in range(2):
        target = torch.randn(3, 4, 6, dtype=torch.float64)
        ((SparseDeltaProduct.apply(x, delta, indices, (6, 10), gradient_sum) - target) ** 2).sum().backward()
        dense = torch.zeros(6, 10, dtype=torch.float64, requires_grad=True)
        ((x.detach() @ (dense + dense_weight(torch.zeros(6, 10, dtype=torch.float64), indices, delta)).T - target) ** 2).sum().backward()
        expected += dense.grad
    assert_close(gradient_sum, expected, 1e-12, "gradient sum")


def train_by_hand(model, method, steps: int, total_steps: int, before_step=None, before_after_step=None):
    """The loop's step (forward, backward, AdamW, after_step) on the probe text; `before_step(step)`
    runs before the forward, `before_after_step(step)` between the optimizer step and after_step."""
    optimizer = torch.optim.AdamW(method.param_groups(model), lr=0.05)
    ids = probe_ids()
    for step in range(1, steps + 1):
        if before_step is not None:
            before_step(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if before_after_step is not None:
            before_after_step(step)
        method.after_step(model, step, total_steps)
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def reference_weight_gradients(model, method) -> dict[str, torch.Tensor]:
    """∂L/∂W' of every adapted layer, from a plain model holding the merged weights (autograd)."""
    reference = fresh_base()
    layers = method.adapter_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            reference.get_submodule(name).weight.copy_(layer.merged_weight())
    ids = probe_ids()
    reference(input_ids=ids, labels=ids).loss.backward()
    return {name: reference.get_submodule(name).weight.grad for name in layers}


def test_regrowth_keeps_k_drops_the_smallest_and_grows_the_largest_gradients():
    torch.manual_seed(0)
    model, method = attach(OFTEN)
    layers = method.adapter_layers(model)
    expected_sums = {name: torch.zeros(layer.shape) for name, layer in layers.items()}
    before = {}

    def add_reference_gradients(step):
        for name, gradient in reference_weight_gradients(model, method).items():
            expected_sums[name] += gradient

    def record(step):
        if step == 2:
            for name, layer in layers.items():
                assert_close(layer.gradient_sum, expected_sums[name], 1e-5, f"gradient sum of {name}")
                before[name] = (layer.sparse_ft_indices.clone(), layer.sparse_ft_delta.detach().clone())

    optimizer = train_by_hand(model, method, steps=2, total_steps=4, before_step=add_reference_gradients, before_after_step=record)

    changed_anywhere = False
    for name, layer in layers.items():
        old_indices, old_delta = before[name]
        k = old_indices.numel()
        count = int(k * 0.5 * (1 - 2 / 4))
        indices = layer.sparse_ft_indices
        assert indices.shape == (k,) and indices.unique().numel() == k, f"{name} does not keep k distinct indices"
        # Independent: the kept entries are all but the `count` smallest |Δ|.
        order = sorted(range(k), key=lambda j: abs(old_delta[j].item()))
        kept = {old_indices[j].item() for j in order[count:]}
        # ...and the grown ones the `count` largest |G| among the positions not kept.
        scores = expected_sums[name].abs().flatten().tolist()
        candidates = sorted((p for p in range(len(scores)) if p not in kept), key=lambda p: -scores[p])
        assert set(indices.tolist()) == kept | set(candidates[:count]), name
        freed = (indices != old_indices).nonzero().flatten()
        changed_anywhere |= freed.numel() > 0
        assert (layer.sparse_ft_delta[freed] == 0).all()
        state = optimizer.state[layer.sparse_ft_delta]
        for moment in ("exp_avg", "exp_avg_sq"):
            assert (state[moment][freed] == 0).all(), f"{moment} of regrown slots carried over"
        untouched = indices == old_indices
        assert torch.equal(layer.sparse_ft_delta[untouched], old_delta[untouched])
        assert (state["exp_avg_sq"][untouched] != 0).any()
        assert layer.gradient_sum is None  # until the next phase
    assert changed_anywhere


def test_no_regrowth_and_no_dense_gradient_outside_the_phases():
    model, method = attach({"name": "sparse_ft", "update_every": 4, "accumulation_steps": 1})
    initial = {n: layer.sparse_ft_indices.clone() for n, layer in method.adapter_layers(model).items()}
    collected = []
    train_by_hand(
        model, method, steps=3, total_steps=8, before_after_step=lambda step: collected.append([layer.gradient_sum is not None for layer in method.adapter_layers(model).values()])
    )
    assert collected == [[False] * len(initial)] * 3
    assert all(layer.gradient_sum is not None for layer in method.adapter_layers(model).values())  # armed for step 4
    assert all(torch.equal(initial[n], layer.sparse_ft_indices) for n, layer in method.adapter_layers(model).items())


def test_resume_across_a_regrowth_is_bitwise_exact(tmp_path):
    train_file = write_records_data(tmp_path / "data", n_train=8)[0]
    config = tiny_run_config(tmp_path / "run", train_file, method=OFTEN, train={"max_steps": 6, "save_every": 3, "keep_checkpoints": 5, "lr": 1e-2})
    tunelab.train(config)
    finished = load_adapter(config["output"])
    checkpoint = load_checkpoint_weights(config["output"], 3)
    assert any(key.startswith(GRADIENT_SUM) for key in checkpoint), "the checkpoint mid-phase holds no gradient sums"
    index_keys = [key for key in finished if key.endswith("sparse_ft_indices")]
    assert any(not torch.equal(finished[key], checkpoint[key]) for key in index_keys), "no index regrew after step 3"
    report = tunelab.train(config, resume=True).report
    assert report["resumed_from_step"] == 3
    assert_tensors_equal(load_adapter(config["output"]), finished)


def test_trained_run_reloads_its_regrown_indices(monkeypatch, tmp_path):
    run, kept = train_tiny_run_checked(monkeypatch, tmp_path, OFTEN)
    model, method = kept["model"], kept["method"]
    loaded = load_run(run)
    reloaded = {n: layer.sparse_ft_indices for n, layer in loaded.method.adapter_layers(loaded.model).items()}
    assert all(torch.equal(reloaded[n], layer.sparse_ft_indices) for n, layer in method.adapter_layers(model).items())


def test_merge_exact():
    assert_merge_exact({"name": "sparse_ft", "density": 0.05})


def sparse_ft_formula(config, density: float) -> int:
    """Ansell et al.: k = round(density · d_out · d_in) entries of every adapted matrix (all linear layers)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down
    return layers * sum(round(density * d_out * d_in) for d_out, d_in in shapes)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    assert trainable_count({"name": "sparse_ft"}, model) == sparse_ft_formula(model.config, 0.01)
    if shape == "smollm2-135m":  # 30 · (2 · 3318 + 2 · 1106 + 3 · 8847)
        assert sparse_ft_formula(model.config, 0.01) == 1_061_670
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    assert trainable_count({"name": "sparse_ft", "k": 16, "target": ["q_proj"]}, model) == 16 * model.config.num_hidden_layers


def test_loss_goes_down(tmp_path):
    run = train_tiny_run(tmp_path, {**OFTEN, "density": 0.1}, steps=12, lr=0.05)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.15, losses


def test_half_precision_base_keeps_fp32_deltas():
    model, method = attach({"name": "sparse_ft"}, fresh_base().to(torch.bfloat16))
    randomize(method, model)
    assert {p.dtype for p in method.trainable_parameters(model).values()} == {torch.float32}
    out = model(input_ids=probe_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters(model).values())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"k": 4, "density": 0.1}, "`method`: set k or density, not both"),
        ({"accumulation_steps": 30}, "`method`: accumulation_steps=30 exceeds update_every=20"),
        ({"density": 0}, "`method.density`: Input should be greater than 0"),
        ({"regrow_fraction": 1.5}, "`method.regrow_fraction`: Input should be less than or equal to 1"),
        ({"update_every": 0}, "`method.update_every`: Input should be greater than or equal to 1"),
    ],
)
def test_bad_options_fail_in_validation(options, message):
    with pytest.raises(TunelabError, match=message):
        method_of({"name": "sparse_ft", **options})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"k": 5000}, r"method.k: gives k=5000 trained entries for model.layers.0.self_attn.q_proj \(64 x 64\)"),
        ({"density": 1e-5}, r"method.density: gives k=0"),
    ],
)
def test_budget_that_fits_no_layer_fails_naming_the_key(options, message):
    with pytest.raises(TunelabError, match=message):
        attach({"name": "sparse_ft", **options})
