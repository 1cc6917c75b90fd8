"""Bad paths for every command: relative paths in a config read from another working directory,
model, adapter and run directories whose weights are missing or damaged, output paths that are
files, and enum-like options given an unknown value. Each ends in exit status 1 and one error line
naming the path (as resolved) or the option, with nothing written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import uvicorn
from safetensors.torch import load_file

from helpers import TINY_MODEL, assert_clean_failure, invoke, tiny_run_config, tree_state, write_yaml
from tunelab.export import export_run
from tunelab.models.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def peft_adapter(module_cache, tmp_path_factory, tiny_run) -> Path:
    return export_run(tiny_run, "peft", tmp_path_factory.mktemp("paths-peft") / "adapter")


@pytest.fixture(scope="module")
def model_dir(module_cache, tmp_path_factory) -> Path:
    """The tiny model as a Hugging Face model directory (safetensors weights)."""
    directory = tmp_path_factory.mktemp("paths-model") / "tiny"
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """`tunelab serve` must fail before it serves: a server would block the test."""
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("tunelab serve started a server"))


def damaged_copy(source: Path, relative: str, damage: str, folder: Path) -> Path:
    """A copy of the directory `source` in `folder`, its file `relative` removed, cut to half its
    bytes, or overwritten with random bytes."""
    copy = shutil.copytree(source, folder / f"{source.name}-{damage}")
    target = copy / relative
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.write_bytes(os.urandom(max(64, target.stat().st_size)))
    return copy


DAMAGES = ["missing", "truncated", "garbage"]


# ---- A run directory with missing or damaged weights

RUN_COMMANDS = {
    "eval": lambda run, tmp: ["eval", run, "--no-base", "--max-samples", "1", "--max-new-tokens", "2"],
    "generate": lambda run, tmp: ["generate", run, "hi", "--max-new-tokens", "2"],
    "export": lambda run, tmp: ["export", run, "--format", "peft", "--out", tmp / "exported"],
    "serve": lambda run, tmp: ["serve", f"x={run}", "--model", TINY_MODEL],
}
RUN_WEIGHTS = "adapter/adapter.safetensors"


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("command", list(RUN_COMMANDS))
def test_a_run_with_damaged_weights(command, damage, tiny_run, tmp_path, record_property):
    record_property("reliability", "paths")
    run = damaged_copy(tiny_run, RUN_WEIGHTS, damage, tmp_path)
    before = tree_state(tmp_path)
    assert_clean_failure(invoke(*RUN_COMMANDS[command](run, tmp_path)), str(run), RUN_WEIGHTS)
    assert tree_state(tmp_path) == before


@pytest.fixture(scope="module")
def intact_results(module_cache, tiny_run, tmp_path_factory) -> dict:
    """What generate and export print or write for the intact run."""
    exported = tmp_path_factory.mktemp("intact") / "exported"
    return {"generate": invoke(*RUN_COMMANDS["generate"](tiny_run, None)).stdout, "export": export_run(tiny_run, "peft", exported)}


@pytest.mark.parametrize("damage", ["missing", "garbage"])
@pytest.mark.parametrize("command", list(RUN_COMMANDS))
def test_a_runs_method_json_is_a_record_only(command, damage, tiny_run, intact_results, tmp_path, monkeypatch, record_property):
    """adapter/method.json records the method for people and other tools; every command reads the
    run's config.yaml instead, so a damaged method.json changes nothing."""
    record_property("reliability", "paths")
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)  # the engine is built: enough
    run = damaged_copy(tiny_run, "adapter/method.json", damage, tmp_path)
    result = invoke(*RUN_COMMANDS[command](run, tmp_path))
    assert result.exit_code == 0, result.output
    if command == "generate":
        assert result.stdout == intact_results["generate"]
    if command == "export":
        exported = load_file(tmp_path / "exported" / "adapter_model.safetensors")
        expected = load_file(intact_results["export"] / "adapter_model.safetensors")
        assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)


# ---- A peft adapter directory with missing or damaged weights

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def from_peft_config(folder: Path, adapter: Path | str, train_file: Path) -> Path:
    config = tiny_run_config(folder / "run", train_file, method={"name": "lora", "from_peft": str(adapter)}, train={"max_steps": 1})
    for key in ("r", "alpha", "dropout"):  # they come from the adapter
        del config["method"][key]
    return write_yaml(folder / "from-peft.yaml", config)


ADAPTER_COMMANDS = {
    "import": lambda adapter, tmp, records: ["import", adapter, "--output", tmp / "imported"],
    "eval --task": lambda adapter, tmp, records: ["eval", adapter, "--task", "quickstart", "--max-samples", "1", "--out", tmp / "eval"],
    "serve": lambda adapter, tmp, records: ["serve", f"x={adapter}", "--model", TINY_MODEL],
    "train method.from_peft": lambda adapter, tmp, records: ["train", from_peft_config(tmp, adapter, records[0])],
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("command", ADAPTER_COMMANDS)
def test_a_peft_adapter_with_damaged_weights(command, damage, peft_adapter, records, tmp_path, record_property):
    record_property("reliability", "paths")
    adapter = damaged_copy(peft_adapter, ADAPTER_WEIGHTS, damage, tmp_path)
    argv = ADAPTER_COMMANDS[command](adapter, tmp_path, records)
    before = tree_state(tmp_path)
    assert_clean_failure(invoke(*argv), str(adapter), ADAPTER_WEIGHTS)
    assert tree_state(tmp_path) == before


# ---- Relative paths in a config, read from another working directory


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """The working directory of the command: not the folder of the config."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def assert_refused_as_resolved(argv: list, relative: str, cwd: Path, tmp_path: Path, *more: str) -> None:
    before = tree_state(tmp_path)
    assert_clean_failure(invoke(*argv), str(cwd / relative), f"working directory {cwd}", *more)
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("relative", ["models/tiny", "./models/tiny", "models/local/tiny"])
def test_a_relative_model_dir_from_another_working_directory(relative, model_dir, records, tmp_path, elsewhere, monkeypatch, record_property):
    """`models/tiny` could be a hub id, so it is tried as one (offline here) after the local directory."""
    record_property("reliability", "paths")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    shutil.copytree(model_dir, tmp_path / relative)  # beside the config, where it is not looked for
    config = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", records[0], model={"name": relative}))
    assert_refused_as_resolved(["train", config], relative, elsewhere, tmp_path, "model")


def test_a_relative_peft_adapter_from_another_working_directory(peft_adapter, records, tmp_path, elsewhere, record_property):
    record_property("reliability", "paths")
    shutil.copytree(peft_adapter, tmp_path / "adapters" / "mine")
    config = from_peft_config(tmp_path, "adapters/mine", records[0])
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if "from_peft:" in text)
    assert_refused_as_resolved(["train", config], "adapters/mine", elsewhere, tmp_path, f"{config}:{line}: `method.from_peft`")


def test_a_relative_data_file_from_another_working_directory(records, tmp_path, elsewhere, record_property):
    record_property("reliability", "paths")
    shutil.copytree(records[0].parent, tmp_path / "data")
    config = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", "data/train.jsonl"))
    assert_refused_as_resolved(["train", config], "data/train.jsonl", elsewhere, tmp_path)


# ---- A model directory with only pickle weights


@pytest.fixture(scope="module")
def pickle_model(model_dir, tmp_path_factory) -> Path:
    """The tiny model's directory with its weights as pytorch_model.bin (a pickle) instead."""
    directory = shutil.copytree(model_dir, tmp_path_factory.mktemp("pickle") / "tiny")
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    return directory


PICKLE_COMMANDS = {
    "train": lambda model, tmp, records: ["train", write_yaml(tmp / "run.yaml", tiny_run_config(tmp / "run", records[0], model={"name": str(model)}))],
    "eval --task": lambda model, tmp, records: ["eval", model, "--task", "quickstart", "--max-samples", "1", "--out", tmp / "eval"],
    "export --format gguf": lambda model, tmp, records: ["export", model, "--format", "gguf", "--out", tmp / "model.gguf"],
    "serve": lambda model, tmp, records: ["serve", "--model", model],
}


@pytest.mark.parametrize("command", list(PICKLE_COMMANDS))
def test_a_model_with_only_pickle_weights_is_refused(command, pickle_model, records, tmp_path, record_property):
    record_property("reliability", "paths")
    argv = PICKLE_COMMANDS[command](pickle_model, tmp_path, records)
    before = tree_state(tmp_path)
    assert_clean_failure(invoke(*argv), str(pickle_model), "safetensors")
    assert tree_state(tmp_path) == before


# ---- Output paths


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "taken"
    path.write_text("not yours\n")
    return path


@pytest.mark.parametrize("export_format, name", [("peft", "taken"), ("merged", "taken"), ("gguf", "taken.gguf"), ("gguf-adapter", "taken.gguf")])
def test_export_out_is_an_existing_file(export_format, name, tiny_run, tmp_path, record_property):
    record_property("reliability", "paths")
    out = tmp_path / name
    out.write_text("not yours\n")
    before, run_before = tree_state(tmp_path), tree_state(tiny_run)
    assert_clean_failure(invoke("export", tiny_run, "--format", export_format, "--out", out), f"--out {out}")
    assert tree_state(tmp_path) == before and tree_state(tiny_run) == run_before


def test_export_out_below_a_file(tiny_run, tmp_path, a_file, record_property):
    record_property("reliability", "paths")
    before = tree_state(tmp_path)
    assert_clean_failure(invoke("export", tiny_run, "--format", "peft", "--out", a_file / "sub" / "adapter"), str(a_file), "is a file")
    assert tree_state(tmp_path) == before


def test_export_out_in_missing_folders_makes_them(tiny_run, tmp_path, record_property):
    """Not a bad input: the folders are made, once the export is written."""
    record_property("reliability", "paths")
    out = tmp_path / "exports" / "v1" / "adapter"
    result = invoke("export", tiny_run, "--format", "peft", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in (tmp_path / "exports" / "v1").iterdir()] == ["adapter"]  # no staging left


def test_export_into_missing_folders_that_fails_makes_none(tiny_run, tmp_path, record_property):
    record_property("reliability", "paths")
    run = damaged_copy(tiny_run, RUN_WEIGHTS, "garbage", tmp_path)
    before = tree_state(tmp_path)
    assert_clean_failure(invoke("export", run, "--format", "peft", "--out", tmp_path / "exports" / "v1" / "adapter"), RUN_WEIGHTS)
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("output", ["taken", "taken/run"])
def test_import_output_is_or_is_below_a_file(output, peft_adapter, tmp_path, a_file, record_property):
    record_property("reliability", "paths")
    before = tree_state(tmp_path)
    assert_clean_failure(invoke("import", peft_adapter, "--output", tmp_path / output), str(a_file))
    assert tree_state(tmp_path) == before


def test_quickstart_out_is_a_file(tmp_path, a_file, record_property):
    record_property("reliability", "paths")
    before = tree_state(tmp_path)
    assert_clean_failure(invoke("quickstart", "--model", TINY_MODEL, "--out", a_file), f"--out {a_file}", "is a file")
    assert tree_state(tmp_path) == before


# ---- Enum-like (and other checked) options with a bad value


@pytest.fixture
def sweep_file(tmp_path, records) -> Path:
    base = {k: v for k, v in tiny_run_config(tmp_path / "unused", records[0]).items() if k != "output"}
    task = {"type": "exact_match", "data": str(records[1])}
    return write_yaml(tmp_path / "sweep.yaml", {"base": base, "task": task, "output": str(tmp_path / "sweep"), "grid": [{"method": {"name": "lora"}}]})


OPTION_CASES = {
    "export --format": (lambda run, sweep: ["export", run, "--format", "onnx", "--out", "out"], ["--format", "onnx"]),
    "export --gguf-type": (lambda run, sweep: ["export", run, "--format", "gguf", "--out", "m.gguf", "--gguf-type", "q2_k"], ["--gguf-type", "q2_k"]),
    "compare --backend": (lambda run, sweep: ["compare", sweep, "--backend", "slurm"], ["--backend slurm"]),
    "compare --workers": (lambda run, sweep: ["compare", sweep, "--backend", "process", "--workers", "0"], ["--workers 0"]),
    "quickstart --objective": (lambda run, sweep: ["quickstart", "--model", TINY_MODEL, "--objective", "ppo"], ["--objective ppo"]),
    "quickstart --quantize": (lambda run, sweep: ["quickstart", "--model", TINY_MODEL, "--quantize", "int4"], ["--quantize int4"]),
    "quickstart --quantize with dpo": (lambda run, sweep: ["quickstart", "--model", TINY_MODEL, "--objective", "dpo", "--quantize", "nf4"], ["--quantize", "dpo"]),
    "quickstart --steps": (lambda run, sweep: ["quickstart", "--model", TINY_MODEL, "--steps", "0"], ["--steps 0"]),
    "bench --frozen-dtype": (lambda run, sweep: ["bench", "--model", TINY_MODEL, "--frozen-dtype", "float8"], ["--frozen-dtype float8"]),
    "bench --objective": (lambda run, sweep: ["bench", "--model", TINY_MODEL, "--objective", "ppo"], ["--objective", "ppo"]),
    "bench --quantize": (lambda run, sweep: ["bench", "--model", TINY_MODEL, "--quantize", "int4"], ["--quantize", "int4"]),
    "bench --method": (lambda run, sweep: ["bench", "--model", TINY_MODEL, "--method", "ia3"], ["--method", "ia3"]),
    "serve --dtype": (lambda run, sweep: ["serve", "--model", TINY_MODEL, "--dtype", "float64"], ["--dtype float64"]),
    "serve adapter spec": (lambda run, sweep: ["serve", "no-equals-sign", "--model", TINY_MODEL], ["no-equals-sign", "NAME="]),
    "methods --target": (lambda run, sweep: ["methods", "--model", TINY_MODEL, "--target", "nope_proj"], ["nope_proj", "q_proj"]),
    "eval --task": (lambda run, sweep: ["eval", run, "--task", "no-such-task"], ["--task no-such-task"]),
    "generate --max-new-tokens": (lambda run, sweep: ["generate", run, "hi", "--max-new-tokens", "0"], ["--max-new-tokens 0"]),
    "generate --temperature": (lambda run, sweep: ["generate", run, "hi", "--temperature", "-1"], ["--temperature -1"]),
    "generate --top-p": (lambda run, sweep: ["generate", run, "hi", "--temperature", "1", "--top-p", "2"], ["--top-p 2"]),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_a_bad_option_value(case, tiny_run, sweep_file, tmp_path, monkeypatch, record_property):
    record_property("reliability", "paths")
    monkeypatch.chdir(tmp_path)  # where default outputs (runs/...) would go
    argv, expected = OPTION_CASES[case]
    before, run_before = tree_state(tmp_path), tree_state(tiny_run)
    assert_clean_failure(invoke(*argv(tiny_run, sweep_file)), *expected)
    assert tree_state(tmp_path) == before and tree_state(tiny_run) == run_before


def test_a_target_list_with_one_unknown_layer(tmp_path, record_property):
    record_property("reliability", "paths")
    assert_clean_failure(invoke("methods", "--model", TINY_MODEL, "--target", "q_proj,nope_proj"), "nope_proj")
