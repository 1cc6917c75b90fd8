"""The method registry from the outside: `tunelab methods`, `tunelab import`, and `method.from_peft`."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft import get_peft_model
from typer.testing import CliRunner

import tunelab
import tunelab.methods
from helpers import load_adapter, tiny_run_config, write_records_data, write_yaml
from peft_oracle import fresh_base, probe_ids
from tunelab.cli.main import app
from tunelab.methods import Method
from tunelab.methods.registry import METHODS, get_method_class, method_names
from tunelab.runs import load_run


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_registry_table_names_every_method_class():
    """Each entry is the class of that name, and every `Method` with a name in the package has an
    entry: a new method cannot be left out of the table."""
    defined = {}
    for module_info in pkgutil.iter_modules(tunelab.methods.__path__):
        module = importlib.import_module(f"tunelab.methods.{module_info.name}")
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, Method) and cls.__module__ == module.__name__ and "name" in vars(cls):
                defined[cls.name] = f"{module_info.name}:{cls.__name__}"
    assert defined == METHODS
    assert all(get_method_class(name).name == name for name in method_names())


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown method 'lorax'; choose one of: adalora, boft, "):
        get_method_class("lorax")


def test_configs_and_data_load_no_method_implementation():
    """Validating a config imports the chosen method's module only; importing the config and data
    packages (hence `tunelab` itself) imports none."""
    implementations = sorted({f"tunelab.methods.{entry.split(':')[0]}" for entry in METHODS.values()})
    program = (
        "import sys, tunelab.config, tunelab.data\n"
        f"implementations = {implementations!r}\n"
        "assert not [m for m in implementations if m in sys.modules], [m for m in implementations if m in sys.modules]\n"
        "tunelab.config.RunConfig.model_validate({'model': 'tiny-random-llama', 'data': {'train': 'x'}, 'method': {'name': 'lora'}})\n"
        "loaded = [m for m in implementations if m in sys.modules]\n"
        "assert loaded == ['tunelab.methods.lora'], loaded\n"
    )
    src = str(Path(tunelab.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def test_methods_lists_every_registered_method_with_its_share():
    result = invoke("methods", "--model", "tiny-random-llama", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.output)}
    assert set(rows) == set(method_names())
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
