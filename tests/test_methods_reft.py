"""LoReFT: the edit h + Rᵀ(Wh + b − Rh) against the equation, its gradients, the positions it edits
in every batch layout and in generation, R's orthonormality through training, its parameter count
against the paper's formula, save/load, options, and a short training run."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from transformers import DynamicCache

import tunelab
from helpers import read_metrics, read_report, tiny_run_config, write_records_data
from peft_oracle import assert_close, attach, fresh_base, method_of, probe_ids, randomize, smollm2_skeleton, train_tiny_run, trainable_count
from tunelab.config import parse_config
from tunelab.data.batching import make_batch, pack_rows
from tunelab.data.dataset import build_datasets
from tunelab.errors import TunelabError
from tunelab.eval.loss import evaluate_loss
from tunelab.methods.reft import ROTATION_TENSOR, LoreftIntervention, Reft, prompt_positions
from tunelab.models.attention import enable_packed_attention
from tunelab.models.tiny import tiny_tokenizer
from tunelab.objectives.causal_lm import causal_lm_loss
from tunelab.runs import load_run


def rotation_tensors(method, model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in method.trainable_parameters(model).items() if n.endswith(ROTATION_TENSOR)}


def attach_randomized(options: dict, model=None, scale: float = 0.3):
    """Every trainable tensor moved from its init, except the reflection signs on the diagonal of
    R's parametrization, which are ±1 by construction (never trained)."""
    model, method = attach(options, model)
    signs = {n: p.diagonal().clone() for n, p in rotation_tensors(method, model).items()}
    randomize(method, model, scale)
    with torch.no_grad():
        for name, param in rotation_tensors(method, model).items():
            param.diagonal().copy_(signs[name])
    return model, method


def equation(h: torch.Tensor, intervention: LoreftIntervention) -> torch.Tensor:
    """The paper's Φ(h) = h + Rᵀ(W h + b − R h), on rows of h."""
    R = intervention.rotate_layer.weight
    W, b = intervention.learned_source.weight, intervention.learned_source.bias
    return h + (R.T @ (W @ h.T + b[:, None] - R @ h.T)).T


def assert_orthonormal_rows(R: torch.Tensor) -> None:
    assert_close(R @ R.T, torch.eye(R.shape[0]), 1e-6, "R Rᵀ")


# ---- The intervention


def test_intervention_equals_the_equation():
    torch.manual_seed(0)
    intervention = LoreftIntervention(16, 3, dropout=0.0, device=torch.device("cpu"))
    with torch.no_grad():
        original = intervention.rotate_layer.parametrizations.weight.original
        original.add_(0.3 * torch.randn(original.shape) * (1 - torch.eye(*original.shape)))
        intervention.learned_source.weight.add_(torch.randn(3, 16))
        intervention.learned_source.bias.add_(torch.randn(3))
        h = torch.randn(5, 16)
        assert_orthonormal_rows(intervention.rotate_layer.weight)
        assert_close(intervention(h), equation(h, intervention), 1e-6, "forward")


def test_gradcheck_float64():
    """Gradients of h, of R's reflectors (off the sign diagonal) and of W, b against finite differences."""
    torch.manual_seed(0)
    intervention = LoreftIntervention(6, 2, dropout=0.0, device=torch.device("cpu")).double()
    original = intervention.rotate_layer.parametrizations.weight.original.detach().clone()
    off_diagonal = 1 - torch.eye(2, 6, dtype=torch.float64)

    def edit(h, reflectors, weight, bias):
        tensors = {ROTATION_TENSOR: original + reflectors * off_diagonal, "learned_source.weight": weight, "learned_source.bias": bias}
        return functional_call(intervention, tensors, (h,))

    inputs = [torch.randn(3, 6), 0.3 * torch.randn(2, 6), torch.randn(2, 6), torch.randn(2)]
    assert torch.autograd.gradcheck(edit, tuple(t.double().requires_grad_() for t in inputs))


def test_dropout_drops_the_edit_only_in_training():
    torch.manual_seed(0)
    intervention = LoreftIntervention(16, 3, dropout=0.5, device=torch.device("cpu"))
    h = torch.randn(64, 16)
    with torch.no_grad():
        edit = equation(h, intervention) - h
        intervention.train()
        dropped = intervention(h) - h
        kept = dropped != 0
        assert 0 < kept.float().mean() < 1
        assert_close(dropped[kept], 2 * edit[kept], 1e-5, "kept edit, scaled by 1 / (1 - p)")
        intervention.eval()
        assert_close(intervention(h), equation(h, intervention), 1e-6, "eval forward")


# ---- Positions


def pyreft_positions(prompt_length: int, first: int, last: int) -> list[int]:
    """pyreft's get_intervention_locations: with both sides, each takes min(k, L // 2)."""
    room = prompt_length // 2 if first and last else prompt_length
    n_first, n_last = min(first, room), min(last, room)
    return list(range(n_first)) + list(range(prompt_length - n_last, prompt_length))


@pytest.mark.parametrize("first, last", [(7, 7), (2, 3), (1, 1), (3, 0), (0, 2)])
def test_prompt_positions_follow_pyreft(first, last):
    lengths = [20, 9, 5, 4, 3, 2, 1]
    starts = torch.cat([torch.arange(n) == 0 for n in lengths])
    is_first, is_last = prompt_positions(starts, torch.ones_like(starts), first, last)
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    expected = [o + p for o, n in zip(offsets, lengths) for p in pyreft_positions(n, first, last)]
    assert (is_first | is_last).nonzero().flatten().tolist() == expected
    assert not (is_first & is_last).any()


# Prompt (positions 0..P-1), then targets; the last sample's target mask has a gap: only the
# tokens before its first target are prompt.
TEXTS = [("Name: Ana", " Lopez"), ("Hello there, how are you today?", " fine"), ("Hi!", "ab"), ("Q", "xyz")]
EDITED = {"name": "reft", "layers": [0], "positions": "f2+l3"}


def layout_samples() -> list[dict]:
    tok = tiny_tokenizer()
    samples = []
    for prompt, answer in TEXTS:
        p, a = tok(prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
        samples.append({"input_ids": p + a, "target_mask": [0] * len(p) + [1] * len(a)})
    gap = samples[0]["input_ids"] + samples[2]["input_ids"]
    samples.append({"input_ids": gap, "target_mask": [0] * 5 + [1] * 2 + [0] * (len(gap) - 9) + [1] * 2})
    return samples


def sample_slices(samples: list[dict], layout: str, max_length: int) -> list[tuple[int, int]]:
    """(row, first column) of each sample in make_batch's layout."""
    lengths = [len(s["input_ids"]) for s in samples]
    rows = {"padding-free": [list(range(len(samples)))], "mask-packed": pack_rows(lengths, max_length), "padded": [[i] for i in range(len(samples))]}[layout]
    where = {}
    for r, row in enumerate(rows):
        column = 0
        for i in row:
            where[i] = (r, column)
            column += lengths[i]
    return [where[i] for i in range(len(samples))]


def layer_outputs(model, run) -> list[torch.Tensor]:
    """Decoder layer 0's outputs (after ReFT's edit: hooks run in registration order) in each forward of `run`."""
    captured = []
    handle = model.model.layers[0].register_forward_hook(lambda module, args, out: captured.append(out.detach().clone()))
    try:
        with torch.no_grad():
            run(model)
    finally:
        handle.remove()
    return captured


def assert_edited_exactly_at(ours: torch.Tensor, base: torch.Tensor, chosen: list[tuple[int, int]], intervention) -> None:
    """Bitwise the base model's hidden states everywhere but `chosen` (row, column), the equation there."""
    edited = torch.zeros(ours.shape[:2], dtype=torch.bool)
    for row, column in chosen:
        edited[row, column] = True
    assert torch.equal(ours[~edited], base[~edited]), "hidden states changed outside the chosen positions"
    with torch.no_grad():
        assert_close(ours[edited], equation(base[edited], intervention), 1e-6, "edited hidden states")
    assert (ours[edited] - base[edited]).abs().amax(dim=-1).min() > 1e-3, "a chosen position was not edited"


@pytest.mark.parametrize("layout", ["padding-free", "mask-packed", "padded"])
def test_edits_exactly_each_samples_prompt_positions_in_every_batch_layout(layout):
    model, method = attach_randomized(EDITED)
    base = fresh_base()
    for m in (model, base):
        assert enable_packed_attention(m)
    samples = layout_samples()
    batch = make_batch(samples, 40, packing=layout != "padded", pad_id=0, padding_free=layout == "padding-free")
    if layout == "mask-packed":
        assert batch.attention_mask is not None and batch.input_ids.shape[0] < len(samples)  # rows hold several samples
    (ours,), (reference,) = (layer_outputs(m, lambda m: causal_lm_loss(m, batch)) for m in (model, base))
    chosen = []
    for (row, column), sample in zip(sample_slices(samples, layout, 40), samples):
        prompt_length = sample["target_mask"].index(1)
        chosen += [(row, column + p) for p in pyreft_positions(prompt_length, 2, 3)]
    assert_edited_exactly_at(ours, reference, chosen, model.model.layers[0].reft["shared"])


def test_edits_each_prompts_positions_in_left_padded_generation():
    """The first pass edits each row's own prompt positions (padding untouched); decoding steps,
    even of several tokens at once, are not edited."""
    model, _ = attach_randomized(EDITED)
    base = fresh_base()
    prompts = [s["input_ids"][: s["target_mask"].index(1)] for s in layout_samples()]
    width = max(map(len, prompts))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :], attention_mask[row, width - len(ids) :] = torch.tensor(ids), 1

    def run(m):
        m.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False, pad_token_id=0)

    ours, reference = layer_outputs(model, run), layer_outputs(base, run)
    assert len(ours) == 3
    chosen = [(row, width - len(ids) + p) for row, ids in enumerate(prompts) for p in pyreft_positions(len(ids), 2, 3)]
    assert_edited_exactly_at(ours[0], reference[0], chosen, model.model.layers[0].reft["shared"])

    def prompt_then_three_tokens(m):
        cache = DynamicCache(config=m.config)
        m(input_ids=input_ids[:1], cache=cache, use_cache=True)
        m(input_ids=torch.tensor([[40, 41, 42]]), cache=cache, use_cache=True)

    # Layer 0's cache holds keys and values of its input, which ReFT on layer 0 does not change.
    ours, reference = layer_outputs(model, prompt_then_three_tokens), layer_outputs(base, prompt_then_three_tokens)
    assert torch.equal(ours[1], reference[1])
    assert not torch.equal(ours[0], reference[0])


def test_a_plain_forward_treats_its_real_tokens_as_the_prompt():
    """Without targets or position ids: the tokens the attention mask keeps (here after 3 pads)."""
    model, method = attach_randomized({"name": "reft", "layers": [1], "positions": "f1+l2"})
    ids = probe_ids()
    n = ids.shape[1]
    with torch.no_grad():
        model(input_ids=ids)
        assert method._positions["shared"].tolist() == [0, n - 2, n - 1]
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
        model(input_ids=padded, attention_mask=(torch.arange(n + 3) >= 3).long()[None])
        assert method._positions["shared"].tolist() == [3, n + 1, n + 2]


def test_separate_first_and_last_interventions():
    model, method = attach_randomized({"name": "reft", "layers": [0], "positions": "f2+l3", "share_weights": False})
    base = fresh_base()
    ids = probe_ids()
    (ours,), (reference,) = (layer_outputs(m, lambda m: m(input_ids=ids)) for m in (model, base))
    n, reft = ids.shape[1], model.model.layers[0].reft
    with torch.no_grad():
        assert_close(ours[0, :2], equation(reference[0, :2], reft["first"]), 1e-6, "first positions")
        assert_close(ours[0, n - 3 :], equation(reference[0, n - 3 :], reft["last"]), 1e-6, "last positions")
    assert torch.equal(ours[0, 2 : n - 3], reference[0, 2 : n - 3])


# ---- Training, saving, counting


def test_frozen_weights_stay_trainable_move_and_R_stays_orthonormal(tmp_path):
    """Under weight decay too: R's reflectors are kept out of it (it would zero R's rows)."""
    train_file = write_records_data(tmp_path / "data", n_train=8)[0]
    config = tiny_run_config(tmp_path / "run", train_file, method={"name": "reft"}, train={"max_steps": 3, "lr": 1e-2, "weight_decay": 0.1})
    run = tunelab.train(config).output_dir
    torch.manual_seed(0)  # the loop seeds the RNG before attaching: this is the run's init
    _, init_method = initial = attach({"name": "reft"})
    init = init_method.state_dict(initial[0])
    trained = load_run(run)
    base = dict(fresh_base().named_parameters())
    for name, param in trained.model.named_parameters():
        if ".reft." not in name:
            assert torch.equal(param, base[name]), f"frozen {name} changed"
    state = trained.method.state_dict(trained.model)
    assert sorted(state) == sorted(init)
    for name, tensor in state.items():
        assert not torch.equal(tensor, init[name]), f"{name} did not move"
        if name.endswith(ROTATION_TENSOR):
            assert torch.equal(tensor.diagonal(), init[name].diagonal())
    rotations = [m.reft["shared"].rotate_layer.weight for m in trained.model.model.layers]
    for R in rotations:
        assert_orthonormal_rows(R.detach())


def test_trained_run_reloads_to_the_same_model(tmp_path):
    """The eval loss the loop computed on the trained model in memory equals the reloaded run's."""
    train_file, eval_file = write_records_data(tmp_path / "data", n_train=8, n_eval=4)
    config = tiny_run_config(tmp_path / "run", train_file, eval_file, method={"name": "reft"}, train={"max_steps": 3, "lr": 1e-2})
    run = tunelab.train(config).output_dir
    loaded = load_run(run)
    data = build_datasets(parse_config(config).data, loaded.tokenizer, seed=0)
    reloaded = evaluate_loss(loaded.model, data.eval, 4, 384, True, loaded.tokenizer.pad_token_id)
    assert reloaded["eval_loss"] == pytest.approx(read_report(run)["eval_loss"], rel=1e-6)


def test_saved_tensors_reload_to_the_identical_R():
    model, method = attach_randomized({"name": "reft"})
    state = {name: t.clone() for name, t in method.state_dict(model).items()}
    again, method_again = attach({"name": "reft"})  # a different init: the RNG moved on
    assert not torch.equal(again.model.layers[0].reft["shared"].rotate_layer.weight, model.model.layers[0].reft["shared"].rotate_layer.weight)
    method_again.load_state_dict(again, state, "test")
    for layer, layer_again in zip(model.model.layers, again.model.layers):
        assert torch.equal(layer.reft["shared"].rotate_layer.weight, layer_again.reft["shared"].rotate_layer.weight)
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe_ids()).logits, again(input_ids=probe_ids()).logits)


def test_activation_checkpointing_gives_the_same_gradients():
    """Checkpointed layers recompute their forward (ReFT's hook included) during backward."""
    samples = layout_samples()
    batch = make_batch(samples, 64, packing=False, pad_id=0)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, method = attach_randomized({"name": "reft"})
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        causal_lm_loss(model, batch).backward()
        grads.append({n: p.grad for n, p in method.trainable_parameters(model).items()})
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, 1e-6, f"gradient of {name}")


def reft_formula(config, layers: int, r: int = 4, interventions: int = 1) -> int:
    """Wu et al.: per intervention R (r × d), W (r × d) and b (r): 2·r·d + r."""
    return layers * interventions * (2 * r * config.hidden_size + r)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    layers = model.config.num_hidden_layers
    assert trainable_count({"name": "reft"}, model) == reft_formula(model.config, layers)
    if shape == "smollm2-135m":  # 30 · (2 · 4 · 576 + 4)
        assert reft_formula(model.config, layers) == 138_360
        model = smollm2_skeleton()
    other = {"name": "reft", "r": 8, "layers": [0, 1], "share_weights": False}
    assert trainable_count(other, model if shape == "tiny" else smollm2_skeleton()) == reft_formula(model.config, 2, r=8, interventions=2)


def test_loss_goes_down(tmp_path):
    """Against the same batches without training (lr ~ 0): edits at prompt positions of a random
    tiny model move its loss by ~0.03 in 12 steps, an untrained run's steps differ by ~0.004."""
    losses = {}
    for lr in (1e-9, 5e-2):
        run = train_tiny_run(tmp_path / str(lr), {"name": "reft"}, steps=12, lr=lr)
        losses[lr] = [m["loss"] for m in read_metrics(run) if "loss" in m]
    untrained, trained = losses[1e-9], losses[5e-2]
    assert len(trained) == 12 and all(t < u - 0.02 for t, u in zip(trained[-3:], untrained[-3:])), (trained, untrained)


def test_not_mergeable():
    model, method = attach({"name": "reft"})
    assert Reft.mergeable is False
    with pytest.raises(TunelabError, match="cannot be merged"):
        method.merge(model)


def test_half_precision_base_keeps_fp32_interventions():
    model, method = attach_randomized({"name": "reft"}, fresh_base().to(torch.bfloat16))
    assert {p.dtype for p in method.trainable_parameters(model).values()} == {torch.float32}
    out = model(input_ids=probe_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters(model).values())


# ---- Options


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"name": "reft", "r": 0}, "method.r"),
        ({"name": "reft", "positions": "f0+l0"}, "method.positions"),
        ({"name": "reft", "positions": "l1+f1"}, "method.positions"),
        ({"name": "reft", "positions": "first7"}, "method.positions"),
        ({"name": "reft", "layers": []}, "method.layers"),
        ({"name": "reft", "layers": [0, 0]}, "method.layers"),
        ({"name": "reft", "layers": [-1]}, "method.layers"),
        ({"name": "reft", "dropout": 1.0}, "method.dropout"),
        ({"name": "reft", "rank": 4}, "method.rank"),
    ],
)
def test_bad_options_fail_clearly(bad, message):
    with pytest.raises(TunelabError, match=message):
        method_of(bad)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"name": "reft", "layers": [0, 2]}, r"method.layers: \[2\] out of range; this model has 2 decoder layers"),
        ({"name": "reft", "r": 65}, "method.r: 65 orthonormal rows do not fit the hidden size 64"),
    ],
)
def test_options_that_do_not_fit_the_model_fail_clearly(options, message):
    with pytest.raises(TunelabError, match=message):
        attach(options)


@pytest.mark.parametrize("positions, expected", [("f7+l7", (7, 7)), ("f3", (3, 0)), ("l1", (0, 1)), ("f0+l2", (0, 2))])
def test_positions_parse(positions, expected):
    assert method_of({"name": "reft", "positions": positions}).options.first_last == expected
