"""LoFiT: the offset equation and its gradients against an independent hook, the head selection
against an independent replay of step 1, the selection saved and restored by load_run and resume
without re-selecting, the paper's parameter count, the merge refusal, options, and a short run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from helpers import assert_tensors_equal, load_adapter, read_metrics, tiny_run_config, write_records_data
from peft_oracle import assert_close, attach, forbid_prepare, fresh_base, prepare_batches, probe_ids, randomize, smollm2_skeleton, train_tiny_run, trainable_count
from tunelab.errors import TunelabError
from tunelab.methods.lofit import Lofit
from tunelab.objectives.causal_lm import causal_lm_loss
from tunelab.runs import ADAPTER_FILE, load_run

HEADS, HEAD_DIM, LAYERS = 4, 16, 2  # the tiny model's


def independent_offsets_model(bias: torch.Tensor, head_index: list[int]):
    """The fresh base with z_l^i + v_l^i written as its own o_proj pre-hooks (head g = l·heads + i)."""
    model = fresh_base()
    for layer, decoder in enumerate(model.model.layers):

        def add(module, args, layer=layer):
            z = args[0].clone()
            for row, head in enumerate(head_index):
                if head // HEADS == layer:
                    i = head % HEADS
                    z[..., i * HEAD_DIM : (i + 1) * HEAD_DIM] += bias[row]
            return (z,)

        decoder.self_attn.o_proj.register_forward_pre_hook(add)
    return model


def attached_with(heads: list[int]):
    model, method = attach({"name": "lofit", "heads": len(heads)})
    randomize(method, model, scale=0.5)
    model.lofit.head_index.copy_(torch.tensor(heads))
    return model, method


@pytest.mark.parametrize("heads", [[1, 6], [4, 5, 7], [2]])
def test_forward_adds_the_offsets_to_the_selected_heads(heads):
    model, _ = attached_with(heads)
    bias = model.lofit.lofit_bias.detach().clone()
    expected = independent_offsets_model(bias, heads)
    with torch.no_grad():
        assert_close(model(input_ids=probe_ids()).logits, expected(input_ids=probe_ids()).logits, 1e-6, "logits")
        # ...and the offsets matter: zero them and the logits move.
        model.lofit.lofit_bias.zero_()
        assert (model(input_ids=probe_ids()).logits - expected(input_ids=probe_ids()).logits).abs().max() > 1e-3


def test_gradients_equal_autograd_through_the_equation():
    heads = [0, 3, 6]
    model, _ = attached_with(heads)
    bias = model.lofit.lofit_bias.detach().clone().requires_grad_(True)
    expected = independent_offsets_model(bias, heads)
    model(input_ids=probe_ids(), labels=probe_ids()).loss.backward()
    expected(input_ids=probe_ids(), labels=probe_ids()).loss.backward()
    assert_close(model.lofit.lofit_bias.grad, bias.grad, 1e-5, "gradient of lofit_bias")


def test_gradcheck_of_the_offset_hook():
    """float64 gradcheck of a hooked o_proj with respect to the offsets."""
    torch.manual_seed(0)
    model, _ = attach({"name": "lofit", "heads": 3})
    model.double()
    model.lofit.head_index.copy_(torch.tensor([1, 4, 6]))
    o_proj = model.model.layers[1].self_attn.o_proj
    z = torch.randn(2, HEADS * HEAD_DIM, dtype=torch.float64)
    bias = torch.randn(3, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: through_offsets(model, o_proj, z, b), (bias,))


def through_offsets(model, o_proj, z, bias):
    """o_proj(z) with the module's offsets replaced by `bias` (so that gradcheck can vary them)."""
    heads = model.lofit
    original = heads.lofit_bias
    del heads.lofit_bias
    heads.lofit_bias = bias
    try:
        return o_proj(z)
    finally:
        del heads.lofit_bias
        heads.lofit_bias = original


# ---- Head selection (step 1)


def independent_selection(batches, k: int, steps: int, lr: float, l1: float) -> tuple[list[int], torch.Tensor]:
    """Step 1 replayed: z ← (1 + A) ⊙ z on every head, Adam on L/n + λ‖A‖₁, top-k by ‖A_l^i‖₂."""
    model = fresh_base().requires_grad_(False)
    scaling = torch.zeros(LAYERS, HEADS * HEAD_DIM, requires_grad=True)
    for layer, decoder in enumerate(model.model.layers):
        decoder.self_attn.o_proj.register_forward_pre_hook(lambda m, args, layer=layer: (args[0] * (1 + scaling[layer]),))
    optimizer = torch.optim.Adam([scaling], lr=lr)
    for step in range(steps):
        batch = batches[step % len(batches)]
        optimizer.zero_grad()
        (causal_lm_loss(model, batch) / batch.n_targets + l1 * scaling.abs().sum()).backward()
        optimizer.step()
    norms = scaling.detach().view(LAYERS * HEADS, HEAD_DIM).norm(dim=1)
    ranked = sorted(range(LAYERS * HEADS), key=lambda g: -norms[g].item())
    return sorted(ranked[:k]), norms


@pytest.mark.parametrize("options", [{"heads": 3, "select_steps": 5, "select_lr": 0.02, "l1": 1e-3}, {"heads": 0.25, "select_steps": 4}])
def test_selection_is_top_k_by_norm_of_the_trained_scalings(options):
    model, method = attach({"name": "lofit", **options})
    batches = prepare_batches()
    method.prepare(model, batches, causal_lm_loss)
    opts = method.options
    k = model.lofit.head_index.numel()
    expected, norms = independent_selection(batches, k, opts.select_steps, opts.select_lr, opts.l1)
    ordered = norms.sort(descending=True).values
    assert ordered[k - 1] - ordered[k] > 1e-6, "a tie at the boundary would not test the ranking"
    assert model.lofit.head_index.tolist() == expected
    # Selection leaves no hooks behind and trains nothing else: the model is the base plus zero offsets.
    assert not model.lofit.lofit_bias.any() and model.lofit.lofit_bias.grad is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe_ids()).logits, fresh_base()(input_ids=probe_ids()).logits)


def test_selection_is_deterministic_and_leaves_the_rng_alone():
    chosen = []
    for _ in range(2):
        model, method = attach({"name": "lofit", "heads": 3})
        state = torch.get_rng_state()
        method.prepare(model, prepare_batches(), causal_lm_loss)
        assert torch.equal(torch.get_rng_state(), state)
        chosen.append(model.lofit.head_index.tolist())
    assert chosen[0] == chosen[1]


# ---- Runs: the selection is saved, and load_run / resume rebuild it without selecting again

OPTIONS = {"name": "lofit", "heads": 3, "select_steps": 6, "select_lr": 0.05}


def test_run_saves_the_selection_and_load_run_restores_it(tmp_path, monkeypatch):
    run = train_tiny_run(tmp_path / "a", OPTIONS, steps=3, lr=1e-2)
    again = train_tiny_run(tmp_path / "b", OPTIONS, steps=3, lr=1e-2)
    saved = load_file(run / "adapter" / ADAPTER_FILE)
    assert saved["lofit.head_index"].tolist() == load_file(again / "adapter" / ADAPTER_FILE)["lofit.head_index"].tolist()
    assert saved["lofit.head_index"].tolist() != [0, 1, 2], "the placeholder selection survived training"
    forbid_prepare(monkeypatch, Lofit)
    loaded = load_run(run).model.eval()
    assert loaded.lofit.head_index.tolist() == saved["lofit.head_index"].tolist()
    expected = independent_offsets_model(saved["lofit.lofit_bias"], saved["lofit.head_index"].tolist()).eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=probe_ids()).logits, expected(input_ids=probe_ids()).logits, 1e-6, "reloaded logits")


def test_frozen_weights_unchanged_and_offsets_trained(tmp_path):
    run = train_tiny_run(tmp_path, OPTIONS, steps=3, lr=1e-2)
    loaded = load_run(run).model
    base = dict(fresh_base().named_parameters())
    for name, param in loaded.named_parameters():
        if name == "lofit.lofit_bias":
            assert param.abs().min() > 0, "some offset did not train"
        else:
            assert torch.equal(param, base[name]), name


def test_resume_equals_an_uninterrupted_run_without_selecting_again(tmp_path, monkeypatch):
    train_file, _ = write_records_data(tmp_path / "data", n_train=8)
    config = tiny_run_config(tmp_path / "run", train_file, method=OPTIONS, train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 5, "lr": 1e-2})
    tunelab.train(config)
    finished = load_adapter(config["output"])
    forbid_prepare(monkeypatch, Lofit)
    assert tunelab.train(config, resume=True).report["resumed_from_step"] == 2
    assert_tensors_equal(load_adapter(config["output"]), finished)


def test_selection_forwards_do_not_move_the_run_rng(tmp_path, monkeypatch):
    """NEFTune draws noise in every training forward: a prepare that consumes the RNG must leave the
    run's noise, hence its weights, as they are (the loop forks the RNG around prepare)."""
    train_file, _ = write_records_data(tmp_path / "data", n_train=8)
    options = {"name": "lofit", "heads": 3}

    def run(name):
        config = tiny_run_config(tmp_path / name, train_file, method=options, train={"max_steps": 2, "lr": 1e-2, "neftune_alpha": 5.0})
        return load_adapter(tunelab.train(config).output_dir)

    plain = run("plain")
    original = Lofit.prepare

    def drawing(self, model, batches, loss_fn):
        torch.rand(1000)
        original(self, model, batches, loss_fn)

    monkeypatch.setattr(Lofit, "prepare", drawing)
    assert_tensors_equal(run("drawing"), plain)


# ---- Count, merge, training, options


def lofit_formula(config, share: float = 0.03) -> int:
    """K · d_head, K = 3% of all heads (at least one)."""
    heads = config.num_hidden_layers * config.num_attention_heads
    return max(1, round(share * heads)) * (config.hidden_size // config.num_attention_heads)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    assert trainable_count({"name": "lofit"}, model) == lofit_formula(model.config)
    if shape == "smollm2-135m":  # 8 of 270 heads, 64 dims each
        assert lofit_formula(model.config) == 512
    assert trainable_count({"name": "lofit", "heads": 5}, model) == 5 * (model.config.hidden_size // model.config.num_attention_heads)


def test_merge_is_refused():
    model, method = attach({"name": "lofit"})
    assert not Lofit.mergeable
    with pytest.raises(TunelabError, match="cannot be merged"):
        method.merge(model)


def test_loss_goes_down(tmp_path):
    run = train_tiny_run(tmp_path, {"name": "lofit", "heads": 0.5}, steps=12, lr=0.1)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and max(losses[-3:]) < losses[0] - 0.1, losses


def test_half_precision_base_keeps_fp32_offsets():
    model, method = attach({"name": "lofit", "heads": 2}, fresh_base().to(torch.bfloat16))
    randomize(method, model)
    assert model.lofit.lofit_bias.dtype == torch.float32
    out = model(input_ids=probe_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.lofit.lofit_bias.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "options, message",
    [
        ({"heads": 0}, "heads"),
        ({"heads": 1.5}, "heads"),
        ({"heads": -0.1}, "heads"),
        ({"select_steps": 0}, "select_steps"),
        ({"select_lr": 0.0}, "select_lr"),
        ({"l1": -1.0}, "l1"),
        ({"scale": 1.0}, "scale"),
    ],
)
def test_bad_options_fail_validation(options, message):
    with pytest.raises(Exception, match=message):
        attach({"name": "lofit", **options})


def test_more_heads_than_the_model_has_fails_clearly():
    with pytest.raises(TunelabError, match=r"method.heads: 9 is more than the model's 8 attention heads"):
        attach({"name": "lofit", "heads": 9})


def test_weights_with_a_bad_selection_fail_clearly():
    model, method = attach({"name": "lofit", "heads": 2})
    state = method.state_dict(model)
    with pytest.raises(TunelabError, match="head_index"):
        method.load_state_dict(model, {**state, "lofit.head_index": torch.tensor([3, 8])}, "test")
    with pytest.raises(TunelabError, match="no 'lofit.head_index'"):
        method.load_state_dict(model, {"lofit.lofit_bias": state["lofit.lofit_bias"]}, "test")
