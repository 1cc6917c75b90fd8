"""Series and parallel bottleneck adapters: the model against wrappers written from the equations
(logits and gradients), a gradient check, training (frozen weights stay, adapters move; loss falls),
the parameter count against LLM-Adapters' formula, save/load, the merge refusal and bad options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import read_metrics
from peft_oracle import assert_close, attach, fresh_base, probe_ids, randomize, smollm2_skeleton, train_tiny_run, train_tiny_run_checked, trainable_count
from tunelab.errors import TunelabError
from tunelab.methods.base import replace_module
from tunelab.methods.bottleneck import BottleneckAdapter, ParallelAdapterOptions, SeriesAdapterOptions
from tunelab.train.loop import _enable_activation_checkpointing

SUBLAYER = {"attention": "self_attn", "mlp": "mlp"}
ACTIVATION = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
# Regimes checked against the equations: defaults with a small bottleneck, and the other options.
REGIMES = {
    "series": {"name": "series_adapter", "bottleneck": 8},
    "series both sublayers, layer 1": {
        "name": "series_adapter",
        "bottleneck": 8,
        "placement": ["attention", "mlp"],
        "activation": "gelu",
        "scaling": 0.5,
        "layers": [1],
    },
    "parallel": {"name": "parallel_adapter", "bottleneck": 8},
    "parallel attention": {"name": "parallel_adapter", "bottleneck": 8, "placement": ["attention"], "activation": "tanh", "scaling": 2.0},
    "parallel both sublayers, layer 0": {
        "name": "parallel_adapter",
        "bottleneck": 8,
        "placement": ["mlp", "attention"],
        "activation": "silu",
        "layers": [0],
    },
}


def settings(options: dict) -> dict:
    """The options with every default filled in (the defaults the method documents)."""
    series = options["name"] == "series_adapter"
    defaults = {"bottleneck": 256, "placement": ["mlp"], "activation": "relu", "scaling": 1.0 if series else 4.0, "layers": None}
    return {**defaults, **options, "series": series}


class EquationWrapper(nn.Module):
    """A sublayer whose output h (for input x) becomes h + f(h) (series) or h + f(x) (parallel),
    f(z) = s · W_up act(W_down z + b_down) + b_up, with its own leaf copies of the four tensors."""

    def __init__(self, sublayer: nn.Module, tensors: dict[str, torch.Tensor], series: bool, activation, scaling: float):
        super().__init__()
        self.sublayer, self.series, self.activation, self.scaling = sublayer, series, activation, scaling
        self.tensors = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}

    def forward(self, *args, **kwargs):
        out = self.sublayer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        z = h if self.series else (args[0] if args else kwargs["hidden_states"])
        t = self.tensors
        f = self.scaling * (self.activation(z @ t["down.weight"].T + t["down.bias"]) @ t["up.weight"].T) + t["up.bias"]
        return (h + f, *out[1:]) if isinstance(out, tuple) else h + f


def adapted_names(options: dict, num_layers: int) -> list[str]:
    s = settings(options)
    layers = range(num_layers) if s["layers"] is None else s["layers"]
    return [f"model.layers.{i}.{SUBLAYER[p]}" for i in layers for p in s["placement"]]


def equation_model(model, options: dict) -> tuple[nn.Module, dict[str, EquationWrapper]]:
    """A fresh base whose adapted sublayers are EquationWrappers holding copies of `model`'s adapter tensors."""
    s = settings(options)
    reference = fresh_base()
    wrappers = {}
    for name in adapted_names(options, model.config.num_hidden_layers):
        tensors = {k: v for k, v in model.get_submodule(f"{name}.adapter").named_parameters()}
        wrappers[name] = EquationWrapper(reference.get_submodule(name), tensors, s["series"], ACTIVATION[s["activation"]], s["scaling"])
        replace_module(reference, name, wrappers[name])
    return reference, wrappers


@pytest.mark.parametrize("regime", REGIMES)
def test_logits_and_gradients_equal_the_equations(regime):
    options = REGIMES[regime]
    model, method = attach(options)
    randomize(method, model, scale=0.3)
    reference, wrappers = equation_model(model, options)
    ids = probe_ids()
    ours, theirs = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert_close(ours.logits, theirs.logits, 1e-6, "logits")
    ours.loss.backward(), theirs.loss.backward()
    params = method.trainable_parameters(model)
    assert len(params) == 4 * len(wrappers)
    for name, wrapper in wrappers.items():
        for key, tensor in wrapper.tensors.items():
            assert_close(params[f"{name}.adapter.{key}"].grad, tensor.grad, 1e-5, f"gradient of {name}.adapter.{key}")


def test_starts_as_the_base_model():
    for name in ("series_adapter", "parallel_adapter"):
        model, _ = attach({"name": name, "placement": ["attention", "mlp"]})
        with torch.no_grad():
            assert torch.equal(model(input_ids=probe_ids()).logits, fresh_base()(input_ids=probe_ids()).logits)


@pytest.mark.parametrize("series", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_gradcheck(series, activation):
    torch.manual_seed(0)
    options = SeriesAdapterOptions(bottleneck=3, activation=activation, scaling=1.5)
    adapter = BottleneckAdapter(6, options, series, torch.device("cpu")).double()
    names = [name for name, _ in adapter.named_parameters()]
    values = [torch.randn_like(p, requires_grad=True) for p in adapter.parameters()]  # W_up ≠ 0: every path is live
    z = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)

    def f(z, *tensors):
        return torch.func.functional_call(adapter, dict(zip(names, tensors)), (z,))

    assert torch.autograd.gradcheck(f, (z, *values))


def test_adapters_are_model_parameters_on_the_chosen_sublayers():
    model, method = attach({"name": "series_adapter", "placement": ["attention"], "layers": [1]})
    expected = [f"model.layers.1.self_attn.adapter.{k}" for k in ("down.bias", "down.weight", "up.bias", "up.weight")]
    assert sorted(method.trainable_parameters(model)) == expected
    assert not hasattr(model.model.layers[0].self_attn, "adapter") and not hasattr(model.model.layers[1].mlp, "adapter")
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapter." not in n)


def test_half_precision_base_keeps_fp32_adapters():
    model, method = attach({"name": "parallel_adapter", "placement": ["attention", "mlp"]}, fresh_base().to(torch.bfloat16))
    randomize(method, model)
    assert {p.dtype for p in method.trainable_parameters(model).values()} == {torch.float32}
    out = model(input_ids=probe_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters(model).values())


@pytest.mark.parametrize("name", ["series_adapter", "parallel_adapter"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    """The hooks run again when a checkpointed decoder layer is recomputed in backward."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same W_down init both times
        model, method = attach({"name": name, "bottleneck": 8, "placement": ["attention", "mlp"]})
        randomize(method, model)
        if checkpointing:
            _enable_activation_checkpointing(model)
        model.train()
        model(input_ids=probe_ids(), labels=probe_ids(), use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in method.trainable_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert_close(grads[1][key], grads[0][key], 1e-6, key)


# ---- Training, saving, merging


@pytest.mark.parametrize("name", ["series_adapter", "parallel_adapter"])
def test_trained_with_dropout_in_both_places_reloads_exactly(name, tmp_path, monkeypatch):
    train_tiny_run_checked(monkeypatch, tmp_path, {"name": name, "placement": ["attention", "mlp"], "dropout": 0.1})


@pytest.mark.parametrize("name", ["series_adapter", "parallel_adapter"])
def test_merge_is_refused(name):
    model, method = attach({"name": name})
    assert not method.mergeable
    with pytest.raises(TunelabError, match="cannot be merged"):
        method.merge(model)


@pytest.mark.parametrize("name", ["series_adapter", "parallel_adapter"])
def test_loss_goes_down(name, tmp_path):
    # From ~5.53 (uniform over the byte vocabulary) to ~5.26 (series) and ~5.06 (parallel) in 12 steps at this lr.
    run = train_tiny_run(tmp_path, {"name": name, "placement": ["attention", "mlp"]}, steps=12, lr=1e-2)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.2, losses


def bottleneck_formula(config, r: int, sublayers_per_layer: int, layers: int | None = None) -> int:
    """LLM-Adapters: W_down (r × d), b_down (r), W_up (d × r), b_up (d) per adapted sublayer."""
    d = config.hidden_size
    return (config.num_hidden_layers if layers is None else layers) * sublayers_per_layer * (2 * r * d + r + d)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
@pytest.mark.parametrize("name", ["series_adapter", "parallel_adapter"])
def test_trainable_count_matches_formula(name, shape):
    def model():
        return fresh_base() if shape == "tiny" else smollm2_skeleton()

    config = model().config
    assert trainable_count({"name": name}, model()) == bottleneck_formula(config, 256, 1)
    both = {"name": name, "bottleneck": 16, "placement": ["attention", "mlp"], "layers": [0, 1]}
    assert trainable_count(both, model()) == bottleneck_formula(config, 16, 2, layers=2)
    if shape == "smollm2-135m":  # 30 layers · (2·256·576 + 256 + 576)
        assert bottleneck_formula(config, 256, 1) == 8_872_320


# ---- Options


@pytest.mark.parametrize("name", ["series_adapter", "parallel_adapter"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bottleneck": 0}, "bottleneck"),
        ({"placement": []}, "placement"),
        ({"placement": ["ffn"]}, "placement"),
        ({"placement": ["mlp", "mlp"]}, "each sublayer at most once"),
        ({"activation": "swish"}, "activation"),
        ({"scaling": 0.0}, "scaling"),
        ({"dropout": 1.0}, "dropout"),
        ({"layers": []}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"layers": [0, 0]}, "layers"),
        ({"layers": [0, 2]}, r"method.layers: \[2\] out of range; this model has 2 decoder layers"),
        ({"r": 8}, "r"),  # an unknown key
    ],
)
def test_bad_options_fail_clearly(name, options, message):
    with pytest.raises(TunelabError, match=message):
        attach({"name": name, **options})


def test_defaults_are_the_papers():
    series, parallel = SeriesAdapterOptions(), ParallelAdapterOptions()
    assert (series.bottleneck, series.placement, series.activation, series.scaling, series.layers) == (256, ["mlp"], "relu", 1.0, None)
    assert (parallel.bottleneck, parallel.placement, parallel.scaling) == (256, ["mlp"], 4.0)
