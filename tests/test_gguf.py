"""`tunelab export --format gguf | gguf-adapter` on the tiny model (SmolLM2: test_integration_smollm2.py).

Oracles: `gguf.GGUFReader` (every tensor against the model's, f32 exactly, q8_0 within its block
bound); transformers' own GGUF loader (an independent reader: the run's logits); the merged file
against the base file plus the adapter file (the q/k permutation of B's rows is right).
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import tunelab
from helpers import tiny_run_config, write_records_data
from tunelab.errors import TunelabError
from tunelab.export import export_run
from tunelab.export.gguf_export import permute_rotary_rows
from tunelab.models.tiny import tiny_llama, tiny_tokenizer
from tunelab.runs import load_run

IDS = torch.tensor([[1, 17, 42, 99, 7, 23, 64, 5]])
# max |logit difference| to the run, measured on this tiny model (max |logit| ~1): f16 3e-4,
# q8_0 6.5e-3, q4_0 5.8e-2; the bounds leave room for other seeds.
TOLERANCE = {"f32": 1e-4, "f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2, "q4_0": 0.2}


@pytest.fixture(scope="module")
def lora_run(module_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    train_file, _ = write_records_data(folder, n_train=8)
    config = tiny_run_config(folder / "run", train_file, method={"r": 4, "alpha": 8.0, "target": "all-linear"}, train={"max_steps": 2, "lr": 1e-2})
    return tunelab.train(config).output_dir


@pytest.fixture(scope="module")
def run_logits(lora_run):
    with torch.no_grad():
        return load_run(lora_run).model.eval()(input_ids=IDS).logits


def read_tensors(path) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """name -> (values as float32 in the model's (out, in) shape, stored type)."""
    reader = gguf.GGUFReader(path)
    tensors = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        tensors[tensor.name] = (values.astype(np.float32), tensor.tensor_type)
    return tensors


def expected_tensors(model) -> dict[str, torch.Tensor]:
    """The tiny Llama's weights under llama.cpp's names, q/k rows permuted (written here by hand)."""
    config = model.config
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    names |= {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    out = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    for index, layer in enumerate(model.model.layers):
        for module_name, module in layer.named_modules():
            leaf = module_name.rsplit(".", 1)[-1]
            if leaf in names:
                weight = module.weight.detach()
                if leaf in ("q_proj", "k_proj"):
                    weight = permute_rotary_rows(weight, config.num_attention_heads if leaf == "q_proj" else config.num_key_value_heads)
                out[f"blk.{index}.{names[leaf]}.weight"] = weight
    return out


def test_f32_export_holds_every_tensor_exactly_with_llama_cpps_names_and_metadata(lora_run, tmp_path):
    out = export_run(lora_run, "gguf", tmp_path / "model.gguf", "f32")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file this user writes, not private
    merged = load_run(lora_run)
    merged.method.merge(merged.model)
    expected = expected_tensors(merged.model)
    written = read_tensors(out)
    assert sorted(written) == sorted(expected)  # tied head: no output.weight
    for name, (values, qtype) in written.items():
        assert qtype == gguf.GGMLQuantizationType.F32, name
        assert np.array_equal(values, expected[name].numpy()), name
    fields = gguf.GGUFReader(out).fields
    value = {key: fields[key].contents() for key in fields}
    assert value["general.architecture"] == "llama" and value["general.type"] == "model"
    assert (value["llama.block_count"], value["llama.embedding_length"], value["llama.attention.head_count_kv"]) == (2, 64, 2)
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert value["tokenizer.ggml.tokens"][:3] == ["<pad>", "<s>", "</s>"] and value["tokenizer.ggml.eos_token_id"] == 2
    assert value["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert "### Assistant" in value["tokenizer.chat_template"]


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_quantized_types_stay_within_their_block_bound_and_norms_stay_f32(lora_run, tmp_path, gguf_type):
    out = export_run(lora_run, "gguf", tmp_path / "model.gguf", gguf_type)
    merged = load_run(lora_run)
    merged.method.merge(merged.model)
    expected = expected_tensors(merged.model)
    levels = {"q8_0": 127, "q4_0": 8}
    for name, (values, qtype) in read_tensors(out).items():
        if values.ndim == 1:
            assert qtype == gguf.GGMLQuantizationType.F32, name
            continue
        # The tied embedding is the output head too: 8 bits, as llama.cpp's quantizer keeps it.
        kind = "q8_0" if name == "token_embd.weight" else gguf_type
        assert qtype.name == kind.upper(), name
        blocks = expected[name].numpy().reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / levels[kind]  # one quantization step
        assert (np.abs(values.reshape(-1, 32) - blocks) <= step * 1.01 + 1e-7).all(), name


@pytest.mark.parametrize("gguf_type", list(TOLERANCE))
def test_transformers_reads_the_export_back_to_the_runs_logits(lora_run, run_logits, tmp_path, gguf_type):
    out = export_run(lora_run, "gguf", tmp_path / "model.gguf", gguf_type)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        error = (model(input_ids=IDS).logits - run_logits).abs().max().item()
    assert error <= TOLERANCE[gguf_type]


def test_a_base_model_alone_exports(module_cache, tmp_path):
    out = export_run("tiny-random-llama", "gguf", tmp_path / "base.gguf", "f32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    base = tiny_llama(len(tiny_tokenizer())).eval()
    with torch.no_grad():
        assert (model(input_ids=IDS).logits - base(input_ids=IDS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_file_is_what_llama_cpp_adds_to_the_base_file(module_cache, tmp_path, rslora):
    """base.gguf + alpha/r · lora_b @ lora_a (llama.cpp's rule) equals merged.gguf, tensor by tensor."""
    train_file, _ = write_records_data(tmp_path, n_train=8)
    method = {"r": 4, "alpha": 8.0, "target": "all-linear", "rslora": rslora}
    run = tunelab.train(tiny_run_config(tmp_path / "run", train_file, method=method, train={"max_steps": 2, "lr": 1e-2})).output_dir
    adapter = export_run(run, "gguf-adapter", tmp_path / "adapter.gguf")
    base = read_tensors(export_run("tiny-random-llama", "gguf", tmp_path / "base.gguf", "f32"))
    merged = read_tensors(export_run(run, "gguf", tmp_path / "merged.gguf", "f32"))
    fields = gguf.GGUFReader(adapter).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    alpha = fields["adapter.lora.alpha"].contents()
    assert alpha / 4 == pytest.approx(8.0 / 2 if rslora else 8.0 / 4)  # rsLoRA's 1/√r folded into alpha
    factors = read_tensors(adapter)
    targets = sorted(name.removesuffix(".lora_a") for name in factors if name.endswith(".lora_a"))
    assert len(targets) == 14
    for name in targets:
        lora_a, lora_b = factors[name + ".lora_a"][0], factors[name + ".lora_b"][0]
        assert lora_a.shape[0] == 4 and lora_b.shape[1] == 4
        rebuilt = base[name][0] + (alpha / 4) * (lora_b @ lora_a)
        np.testing.assert_allclose(rebuilt, merged[name][0], atol=1e-6, err_msg=name)


@pytest.mark.parametrize("method", [{"name": "lora", "dora": True}, {"name": "lora", "init": "pissa"}, {"name": "oft"}, {"name": "prompt_tuning", "num_virtual_tokens": 4}])
def test_what_llama_cpp_cannot_apply_as_a_lora_is_refused_pointing_to_the_merged_export(module_cache, tmp_path, method):
    train_file, _ = write_records_data(tmp_path, n_train=8)
    run = tunelab.train(tiny_run_config(tmp_path / "run", train_file, method=method, train={"max_steps": 1})).output_dir
    with pytest.raises(TunelabError, match="--format gguf"):
        export_run(run, "gguf-adapter", tmp_path / "adapter.gguf")
    assert not list(tmp_path.glob("*adapter.gguf*"))


def test_bad_gguf_requests_fail_naming_the_option(lora_run, tmp_path):
    with pytest.raises(TunelabError, match="--gguf-type: 'q3' is not one of"):
        export_run(lora_run, "gguf", tmp_path / "m.gguf", "q3")
    with pytest.raises(TunelabError, match="name it \\*.gguf"):
        export_run(lora_run, "gguf", tmp_path / "m.bin")
    (tmp_path / "taken.gguf").write_text("x")
    with pytest.raises(TunelabError, match="exists"):
        export_run(lora_run, "gguf", tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_text() == "x"


def test_query_and_key_biases_move_with_their_rows(module_cache, tmp_path):
    """llama.cpp permutes q/k biases with the rows of their weights (transformers' GGUF reader drops
    Llama biases, so it cannot check this): each written bias entry belongs to the written row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.data.normal_()
    model.save_pretrained(tmp_path / "biased")
    tokenizer.save_pretrained(tmp_path / "biased")
    written = read_tensors(export_run(str(tmp_path / "biased"), "gguf", tmp_path / "biased.gguf", "f32"))
    attention = model.model.layers[0].self_attn
    for leaf, module in (("attn_q", attention.q_proj), ("attn_k", attention.k_proj), ("attn_v", attention.v_proj)):
        weight, bias = written[f"blk.0.{leaf}.weight"][0], written[f"blk.0.{leaf}.bias"][0]
        source_rows = {tuple(row): index for index, row in enumerate(module.weight.detach().numpy())}
        origin = [source_rows[tuple(row)] for row in weight]
        assert sorted(origin) == list(range(len(origin)))
        assert np.array_equal(bias, module.bias.detach().numpy()[origin]), leaf
        assert (leaf == "attn_v") == (origin == sorted(origin))  # q and k are permuted, v is not
