"""AdaLoRA against peft (the reference): forward, gradients, orthogonal regularizer, the rank
allocator step by step, merge, peft files with and without pruning, counts, training and resume."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

import tunelab
from helpers import assert_tensors_equal, load_adapter, read_metrics, tiny_run_config, write_records_data
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
from tunelab.export import export_run, import_peft
from tunelab.methods.adalora import AdaLora, budget_schedule
from tunelab.runs import load_run

QV = ["q_proj", "v_proj"]
# peft's own: rank-0 layers save as empty tensors (it suspects unsharded FSDP), and its LoRA check
# of rank_pattern keys against module names misfires on AdaLoRA's keys (its own saves do the same).
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape"),
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning"),
]


def adalora_options(**extra) -> dict:
    return {"name": "adalora", "init_r": 6, "target_r": 2, "alpha": 16.0, **extra}


def peft_adalora(**extra) -> peft.AdaLoraConfig:
    # A task type, or peft's forward skips AdaLoraModel.forward, where its regularizer is added.
    settings = {"init_r": 6, "target_r": 2, "lora_alpha": 16, "total_step": 10, "task_type": "CAUSAL_LM", **extra}
    return peft.AdaLoraConfig(**settings)


def peft_key(name: str) -> str:
    """peft's parameter name for tunelab's `name` (its adapter is called `default`)."""
    return f"base_model.model.{name}.default"


def test_defaults_are_peft_defaults():
    opts = method_of({"name": "adalora"}).options
    reference = peft.AdaLoraConfig(total_step=1)
    assert (opts.init_r, opts.target_r, opts.alpha, opts.dropout) == (reference.init_r, reference.target_r, reference.lora_alpha, reference.lora_dropout)
    assert (opts.tinit, opts.tfinal, opts.delta_t, opts.beta1, opts.beta2, opts.orth_reg_weight) == (
        reference.tinit,
        reference.tfinal,
        reference.deltaT,
        reference.beta1,
        reference.beta2,
        reference.orth_reg_weight,
    )
    assert opts.target == QV and opts.total_step is None  # peft's Llama default; the run's length


@pytest.mark.parametrize("target", [QV, "all-linear"])
def test_equal_to_peft(target):
    """Logits and gradients of the data loss (peft's regularizer off: tunelab adds its own per step)."""
    assert_equal_to_peft(adalora_options(target=target), peft_adalora(target_modules=target, orth_reg_weight=0.0))


def test_orthogonal_regularizer_equals_peft():
    """peft adds orth_reg_weight · mean ‖AAᵀ−I‖, ‖BᵀB−I‖ to the loss: data loss + our term, and gradients, agree."""
    model, method = attach(adalora_options(orth_reg_weight=0.3))
    randomize(method, model, scale=0.3)
    peft_model = get_peft_model(fresh_base(), peft_adalora(orth_reg_weight=0.3))
    copy_into_peft(method, model, peft_model)
    ours = model(input_ids=probe_ids(), labels=probe_ids()).loss + method.regularization(model)
    theirs = peft_model(input_ids=probe_ids(), labels=probe_ids()).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    ours.backward(), theirs.backward()
    peft_params = dict(peft_model.named_parameters())
    for name, param in method.trainable_parameters(model).items():
        assert_close(param.grad, peft_params[peft_key(name)].grad, 1e-5, f"gradient of {name}")
    assert method_of(adalora_options(orth_reg_weight=0.0)).regularization(model) is None


@pytest.mark.parametrize(("tinit", "tfinal", "delta_t"), [(0, 0, 1), (2, 3, 2), (1, 1, 3)])
def test_budget_schedule_equals_peft(tinit, tfinal, delta_t):
    total, layers = 20, 4
    peft_model = get_peft_model(fresh_base(), peft_adalora(tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total))
    allocator = peft_model.base_model.rankallocator
    assert (allocator.init_bgt, allocator.target_bgt) == (6 * layers, 2 * layers)
    for step in range(total + 2):
        assert budget_schedule(step, 6 * layers, 2 * layers, tinit, tfinal, total, delta_t) == allocator.budget_schedule(step), step


def test_allocator_equals_peft_step_by_step():
    """The same tensors and the same gradients each step: peft's update_and_allocate(step − 1) and our
    after_step(step) leave the same singular values (masks), patterns and importance averages,
    through every phase (warmup, falling budget every delta_t steps, final re-masking)."""
    total = 9
    options = adalora_options(target="all-linear", tinit=1, tfinal=3, delta_t=2, total_step=total, beta1=0.8, beta2=0.7)
    model, method = attach(options)
    randomize(method, model, scale=0.5)
    peft_model = get_peft_model(fresh_base(), peft_adalora(target_modules="all-linear", tinit=1, tfinal=3, deltaT=2, total_step=total, beta1=0.8, beta2=0.7))
    copy_into_peft(method, model, peft_model)
    ours = method.trainable_parameters(model)
    theirs = {name: dict(peft_model.named_parameters())[peft_key(name)] for name in ours}
    generator = torch.Generator().manual_seed(0)
    masked_phases = set()
    for step in range(1, total + 3):  # past total_step: the final pattern keeps being applied
        with torch.no_grad():
            for name, param in ours.items():
                # An "optimizer step" that revives pruned singular values, then fresh gradients.
                move, grad = torch.randn(param.shape, generator=generator) * 0.05, torch.randn(param.shape, generator=generator)
                for p in (param, theirs[name]):
                    p.add_(move)
                    p.grad = grad.clone()
        peft_model.base_model.update_and_allocate(step - 1)
        method.after_step(model, step, total_steps=1000)  # method.total_step wins over the run's length
        for name, param in ours.items():
            assert torch.equal(param, theirs[name]), f"step {step}: {name}"
        pattern = peft_model.peft_config["default"].rank_pattern
        for name, layer in method.adapter_layers(model).items():
            if pattern is None:
                assert layer.rank_mask.all()
            else:
                key = next(k for k in pattern if k.startswith(f"{name}.lora_E"))
                assert layer.rank_mask.tolist() == pattern[key], f"step {step}: {name}"
                masked_phases.add(step)
        allocator = peft_model.base_model.rankallocator
        assert sorted(method.sensitivity) == sorted(n.removeprefix("base_model.model.").removesuffix(".default") for n in allocator.exp_avg_ipt)
        for name, average in method.sensitivity.items():
            assert torch.equal(average, allocator.exp_avg_ipt[peft_key(name).removeprefix("base_model.model.")])
            assert torch.equal(method.uncertainty[name], allocator.exp_avg_unc[peft_key(name).removeprefix("base_model.model.")])
    kept = sum(int(layer.rank_mask.sum()) for layer in method.adapter_layers(model).values())
    assert kept <= 2 * len(method.adapter_layers(model)) and masked_phases


def test_merge_exact():
    assert_merge_exact(adalora_options(target="all-linear"))


def test_round_trips_with_peft(tmp_path):
    """A trained run (2 steps: the second allocates) exports as peft saves it and reloads in peft."""
    assert_round_trips(adalora_options(target=QV), peft_adalora(target_modules=QV), tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path / "exported")
    assert config.rank_pattern is not None
    saved = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    for key, keep in config.rank_pattern.items():
        layer = f"base_model.model.{key.removesuffix('.lora_E')}"
        assert saved[f"{layer}.lora_E"].shape == (sum(keep), 1) and saved[f"{layer}.lora_B"].shape[1] == sum(keep)


def test_import_of_a_pruned_peft_adapter(tmp_path):
    """peft trains, allocates and saves only the kept triplets (one layer down to rank 0): tunelab
    imports it with peft's logits, and exports it back to what peft reloads with the same logits."""
    peft_model = get_peft_model(fresh_base(), peft_adalora(target_modules=QV, total_step=5, tfinal=1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    for step in range(5):
        peft_model(input_ids=probe_ids(), labels=probe_ids()).loss.backward()
        peft_model.base_model.update_and_allocate(step)
        peft_model.zero_grad()
    # One layer pruned to rank 0 (peft saves it as empty tensors), through peft's own masking.
    pattern = peft_model.peft_config["default"].rank_pattern
    pattern["model.layers.1.self_attn.q_proj.lora_E.default"] = [False] * 6
    peft_model.base_model.rankallocator.mask_using_rank_pattern(peft_model.base_model.model, pattern)
    peft_model.save_pretrained(tmp_path / "peft")
    assert min(sum(keep) for keep in peft.PeftConfig.from_pretrained(tmp_path / "peft").rank_pattern.values()) == 0
    run = import_peft(tmp_path / "peft", tmp_path / "imported", model="tiny-random-llama")
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=probe_ids()).logits
        assert_close(load_run(run).model.eval()(input_ids=probe_ids()).logits, expected, 1e-5, "imported")
        export_run(run, "peft", tmp_path / "exported")
        reloaded = peft.PeftModel.from_pretrained(fresh_base(), tmp_path / "exported").eval()
        assert_close(reloaded(input_ids=probe_ids()).logits, expected, 1e-5, "re-exported")


def test_adapter_keeps_fp32_tensors_on_a_bf16_base():
    model, method = attach(adalora_options(), fresh_base().to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in method.trainable_parameters(model).values())
    with torch.no_grad():
        assert model(input_ids=probe_ids()).logits.dtype == torch.bfloat16


def adalora_formula(model, r: int, target: list[str]) -> int:
    """Zhang et al.: r·(d_in + d_out + 1) per adapted matrix (P, Q and the r singular values)."""
    config = model.config
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    d_out = {"q_proj": h, "k_proj": kv, "v_proj": kv, "o_proj": h}
    return layers * sum(r * (h + d_out[name] + 1) for name in target)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m"])
def test_trainable_count_matches_formula(shape):
    model = fresh_base() if shape == "tiny" else smollm2_skeleton()
    assert trainable_count({"name": "adalora"}, model) == adalora_formula(model, 12, QV)


def test_trainable_count_equals_peft():
    """On real tensors: on the meta device peft leaves its `ranknum` scalars trainable (one per layer)."""
    peft_model = get_peft_model(fresh_base(), peft.AdaLoraConfig(total_step=1))
    assert trainable_count({"name": "adalora"}) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_training_prunes_to_the_target_budget(tmp_path):
    run = train_tiny_run(tmp_path, adalora_options(target=QV, tinit=1, tfinal=1), steps=6)
    assert all(math.isfinite(m["loss"]) for m in read_metrics(run))
    loaded = load_run(run)
    layers = loaded.method.adapter_layers(loaded.model)
    kept = sum(int(layer.rank_mask.sum()) for layer in layers.values())
    nonzero = sum(int((layer.lora_E != 0).sum()) for layer in layers.values())
    assert nonzero <= kept <= 2 * len(layers) < 6 * len(layers)


def test_resume_is_exact_with_the_importance_averages(tmp_path):
    train_file = write_records_data(tmp_path / "data", n_train=8)[0]
    options = adalora_options(target=QV, tfinal=1)
    config = tiny_run_config(tmp_path / "run", train_file, method=options, train={"max_steps": 4, "save_every": 2, "lr": 1e-2})
    tunelab.train(config)
    finished = load_adapter(config["output"])
    checkpoint = load_file(tmp_path / "run" / "checkpoints" / "step-2" / "trainable.safetensors")
    assert any(k.startswith("adalora_sensitivity.") for k in checkpoint) and any(k.startswith("adalora_uncertainty.") for k in checkpoint)
    assert tunelab.train(config, resume=True).report["resumed_from_step"] == 2
    assert_tensors_equal(load_adapter(config["output"]), finished)


def test_a_schedule_without_room_fails_clearly(tmp_path):
    with pytest.raises(TunelabError, match="no step for the budget to fall"):
        method_of(adalora_options(tinit=3, tfinal=2, total_step=5))
    with pytest.raises(TunelabError, match="exceeds init_r"):
        method_of(adalora_options(target_r=7))
    # Without total_step, the run's length decides, at the first step.
    with pytest.raises(TunelabError, match="the run's total steps=2"):
        train_tiny_run(tmp_path, adalora_options(tinit=2), steps=2)


def test_bad_checkpoint_and_peft_inputs_fail_clearly():
    model, method = attach(adalora_options())
    state = method.checkpoint_state(model)
    with pytest.raises(TunelabError, match="importance average"):
        method.load_checkpoint_state(model, {**state, "adalora_sensitivity.nope": torch.zeros(1)}, "ckpt")
    name = next(iter(method.adapter_layers(model)))
    with pytest.raises(TunelabError, match="7 singular values for init_r=6"):
        tensors = method.peft_export(model)[1]
        method.peft_import(model, {**tensors, f"base_model.model.{name}.lora_E": torch.zeros(7, 1)}, "adapter")
    config = peft_adalora(lora_alpha=0).to_dict()
    with pytest.raises(TunelabError, match="lora_alpha=0"):
        AdaLora.options_from_peft({**config, "target_modules": QV}, "adapter_config.json")


def test_peft_export_before_any_allocation_has_no_rank_pattern():
    model, method = attach(adalora_options())
    config, tensors = method.peft_export(model)
    assert config["rank_pattern"] is None and not any(k.endswith("rank_mask") for k in tensors)
    peft_model = get_peft_model(fresh_base(), peft_adalora())
    assert not set_peft_model_state_dict(peft_model, tensors).unexpected_keys
