"""Many LoRA adapters on one base in one batch (serve/adapters.py), against peft's mixed-adapter
batch (`adapter_names`) and against each request generated alone."""

from __future__ import annotations

import peft
import pytest
import torch

import tunelab
from helpers import tiny_run_config, write_records_data
from peft_oracle import assert_close, fresh_base
from tunelab.errors import TunelabError
from tunelab.export import export_run
from tunelab.generation import generate
from tunelab.models.tiny import tiny_tokenizer
from tunelab.runs import load_run
from tunelab.serve.adapters import AdapterSet, MultiLoraLinear, read_lora_adapter, rows_using

ADAPTERS = {
    "a": {"r": 4, "alpha": 8.0, "target": "all-linear"},
    "b": {"r": 2, "alpha": 4.0, "rslora": True, "target": ["q_proj", "v_proj", "down_proj"]},
}


@pytest.fixture(scope="module")
def runs(module_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    train_file, _ = write_records_data(folder, n_train=8)
    made = {}
    for seed, (name, method) in enumerate(ADAPTERS.items()):
        config = tiny_run_config(folder / name, train_file, method={"dropout": 0.0, **method}, train={"max_steps": 3, "lr": 3e-2, "seed": seed})
        made[name] = tunelab.train(config).output_dir
        export_run(made[name], "peft", folder / f"{name}-peft")
    return made


def served(runs, from_peft: bool = False):
    model = fresh_base().eval()
    adapters = AdapterSet(model)
    for name, run in runs.items():
        adapters.load(read_lora_adapter(name, run.parent / f"{name}-peft" if from_peft and name == "b" else run))
    return model, adapters


@torch.no_grad()
def test_a_mixed_adapter_batch_equals_peft_adapter_names(runs):
    model, adapters = served(runs, from_peft=True)
    reference = peft.PeftModel.from_pretrained(fresh_base(), runs["a"].parent / "a-peft", adapter_name="a")
    reference.load_adapter(runs["b"].parent / "b-peft", adapter_name="b")
    reference.eval()
    ids = torch.randint(3, 200, (5, 12), generator=torch.Generator().manual_seed(0))
    names = ["a", "b", None, "a", "b"]
    with rows_using(adapters.rows(names)):
        ours = model(input_ids=ids).logits
    theirs = reference(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits
    assert_close(ours, theirs, 1e-5, "mixed-adapter logits")
    assert (ours[0] - ours[2]).abs().max() > 1e-3 and (ours[1] - ours[2]).abs().max() > 1e-3  # adapters act
    plain = model(input_ids=ids).logits  # outside rows_using: the base alone
    assert_close(plain[2], ours[2], 1e-6, "base row")


def test_greedy_generation_in_a_mixed_batch_equals_each_request_alone(runs):
    model, adapters = served(runs)
    tokenizer = tiny_tokenizer()
    prompts = ["Name: Ana", "A longer prompt than the first", "Hi", "Name: Ana", "Order 7"]
    names = ["a", "b", None, "b", "a"]
    mixed = generate(model, tokenizer, prompts, max_new_tokens=8, batch_context=lambda rows: rows_using(adapters.rows([names[i] for i in rows])))
    alone_models = {name: load_run(run).model for name, run in runs.items()} | {None: fresh_base()}
    alone = [generate(alone_models[n], tokenizer, [p], max_new_tokens=8)[0] for p, n in zip(prompts, names)]
    assert mixed == alone
    assert len(set(mixed[:2] + mixed[2:3])) == 3  # the three models answer differently


def test_unload_and_bad_adapters_fail_naming_what(runs, tmp_path):
    model, adapters = served(runs)
    adapters.unload("a")
    with pytest.raises(TunelabError, match="unknown adapter.*a.*loaded: b"):
        adapters.rows(["a"])
    assert all(0 not in m.updates for m in model.modules() if isinstance(m, MultiLoraLinear))
    with pytest.raises(TunelabError, match="already loaded"):
        adapters.load(read_lora_adapter("b", runs["b"]))
    with pytest.raises(TunelabError, match="neither a tunelab run directory nor a peft adapter"):
        read_lora_adapter("x", tmp_path / "missing")


def test_methods_that_are_not_a_low_rank_update_are_refused_pointing_to_merging(module_cache, tmp_path):
    train_file, _ = write_records_data(tmp_path, n_train=8)
    run = tunelab.train(tiny_run_config(tmp_path / "dora", train_file, method={"dora": True}, train={"max_steps": 1})).output_dir
    with pytest.raises(TunelabError, match="DoRA .*merge it"):
        read_lora_adapter("d", run)
