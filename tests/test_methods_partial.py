"""Partial fine-tuning (`freeze`, `hft`): exactly the selected tensors of the model get gradients and
change in training, every other tensor stays bitwise the base's; the forward is the plain model's;
counts follow Σ numel of the selection (HFT: half of each layer's categories, seeded); the adapter
holds only the trained tensors, reloads and merges exactly; bad options fail naming the key."""

from __future__ import annotations

import pytest
import torch

from helpers import load_adapter, read_metrics
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
from tunelab.runs import load_run

LAYER_TENSORS = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
]
ATTENTION, MLP, NORMS = LAYER_TENSORS[:4], LAYER_TENSORS[4:7], LAYER_TENSORS[7:]
EMBEDDINGS = "model.embed_tokens.weight"  # the tiny model ties lm_head to it: one tensor

# (options, the tensors they train on the 2-layer tiny model, written out by hand)
FREEZE_REGIMES = {
    "defaults: the last 2 layers": ({"name": "freeze"}, {f"model.layers.{k}.{t}" for k in (0, 1) for t in LAYER_TENSORS}),
    "mlp of the last layer": (
        {"name": "freeze", "layers": [-1], "modules": ["mlp"]},
        {f"model.layers.1.{t}" for t in MLP},
    ),
    "one full name, embeddings, norms": (
        {
            "name": "freeze",
            "layers": "all",
            "modules": ["model.layers.0.self_attn.q_proj"],
            "train_embeddings": True,
            "train_norms": True,
        },
        {"model.layers.0.self_attn.q_proj.weight", EMBEDDINGS, "model.norm.weight"} | {f"model.layers.{k}.{t}" for k in (0, 1) for t in NORMS},
    ),
    "layer 0's attention and down projection": (
        {"name": "freeze", "layers": [0], "modules": ["self_attn", "down_proj"]},
        {f"model.layers.0.{t}" for t in ATTENTION + ["mlp.down_proj.weight"]},
    ),
}
HFT_REGIMES = {
    "defaults": {"name": "hft"},
    "seed 7": {"name": "hft", "seed": 7},
    "a quarter": {"name": "hft", "fraction": 0.25},
}


def trained_names(options: dict, model=None) -> set[str]:
    model, method = attach(options, model)
    return set(method.trainable_parameters(model))


def hft_selection(options: dict, model=None) -> dict[str, set[str]]:
    """HFT's trained tensors, read from the model: per decoder layer (by index), and 'outside'."""
    by_layer: dict[str, set[str]] = {}
    for name in trained_names(options, model):
        parts = name.split(".")
        layer, tensor = (parts[2], ".".join(parts[3:])) if parts[1] == "layers" else ("outside", name)
        by_layer.setdefault(layer, set()).add(tensor)
    return by_layer


def expected_names(regime: str, options: dict) -> set[str]:
    """The hand-written set for freeze; for HFT, its selection read off the model (checked below)."""
    return FREEZE_REGIMES[regime][1] if regime in FREEZE_REGIMES else trained_names(options)


ALL_REGIMES = {**{k: v[0] for k, v in FREEZE_REGIMES.items()}, **{f"hft {k}": v for k, v in HFT_REGIMES.items()}}


@pytest.mark.parametrize("regime", FREEZE_REGIMES)
def test_freeze_trains_exactly_the_selected_tensors(regime):
    options, expected = FREEZE_REGIMES[regime]
    assert trained_names(options) == expected


@pytest.mark.parametrize("regime", ALL_REGIMES)
def test_forward_is_the_plain_model_with_the_same_tensors(regime):
    """No module is added: attached, the model is the base bit for bit; with its trainable tensors
    moved, it equals a fresh base into which those tensors are copied by name."""
    model, method = attach(ALL_REGIMES[regime])
    assert sum(1 for _ in model.named_modules()) == sum(1 for _ in fresh_base().named_modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe_ids()).logits, fresh_base()(input_ids=probe_ids()).logits)
    randomize(method, model)
    reference = fresh_base()
    reference.load_state_dict({k: v.clone() for k, v in method.state_dict(model).items()}, strict=False)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    with torch.no_grad():
        assert_close(model(input_ids=probe_ids()).logits, reference(input_ids=probe_ids()).logits, 1e-6, "logits")


@pytest.mark.parametrize("regime", ALL_REGIMES)
def test_gradients_reach_exactly_the_selected_tensors(regime):
    """The selected tensors get full fine-tuning's gradients (autograd through the same model with
    every tensor trainable); every other tensor gets none."""
    options = ALL_REGIMES[regime]
    model, method = attach(options)
    randomize(method, model)
    everything = fresh_base()
    everything.load_state_dict({k: v.clone() for k, v in method.state_dict(model).items()}, strict=False)
    ids = probe_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    everything(input_ids=ids, labels=ids).loss.backward()
    full = dict(everything.named_parameters())
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected_names(regime, options) == set(method.trainable_parameters(model))
    for name in with_grad:
        assert_close(dict(model.named_parameters())[name].grad, full[name].grad, 1e-6, f"gradient of {name}")


@pytest.mark.parametrize("regime", ALL_REGIMES)
def test_training_moves_the_selected_tensors_only_and_the_run_reloads(regime, tmp_path, monkeypatch):
    options = ALL_REGIMES[regime]
    selected = expected_names(regime, options)
    run, kept = train_tiny_run_checked(monkeypatch, tmp_path, options)
    trained = kept["model"]
    base = dict(fresh_base().named_parameters())
    moved = {name for name, p in trained.named_parameters() if not torch.equal(p, base[name])}
    assert moved == selected  # every other tensor bitwise unchanged
    assert trained.lm_head.weight is trained.model.embed_tokens.weight  # tying intact
    # The adapter holds the trained tensors only, each once, as trained.
    adapter = load_adapter(run)
    assert set(adapter) == selected
    assert all(torch.equal(adapter[name], dict(trained.named_parameters())[name]) for name in selected)
    loaded = load_run(run).model
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("regime", ALL_REGIMES)
def test_merge_exact(regime):
    assert_merge_exact(ALL_REGIMES[regime])


# From ~5.53 (uniform over the byte vocabulary) in 12 steps at lr 1e-2: HFT to ~2.74 (it trains the
# embeddings), freeze's two layers to ~5.16.
@pytest.mark.parametrize(("options", "drop"), [({"name": "hft"}, 2.0), ({"name": "freeze"}, 0.25)])
def test_loss_goes_down(options, drop, tmp_path):
    run = train_tiny_run(tmp_path, options, steps=12, lr=1e-2)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - drop, losses


# ---- Counts: Σ numel of the selection


def shapes(config) -> dict[str, int]:
    """numel of each tensor of a Llama decoder layer."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    sizes = [h * h, h * kv, h * kv, h * h, h * i, h * i, i * h, h, h]
    return dict(zip(LAYER_TENSORS, sizes))


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_freeze_counts(shape):
    model = fresh_base if shape == "tiny" else smollm2_skeleton
    config = model().config
    layer = sum(shapes(config).values())
    assert trainable_count({"name": "freeze"}, model()) == 2 * layer
    last_mlp = {"name": "freeze", "layers": [-1], "modules": ["mlp"]}
    assert trainable_count(last_mlp, model()) == 3 * config.hidden_size * config.intermediate_size
    # Tied embeddings count once; norms: 2 per layer and the final one.
    expected = config.vocab_size * config.hidden_size + (2 * config.num_hidden_layers + 1) * config.hidden_size
    options = {"name": "freeze", "layers": [0], "modules": ["input_layernorm"], "train_embeddings": True, "train_norms": True}
    assert trainable_count(options, model()) == expected
    if shape == "smollm2-135m":  # 2 · (2·576² + 2·576·192 + 3·576·1536 + 2·576)
        assert 2 * layer == 7_080_192


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_hft_selects_the_papers_share_of_each_category(shape, fraction):
    """Per layer: fraction of q/k/v/o and of the 2 norms; the MLP's gate/up/down, fraction · 3 ·
    layers over the model, ⌊·⌋ or ⌈·⌉ per layer (the paper: 2 in half of the layers, 1 in the others)."""
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    layers = model.config.num_hidden_layers
    selection = hft_selection({"name": "hft", "fraction": fraction}, model)
    assert selection.pop("outside") == {EMBEDDINGS, "model.norm.weight"}  # embeddings, head, final norm train
    per_layer = [selection.get(str(k), set()) for k in range(layers)]
    assert all(len(chosen & set(ATTENTION)) == 4 * fraction for chosen in per_layer)
    mlp = [len(chosen & set(MLP)) for chosen in per_layer]
    assert sum(mlp) == int(3 * fraction * layers + 0.5) and max(mlp) - min(mlp) <= 1
    assert sum(len(chosen & set(NORMS)) for chosen in per_layer) == int(2 * fraction * layers + 0.5)
    assert all(len(chosen & set(NORMS)) <= 1 for chosen in per_layer)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_hft_count_is_the_sum_of_the_selection_and_about_half_of_the_layers(shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    config = model.config
    size = shapes(config)
    selection = hft_selection({"name": "hft"}, model)
    outside = config.vocab_size * config.hidden_size + config.hidden_size  # tied embeddings + final norm
    trained_in_layers = sum(size[t] for layer, chosen in selection.items() if layer != "outside" for t in chosen)
    assert trainable_count({"name": "hft"}, model) == outside + trained_in_layers
    # MLP and norms are exactly half; attention depends on which 2 of q/k/v/o (k, v are smaller with GQA).
    share = trained_in_layers / (config.num_hidden_layers * sum(size.values()))
    assert 0.44 < share < 0.56, share
    if shape == "smollm2-135m":
        assert abs(share - 0.5) < 0.01, share


def test_hft_selection_is_seeded_and_deterministic():
    first = hft_selection({"name": "hft", "seed": 3}, smollm2_skeleton())
    torch.manual_seed(123)  # the training seed's RNG plays no part
    assert hft_selection({"name": "hft", "seed": 3}, smollm2_skeleton()) == first
    others = [hft_selection({"name": "hft", "seed": seed}, smollm2_skeleton()) for seed in (0, 1, 2)]
    assert all(other != first for other in others) and others[0] != others[1]
    # Drawn per layer: the 30 layers do not all train the same attention pair.
    assert len({frozenset(chosen & set(ATTENTION)) for layer, chosen in first.items() if layer != "outside"}) > 1


def test_attach_works_on_meta():
    model, method = attach({"name": "freeze", "train_embeddings": True}, smollm2_skeleton())
    assert all(p.is_meta for p in method.trainable_parameters(model).values())


# ---- Options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "freeze", "layers": [2]}, r"method.layers: 2 is out of range: LlamaForCausalLM has 2 decoder layers"),
        ({"name": "freeze", "layers": [-3]}, r"method.layers: -3 is out of range"),
        ({"name": "freeze", "layers": []}, r"method.layers.*at least 1 item"),
        ({"name": "freeze", "layers": "last"}, r"method.layers"),
        ({"name": "freeze", "modules": ["mlpp"]}, r"method.modules: \['mlpp'\] match no module of the selected layers"),
        # modules are looked up inside the selected layers only
        (
            {"name": "freeze", "layers": [-1], "modules": ["model.layers.0.mlp"]},
            r"method.modules: \['model.layers.0.mlp'\] match no module",
        ),
        ({"name": "freeze", "modules": []}, r"method.modules.*at least 1 item"),
        ({"name": "hft", "fraction": 0.0}, r"method.fraction"),
        ({"name": "hft", "fraction": 1.0}, r"method.fraction"),
        ({"name": "hft", "layers": [0]}, r"method.layers`: unknown key"),
    ],
)
def test_bad_options_fail_clearly(options, message):
    with pytest.raises(TunelabError, match=message):
        attach(options)
