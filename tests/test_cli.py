"""The `tunelab` command line, in-process through typer's CliRunner (plus one real subprocess).

Every command is driven on the in-process `tiny-random-llama`; bad inputs must end in exit code 1
with one clear `error:` message and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml

import tunelab
from helpers import assert_clean_failure, invoke, read_metrics, read_report, tiny_run_config, write_jsonl, write_yaml
from tunelab import quickstart
from tunelab.generation import generate
from tunelab.models.loader import load_model
from tunelab.runs import load_run

SRC_DIR = Path(tunelab.__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_tunelab_help():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC_DIR), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "tunelab", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("train", "eval", "generate", "export", "quickstart"):
        assert command in done.stdout


# --- train ---------------------------------------------------------------------------------------------


def test_train_writes_the_run(tmp_path, records):
    train_file, eval_file = records
    config_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", train_file, eval_file))
    result = invoke("train", config_path, "train.max_steps=2")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter.safetensors").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 2  # the override took
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    report = read_report(run)
    assert report["steps"] == 2 and "eval_loss" in report
    assert str(run) in result.output.replace("\n", "")


def yaml_line_of(path: Path, text: str) -> int:
    return next(number for number, line in enumerate(path.read_text().splitlines(), start=1) if text in line)


def test_train_unknown_config_key(tmp_path, records):
    train_file, _ = records
    config_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", train_file, train={"learning_rate": 1e-3}))
    where = f"{config_path}:{yaml_line_of(config_path, 'learning_rate:')}"
    assert_clean_failure(invoke("train", config_path), where, "train.learning_rate", "unknown key")
    assert not (tmp_path / "run").exists()  # validation fails before any work


def test_train_missing_data_file(tmp_path):
    missing = tmp_path / "no-such-data.jsonl"
    config_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", missing))
    assert_clean_failure(invoke("train", config_path), str(missing), "not found")


def test_train_malformed_data_row(tmp_path, records):
    train_file, _ = records
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    rows[2] = {"messages": [{"role": "user", "content": "no answer here"}]}
    bad_file = write_jsonl(tmp_path / "bad.jsonl", rows)
    config_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", bad_file))
    assert_clean_failure(invoke("train", config_path), f"{bad_file}:3", "assistant")


def test_train_bad_json_line(tmp_path, records):
    train_file, _ = records
    bad_file = tmp_path / "bad.jsonl"
    lines = train_file.read_text().splitlines()
    bad_file.write_text("\n".join(lines[:4] + ['{"messages": [oops'] + lines[4:]) + "\n")
    config_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", bad_file))
    assert_clean_failure(invoke("train", config_path), f"{bad_file}:5", "bad JSON")


def test_train_unknown_model_path(tmp_path, records):
    train_file, _ = records
    missing_model = tmp_path / "no-such-model"
    config_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", train_file, model={"name": str(missing_model)}))
    assert_clean_failure(invoke("train", config_path), str(missing_model))


def test_train_model_dir_without_config(tmp_path, records):
    train_file, _ = records
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    config_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", train_file, model={"name": str(not_a_model)}))
    assert_clean_failure(invoke("train", config_path), str(not_a_model), "config.json")


def test_train_missing_config_file(tmp_path):
    assert_clean_failure(invoke("train", tmp_path / "nope.yaml"), str(tmp_path / "nope.yaml"), "not found")


def test_train_into_an_existing_run_needs_resume_or_overwrite(tiny_run):
    before = (tiny_run / "adapter" / "adapter.safetensors").read_bytes()
    assert_clean_failure(invoke("train", tiny_run / "config.yaml"), str(tiny_run), "--resume", "--overwrite")
    assert (tiny_run / "adapter" / "adapter.safetensors").read_bytes() == before  # the run is untouched


# --- eval, generate, export -----------------------------------------------------------------------------


def test_eval_command(tiny_run, tmp_path):
    result = invoke("eval", tiny_run, "--max-new-tokens", "4", "--max-samples", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "eval.json").read_text())
    assert printed["n"] == 1
    assert {"base", "tuned"} <= set(printed)
    assert "json_record_match" in printed["tuned"]  # the records task's answers are JSON
    assert len((tmp_path / "eval_samples.jsonl").read_text().splitlines()) == 1


def test_eval_command_no_base(tiny_run, tmp_path):
    result = invoke("eval", tiny_run, "--no-base", "--max-new-tokens", "2", "--max-samples", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert "tuned" in printed and "base" not in printed


def test_eval_command_without_eval_data(tmp_path, records):
    train_file, _ = records
    config_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", train_file))
    assert_clean_failure(invoke("eval", config_path), "data.eval")


PROMPT = "Extract: Ana Silva, 31, Porto, paid 12 EUR on 2024-01-02."


def test_generate_command_tuned_and_base(tiny_run):
    messages = [{"role": "user", "content": PROMPT}]
    run = load_run(tiny_run)
    expected_tuned = generate(run.model, run.tokenizer, [messages], max_new_tokens=12)[0]
    base_model, base_tokenizer = load_model(run.config.model)
    expected_base = generate(base_model, base_tokenizer, [messages], max_new_tokens=12)[0]

    tuned = invoke("generate", tiny_run, PROMPT, "--max-new-tokens", "12")
    assert tuned.exit_code == 0, tuned.output
    assert tuned.stdout == expected_tuned + "\n"
    base = invoke("generate", tiny_run, PROMPT, "--base", "--max-new-tokens", "12")
    assert base.exit_code == 0, base.output
    assert base.stdout == expected_base + "\n"


def test_generate_command_raw_and_system(tiny_run):
    run = load_run(tiny_run)
    expected_raw = generate(run.model, run.tokenizer, [PROMPT], max_new_tokens=8)[0]
    with_system = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": PROMPT}]
    expected_system = generate(run.model, run.tokenizer, [with_system], max_new_tokens=8)[0]

    raw = invoke("generate", tiny_run, PROMPT, "--raw", "--max-new-tokens", "8")
    assert raw.exit_code == 0, raw.output
    assert raw.stdout == expected_raw + "\n"
    system = invoke("generate", tiny_run, PROMPT, "--system", "Answer in JSON.", "--max-new-tokens", "8")
    assert system.exit_code == 0, system.output
    assert system.stdout == expected_system + "\n"


def test_generate_command_on_a_non_run(tmp_path):
    assert_clean_failure(invoke("generate", tmp_path, "hello"), str(tmp_path), "not a run directory")


def test_export_command(tiny_run, tmp_path):
    peft_out, merged_out = tmp_path / "adapter", tmp_path / "merged"
    result = invoke("export", tiny_run, "--format", "peft", "--out", peft_out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in peft_out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    result = invoke("export", tiny_run, "--format", "merged", "--out", merged_out)
    assert result.exit_code == 0, result.output
    assert (merged_out / "config.json").is_file() and (merged_out / "model.safetensors").is_file()
    assert (merged_out / "tokenizer.json").is_file()
    for export_format, extra in (("gguf", ["--gguf-type", "q8_0"]), ("gguf-adapter", [])):
        out = tmp_path / f"{export_format}.gguf"
        result = invoke("export", tiny_run, "--format", export_format, "--out", out, *extra)
        assert result.exit_code == 0, result.output
        assert out.read_bytes()[:4] == b"GGUF"


def test_export_command_bad_inputs(tiny_run, tmp_path):
    assert_clean_failure(invoke("export", tiny_run, "--format", "onnx", "--out", tmp_path / "x"), "onnx", "peft", "merged")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    assert_clean_failure(invoke("export", tiny_run, "--format", "peft", "--out", taken), str(taken), "not empty")
    assert_clean_failure(invoke("export", tiny_run, "--format", "gguf", "--out", tmp_path / "m.gguf", "--gguf-type", "q2_k"), "--gguf-type", "q4_0")
    assert not (tmp_path / "x").exists() and not (tmp_path / "m.gguf").exists()


def test_serve_command_bad_inputs(tmp_path):
    """Each refused before a socket is opened: one line, exit 1."""
    assert_clean_failure(invoke("serve", "no-equals-sign", "--model", "tiny-random-llama"), "adapter 'no-equals-sign'", "NAME=RUN_DIR_OR_PEFT_ADAPTER")
    assert_clean_failure(invoke("serve", "--model", "tiny-random-llama", "--dtype", "float64"), "--dtype float64", "bfloat16")
    assert_clean_failure(invoke("serve", f"x={tmp_path / 'missing'}", "--model", "tiny-random-llama"), "adapter 'x'", "neither a tunelab run directory nor a peft adapter")
    assert_clean_failure(invoke("serve", f"tiny-random-llama={tmp_path}", "--model", "tiny-random-llama"), "is the base model's name")


# --- quickstart ---------------------------------------------------------------------------------------


def test_quickstart_writes_report_and_plot(tmp_path, monkeypatch):
    # The demo's data sizes are tuned for SmolLM2; shrink them so the byte-level tiny model is quick.
    monkeypatch.setitem(quickstart.DEFAULTS, "n_train", 16)
    monkeypatch.setitem(quickstart.DEFAULTS, "n_eval", 4)
    out = tmp_path / "qs"
    result = invoke("quickstart", "--model", "tiny-random-llama", "--steps", "2", "--out", out)
    assert result.exit_code == 0, result.output

    report = json.loads((out / "report.json").read_text())
    assert {"task", "metric", "before", "after", "train_seconds", "total_seconds"} <= set(report)
    assert report["task"] == "record-extraction"
    assert 0.0 <= report["before"] <= 1.0 and 0.0 <= report["after"] <= 1.0
    assert 0 < report["train_seconds"] <= report["total_seconds"]
    # before/after are the run's eval scores under the reported metric.
    scores = json.loads((out / "run" / "eval.json").read_text())
    assert report["before"] == scores["base"][report["metric"]]
    assert report["after"] == scores["tuned"][report["metric"]]
    assert scores["n"] == 4
    assert [m["step"] for m in read_metrics(out / "run")] == [1, 2]

    png = out / "loss.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_preference_quickstart_reports_pair_accuracy_and_record_match(objective, tmp_path, monkeypatch):
    monkeypatch.setitem(quickstart.DEFAULTS, "n_eval", 4)
    out = tmp_path / "qs"
    result = invoke("quickstart", "--model", "tiny-random-llama", "--steps", "2", "--objective", objective, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["objective"] == objective
    # Held-out pairs: the pair scores of the base (its own log-probabilities) and of the run.
    before = json.loads((out / "eval" / "base-pairs" / "eval.json").read_text())["metrics"]
    after = json.loads((out / "eval" / "pairs" / "eval.json").read_text())["metrics"]
    assert (report["pair_accuracy_before"], report["pair_accuracy_after"]) == (before["pairwise_accuracy"], after["pairwise_accuracy"])
    rows = (out / "data" / "pairs_train.jsonl").read_text().splitlines()
    assert len(rows) == 2 * quickstart.DEFAULTS["batch_size"]  # one pass: steps x batch_size pairs
    if objective == "reward":
        assert report["before"] is None and report["after"] is None  # a reward model has no answers
    else:
        assert 0.0 <= report["before"] <= 1.0 and 0.0 <= report["after"] <= 1.0
