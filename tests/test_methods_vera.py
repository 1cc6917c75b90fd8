"""VeRA against peft (the reference): projections, forward, gradients, merge, peft files, parameter counts."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict

from peft_oracle import (
    assert_close,
    assert_equal_to_peft,
    assert_merge_exact,
    assert_round_trips,
    attach,
    fresh_base,
    method_of,
    probe_ids,
    randomize,
    smollm2_skeleton,
    trainable_count,
)
from tunelab.errors import TunelabError
from tunelab.export import import_peft
from tunelab.runs import load_run

QV = ["q_proj", "v_proj"]


def vera_options(**extra) -> dict:
    return {"name": "vera", "r": 8, **extra}


def test_defaults_are_peft_defaults():
    opts = method_of({"name": "vera"}).options
    reference = peft.VeraConfig()
    assert (opts.r, opts.d_initial, opts.projection_prng_key, opts.dropout) == (reference.r, reference.d_initial, reference.projection_prng_key, reference.vera_dropout)
    assert opts.target == QV  # peft's VeRA default for Llama models


@pytest.mark.parametrize("target", [QV, "all-linear"])
def test_fresh_attach_is_peft_bit_for_bit(target):
    """Same seed, same generator, same init: a fresh attach equals peft's projections and vectors."""
    model, method = attach(vera_options(target=target))
    peft_model = get_peft_model(fresh_base(), peft.VeraConfig(r=8, target_modules=target))
    _, ours = method.peft_export(model)
    theirs = get_peft_model_state_dict(peft_model)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        logits = model(input_ids=probe_ids()).logits
        assert torch.equal(logits, peft_model(input_ids=probe_ids()).logits)
        # λ_b = 0: the wrapped model starts equal to the base model.
        assert torch.equal(logits, fresh_base()(input_ids=probe_ids()).logits)


@pytest.mark.parametrize("target", [QV, "all-linear"])
def test_equal_to_peft(target):
    """Our key 7 against peft's key 0: the logits agree only if our projections reach peft through the export."""
    assert_equal_to_peft(vera_options(target=target, projection_prng_key=7), peft.VeraConfig(r=8, target_modules=target))


def test_merge_exact():
    assert_merge_exact(vera_options(target="all-linear"))


def test_round_trips_with_peft(tmp_path):
    assert_round_trips(vera_options(target=QV), peft.VeraConfig(r=8, target_modules=QV), tmp_path)


@pytest.mark.filterwarnings("ignore:Specified to not save vera_A")
def test_import_of_an_adapter_saved_without_projections(tmp_path):
    """peft's save_projection=False: the projections come back from projection_prng_key, as in peft."""
    saved = get_peft_model(fresh_base(), peft.VeraConfig(r=8, target_modules=QV, projection_prng_key=3, save_projection=False))
    with torch.no_grad():
        for param in saved.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    saved.save_pretrained(tmp_path / "peft")
    ours = load_run(import_peft(tmp_path / "peft", tmp_path / "imported", model="tiny-random-llama")).model.eval()
    with torch.no_grad():
        assert_close(ours(input_ids=probe_ids()).logits, saved.eval()(input_ids=probe_ids()).logits, 1e-5, "imported")


def test_adapter_keeps_fp32_vectors_on_a_bf16_base():
    model, method = attach(vera_options(), fresh_base().to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in method.trainable_parameters(model).values())
    assert method.state_dict(model)["vera_A"].dtype == torch.float32
    with torch.no_grad():
        assert model(input_ids=probe_ids()).logits.dtype == torch.bfloat16


def vera_formula(model, r: int, target: list[str]) -> int:
    """Kopiczko et al.: r + d_out trainable numbers per adapted matrix."""
    config = model.config
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    d_out = {"q_proj": h, "k_proj": kv, "v_proj": kv, "o_proj": h}
    return layers * sum(r + d_out[name] for name in target)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    assert trainable_count({"name": "vera"}, model) == vera_formula(model, 256, QV)


def test_attach_on_meta_draws_the_projections_on_the_cpu():
    """On a weightless model the projections are still peft's (drawn on the CPU) and land on meta."""
    model, method = attach({"name": "vera"}, smollm2_skeleton())
    projections = method.projections(model)
    assert projections.vera_A.device.type == "meta" and projections.vera_A.shape == (256, 576)
    assert projections.vera_B.shape == (576, 256)  # q_proj's output is the largest


def test_projections_are_saved_and_must_fit():
    model, method = attach(vera_options())
    randomize(method, model)
    state = method.state_dict(model)
    other, other_method = attach(vera_options(projection_prng_key=5))
    other_method.load_state_dict(other, state, "test")
    with torch.no_grad():
        assert torch.equal(other(input_ids=probe_ids()).logits, model(input_ids=probe_ids()).logits)
    with pytest.raises(TunelabError, match="vera_A has shape"):
        other_method.load_state_dict(other, {**state, "vera_A": state["vera_A"][:, :10]}, "test")
    with pytest.raises(TunelabError, match="no VeRA projection vera_B"):
        other_method.load_state_dict(other, {k: v for k, v in state.items() if k != "vera_B"}, "test")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"), ({"target": ["nope"]}, "no linear layer matches")],
)
def test_bad_options_fail_clearly(options, message):
    with pytest.raises(TunelabError, match=message):
        attach(vera_options(**options))


def test_unsupported_peft_settings_fail_clearly():
    from tunelab.methods.vera import Vera

    config = peft.VeraConfig(r=8, target_modules=QV, bias="all").to_dict()
    with pytest.raises(TunelabError, match="bias='all'"):
        Vera.options_from_peft(config, "adapter_config.json")
