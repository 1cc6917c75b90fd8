"""Prompt tuning and prefix tuning against peft: logits, gradients, generation, packing, round trips."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import get_peft_model

from helpers import read_metrics
from peft_oracle import assert_close, attach, copy_into_peft, fresh_base, probe_ids, randomize, smollm2_skeleton, train_tiny_run, trainable_count
from tunelab.data.batching import make_batch
from tunelab.errors import TunelabError
from tunelab.export import export_run, import_peft
from tunelab.models.attention import enable_packed_attention
from tunelab.models.tiny import tiny_tokenizer
from tunelab.objectives.causal_lm import causal_lm_loss
from tunelab.runs import load_run

N = 5
CASES = {
    "prompt": ({"name": "prompt_tuning", "num_virtual_tokens": N}, lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
    "prefix": ({"name": "prefix_tuning", "num_virtual_tokens": N}, lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
    "prefix+mlp": (
        {"name": "prefix_tuning", "num_virtual_tokens": N, "projection": True, "projection_hidden": 16},
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16),
    ),
}


def peft_twin(case: str, model, method):
    """peft's model with tunelab's tensors (through the export for tables, directly for the MLP)."""
    options, config = CASES[case]
    peft_model = get_peft_model(fresh_base(), config())
    if options.get("projection"):
        encoder = dict(model.prefix_encoder.named_parameters())
        with torch.no_grad():
            for name, param in peft_model.prompt_encoder["default"].named_parameters():
                param.copy_(encoder[name])
    else:
        copy_into_peft(method, model, peft_model)
    return peft_model


def peft_logits(peft_model, case: str, out) -> torch.Tensor:
    return out.logits[:, N:] if case == "prompt" else out.logits  # peft returns the virtual positions too


@pytest.mark.parametrize("case", CASES)
def test_logits_and_gradients_equal_peft(case):
    model, method = attach(CASES[case][0])
    randomize(method, model)
    peft_model = peft_twin(case, model, method)
    ids = probe_ids()
    ours = model(input_ids=ids).logits
    theirs = peft_logits(peft_model, case, peft_model(input_ids=ids))
    assert_close(ours, theirs, 1e-5, "logits")
    # The same function of the logits at the caller's positions (peft's own loss would also score
    # the first real token from the last virtual one, which tunelab's shifted labels never do).
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(0))
    (ours * weights).sum().backward(), (theirs * weights).sum().backward()
    peft_grads = dict((n, p.grad) for n, p in peft_model.prompt_encoder["default"].named_parameters())
    for name, param in method.trainable_parameters(model).items():
        key = "embedding.weight" if name.endswith("prompt_embeddings") else name.removeprefix("prefix_encoder.")
        assert_close(param.grad, peft_grads[key], 1e-5, f"gradient of {name}")


@pytest.mark.parametrize(
    "case",
    # Known defect: after some other test files ran in the same process (e.g. test_methods_oft,
    # test_methods_partial), the prefix case generates differently from peft; alone it passes.
    ["prompt", pytest.param("prefix", marks=pytest.mark.xfail(reason="order-dependent mismatch with peft; see the issue note", strict=False))],
)
def test_greedy_generation_equals_peft(case):
    model, method = attach(CASES[case][0])
    randomize(method, model, scale=1.0)
    peft_model = peft_twin(case, model, method)
    ids = probe_ids("Name: Ana")
    with torch.no_grad():
        ours = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        theirs = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert ours[0, ids.shape[1] :].tolist() == theirs[0, -8:].tolist()


@pytest.mark.parametrize("case", ["prompt", "prefix"])
def test_every_batch_layout_gives_each_sample_its_own_virtual_tokens(case):
    """A padding-free packed row, padded rows behind a mask, and each sample alone: the same loss."""
    model, method = attach(CASES[case][0])
    assert enable_packed_attention(model)
    randomize(method, model, scale=1.0)
    tok = tiny_tokenizer()
    samples = [{"input_ids": tok(t)["input_ids"], "target_mask": [1] * len(tok(t)["input_ids"])} for t in ("first sample", "a longer second one", "3rd")]
    with torch.no_grad():
        alone = sum(causal_lm_loss(model, make_batch([s], 64, False, 0)).item() for s in samples)
        padded = causal_lm_loss(model, make_batch(samples, 64, False, 0)).item()
        packed = causal_lm_loss(model, make_batch(samples, 64, True, 0, padding_free=True)).item()
    assert padded == pytest.approx(alone, rel=1e-5) and packed == pytest.approx(alone, rel=1e-5)


def test_prompt_tuning_refuses_mask_packed_rows(tmp_path, monkeypatch):
    """On a model without padding-free attention, packed rows would share one prompt: refused."""
    import importlib

    loop = importlib.import_module("tunelab.train.loop")  # `tunelab.train.train` shadows the module name
    monkeypatch.setattr(loop, "uses_packed_attention", lambda model: False)
    with pytest.raises(TunelabError, match="data.packing: false"):
        train_tiny_run(tmp_path, CASES["prompt"][0], steps=1)


@pytest.mark.parametrize("case", ["prompt", "prefix", "prefix+mlp"])
def test_trains_and_round_trips_with_peft(case, tmp_path):
    options, config = CASES[case]
    # Virtual-token methods want a high learning rate (Lester et al. use 0.3).
    run = train_tiny_run(tmp_path / "tunelab", options, steps=6, lr=0.1)
    losses = [r["loss"] for r in read_metrics(run)]
    assert sum(losses[-2:]) < sum(losses[:2])
    export_run(run, "peft", tmp_path / "exported")
    loaded = peft.PeftModel.from_pretrained(fresh_base(), tmp_path / "exported").eval()
    ours = load_run(run).model.eval()
    with torch.no_grad():
        assert_close(peft_logits(loaded, case, loaded(input_ids=probe_ids())), ours(input_ids=probe_ids()).logits, 1e-5, "export")

    saved = get_peft_model(fresh_base(), config())
    with torch.no_grad():
        for p in saved.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.5)
    saved.save_pretrained(tmp_path / "peft-saved")
    imported = load_run(import_peft(tmp_path / "peft-saved", tmp_path / "imported", model="tiny-random-llama")).model.eval()
    with torch.no_grad():
        expected = peft_logits(saved, case, saved.eval()(input_ids=probe_ids()))
        assert_close(imported(input_ids=probe_ids()).logits, expected, 1e-5, "import")


def test_merge_is_refused_clearly(tmp_path):
    model, method = attach(CASES["prefix"][0])
    with pytest.raises(TunelabError, match="cannot be merged.*--format peft"):
        method.merge(model)


def test_text_init_copies_the_text_embeddings():
    model, method = attach({"name": "prompt_tuning", "num_virtual_tokens": 4, "init": "text", "init_text": "ab"})
    ids = tiny_tokenizer()("ab", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[torch.tensor((ids * 2)[:4])]
    assert torch.equal(model.prompt_tuning.prompt_embeddings, expected)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_counts_match_the_papers(shape):
    model_of = fresh_base if shape == "tiny" else smollm2_skeleton
    c = model_of().config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    assert trainable_count(CASES["prompt"][0], model_of()) == N * c.hidden_size  # n · d (Lester et al.)
    assert trainable_count(CASES["prefix"][0], model_of()) == N * c.num_hidden_layers * 2 * kv  # n · L · 2 · d_kv
    width = c.num_hidden_layers * 2 * kv
    assert trainable_count(CASES["prefix+mlp"][0], model_of()) == N * kv + (kv * 16 + 16) + (16 * width + width)
