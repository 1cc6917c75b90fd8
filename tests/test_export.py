"""`export_run`: a run as a peft adapter (read by peft itself) or as merged weights (read by transformers).

Runs are on the in-process `tiny-random-llama`, trained a couple of steps at a high learning rate so
the adapters are far from their zero init and an export that dropped them would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from helpers import load_adapter, tiny_run_config, write_records_data
from tunelab.errors import TunelabError
from tunelab.export import export_run
from tunelab.models.tiny import tiny_llama, tiny_tokenizer
from tunelab.runs import load_run

PROBE_TEXT = "On March 3, 2021, Maria Lopez (34) from Lisbon paid $1,299.00."
LAYER0_Q = "model.layers.0.self_attn.q_proj"


@torch.no_grad()
def logits_of(model, text: str = PROBE_TEXT) -> torch.Tensor:
    model.eval()
    input_ids = tiny_tokenizer()(text, return_tensors="pt").input_ids
    return model(input_ids=input_ids).logits


def fresh_base():
    """The base model as peft users would have it: built from scratch, untouched by tunelab."""
    return tiny_llama(len(tiny_tokenizer()))


@pytest.fixture(scope="module")
def train_file(module_cache, tmp_path_factory) -> Path:
    return write_records_data(tmp_path_factory.mktemp("records"), n_train=8)[0]


@pytest.fixture(scope="module")
def make_run(module_cache, tmp_path_factory, train_file):
    def make(name: str, method: dict) -> Path:
        output = tmp_path_factory.mktemp(name) / "run"
        config = tiny_run_config(output, train_file, method=method, train={"max_steps": 2, "lr": 1e-2})
        return tunelab.train(config).output_dir

    return make


@pytest.fixture(scope="module")
def lora_run(make_run) -> Path:
    return make_run("lora", {"name": "lora"})


@pytest.fixture(scope="module")
def qv_run(make_run) -> Path:
    return make_run("lora-qv", {"name": "lora", "target": ["q_proj", "v_proj"]})


@pytest.fixture(scope="module")
def layer0_q_run(make_run) -> Path:
    return make_run("lora-layer0-q", {"name": "lora", "target": [r"model\.layers\.0\..*q_proj"]})


@pytest.fixture(scope="module")
def full_run(make_run) -> Path:
    return make_run("full", {"name": "full"})


def lora_layer_names(model) -> list[str]:
    return sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))


def assert_peft_round_trip(run_dir: Path, out: Path) -> peft.PeftModel:
    """Export as peft, load with peft on a fresh base: the logits equal tunelab's model's."""
    export_run(run_dir, "peft", out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = peft.PeftModel.from_pretrained(fresh_base(), out)
    tunelab_logits = logits_of(load_run(run_dir).model)
    assert torch.allclose(logits_of(peft_model), tunelab_logits, rtol=0, atol=1e-5)
    # Not vacuous: the adapter moves the logits well beyond the tolerance.
    assert (tunelab_logits - logits_of(fresh_base())).abs().max() > 1e-3
    return peft_model


def test_trained_lora_b_is_nonzero(lora_run):
    adapter = load_adapter(lora_run)
    b_weights = {name: t for name, t in adapter.items() if ".lora_B." in name}
    assert b_weights and all(t.abs().max() > 0 for t in b_weights.values())


def test_peft_export_round_trip_all_linear(lora_run, tmp_path):
    peft_model = assert_peft_round_trip(lora_run, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    # all-linear: every projection of every layer, never the output head.
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(lora_layer_names(peft_model)) == 2 * 7
    assert not any("lm_head" in name for name in lora_layer_names(peft_model))


def test_merged_export_matches_the_adapter_model(lora_run, tmp_path):
    adapter_logits = logits_of(load_run(lora_run).model)
    export_run(lora_run, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert torch.allclose(logits_of(merged), adapter_logits, rtol=0, atol=1e-4)
    # A plain checkpoint: exactly the base model's parameter names, no adapter left.
    assert sorted(merged.state_dict()) == sorted(fresh_base().state_dict())
    # And the tokenizer rides along, encoding text as the run's tokenizer does.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer(PROBE_TEXT).input_ids == tiny_tokenizer()(PROBE_TEXT).input_ids
    assert tokenizer.eos_token == tiny_tokenizer().eos_token


def test_export_of_named_targets(qv_run, tmp_path):
    peft_model = assert_peft_round_trip(qv_run, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert [name.rsplit(".", 1)[-1] for name in lora_layer_names(peft_model)] == ["q_proj", "v_proj"] * 2

    adapter_logits = logits_of(load_run(qv_run).model)
    export_run(qv_run, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert torch.allclose(logits_of(merged), adapter_logits, rtol=0, atol=1e-4)


def test_export_of_a_regex_target_uses_full_names(layer0_q_run, tmp_path):
    """A target selecting one layer's q_proj only cannot be written as `q_proj` (that would adapt
    every layer's): the peft config names the module in full."""
    peft_model = assert_peft_round_trip(layer0_q_run, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == [LAYER0_Q]
    assert [name.removeprefix("base_model.model.") for name in lora_layer_names(peft_model)] == [LAYER0_Q]


def test_full_run_exports_merged(full_run, tmp_path):
    trained_logits = logits_of(load_run(full_run).model)
    assert (trained_logits - logits_of(fresh_base())).abs().max() > 1e-3
    export_run(full_run, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert torch.allclose(logits_of(merged), trained_logits, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")(PROBE_TEXT).input_ids == tiny_tokenizer()(PROBE_TEXT).input_ids


def test_full_run_has_no_peft_export_and_writes_nothing(full_run, tmp_path):
    with pytest.raises(TunelabError, match="peft"):
        export_run(full_run, "peft", tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging dir is left


def test_export_into_a_non_empty_dir_fails_and_writes_nothing(lora_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TunelabError, match="not empty"):
        export_run(lora_run, "peft", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_export_into_an_empty_existing_dir_works(lora_run, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert export_run(lora_run, "peft", out) == out
    assert (out / "adapter_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_export_unknown_format_fails(lora_run, tmp_path):
    with pytest.raises(TunelabError, match="gguf"):
        export_run(lora_run, "gguf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_non_run_fails(tmp_path):
    with pytest.raises(TunelabError, match="not a run directory"):
        export_run(tmp_path / "nothing-here", "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()
