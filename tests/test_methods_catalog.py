"""The method registry from the outside: `tunelab methods`, `tunelab import`, and `method.from_peft`."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import get_peft_model
from typer.testing import CliRunner

import tunelab
from helpers import load_adapter, tiny_run_config, write_records_data, write_yaml
from peft_oracle import fresh_base, probe_ids
from tunelab.cli.main import app
from tunelab.methods import REGISTRY
from tunelab.train.artifacts import load_run


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_methods_lists_every_registered_method_with_its_share():
    result = invoke("methods", "--model", "tiny-random-llama", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.output)}
    assert set(rows) == set(REGISTRY)
    base = sum(p.numel() for p in fresh_base().parameters())
    assert rows["full"]["trainable_params"] == base and rows["full"]["percent"] == 100.0
    for row in rows.values():
        assert row["total_params"] == base and 0 < row["trainable_params"] <= base
        assert row["percent"] == pytest.approx(100 * row["trainable_params"] / base)


def test_methods_target_option_reaches_linear_methods():
    every = {r["method"]: r for r in json.loads(invoke("methods", "--model", "tiny-random-llama", "--json", "--target", "all-linear").output)}
    qv = {r["method"]: r for r in json.loads(invoke("methods", "--model", "tiny-random-llama", "--json", "--target", "q_proj,v_proj").output)}
    assert qv["lora"]["trainable_params"] < every["lora"]["trainable_params"]
    assert qv["prompt_tuning"] == every["prompt_tuning"]  # no linear target: unchanged


def test_methods_table_prints():
    result = invoke("methods", "--model", "tiny-random-llama")
    assert result.exit_code == 0 and "prefix_tuning" in result.output and "% of model" in result.output


@pytest.fixture
def peft_adapter(tmp_path):
    saved = get_peft_model(fresh_base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in saved.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.1)
    saved.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", saved.eval()


def test_import_command_makes_a_run_directory(peft_adapter, tmp_path):
    directory, saved = peft_adapter
    result = invoke("import", directory, "--output", tmp_path / "run", "--model", "tiny-random-llama")
    assert result.exit_code == 0, result.output
    model = load_run(tmp_path / "run").model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=probe_ids()).logits, saved(input_ids=probe_ids()).logits, atol=1e-5)
    # The run no longer depends on the peft directory.
    assert "from_peft: null" in (tmp_path / "run" / "config.yaml").read_text()


def test_import_refuses_what_it_cannot_read(tmp_path):
    result = invoke("import", tmp_path, "--output", tmp_path / "run", "--model", "tiny-random-llama")
    assert result.exit_code == 1 and "no adapter_config.json" in result.output and "Traceback" not in result.output
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "layers_to_transform": [0]}))
    result = invoke("import", tmp_path, "--output", tmp_path / "run", "--model", "tiny-random-llama")
    assert result.exit_code == 1 and "layers_to_transform" in result.output


def test_from_peft_starts_training_from_the_adapter(peft_adapter, tmp_path):
    directory, saved = peft_adapter
    train_file = write_records_data(tmp_path / "data", n_train=8)[0]
    config = tiny_run_config(tmp_path / "run", train_file, method={"name": "lora", "from_peft": str(directory)}, train={"max_steps": 1, "lr": 1e-12})
    del config["method"]["r"], config["method"]["alpha"], config["method"]["dropout"]
    run = tunelab.train(config).output_dir
    adapter = load_adapter(run)
    expected = peft.utils.get_peft_model_state_dict(saved)
    assert set(adapter) == {k.removeprefix("base_model.model.") for k in expected}
    for key, tensor in expected.items():
        assert torch.allclose(adapter[key.removeprefix("base_model.model.")], tensor, atol=1e-6)


def test_from_peft_conflicting_options_fail_at_the_key(peft_adapter, tmp_path):
    directory, _ = peft_adapter
    path = write_yaml(tmp_path / "c.yaml", {"model": "tiny-random-llama", "data": {"train": "x"}, "method": {"name": "lora", "r": 8, "from_peft": str(directory)}})
    with pytest.raises(tunelab.TunelabError, match=r"c.yaml:\d+: `method`: r=8 differ from the peft adapter \(r=4\)"):
        tunelab.load_config(path)
