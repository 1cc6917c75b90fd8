"""`model.quantize`: NF4 (QLoRA) and int8 frozen weights under every method that can train on them.

Oracles: a reference NF4 quantizer written here from the QLoRA paper's table; an nn.Linear holding
the dequantized weight (forward and adapter gradients); the untrained model's quantized weights
(bitwise unchanged by training); peft on the full-precision base (how QLoRA adapters are used).
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import tunelab
from helpers import assert_tensors_equal, load_adapter, tiny_run_config, train_keeping_model, write_records_data
from peft_oracle import assert_close, probe_ids, randomize
from tunelab.config import parse_config
from tunelab.errors import TunelabError
from tunelab.export import export_run, import_peft
from tunelab.methods import build_method
from tunelab.methods.registry import get_method_class, method_names
from tunelab.models.loader import load_model
from tunelab.models.quantize import (
    QuantizedLinear,
    dequantize,
    dequantize_linears,
    nf4_scaler_block,
    quantize_linears,
    quantize_weight,
    quantized_layers,
    storage_bytes,
)
from tunelab.runs import load_run

# NF4's 16 values: the quantiles of N(0, 1) normalized to [-1, 1], as printed in the QLoRA paper
# (Dettmers et al. 2023, appendix E) and bitsandbytes.
NF4_PAPER = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip

# Methods that train the base model's own weights: refused on a quantized base.
TRAIN_OWN_WEIGHTS = {"full", "freeze", "hft", "lisa", "owlore", "subtuning"}
ADAPTER_METHODS = [name for name in method_names() if name not in TRAIN_OWN_WEIGHTS]
SMALL = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4}}
# SmolLM2-135M's linear shapes (out, in): q/o, k/v, gate/up, down.
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def options(name: str) -> dict:
    return {"name": name, **SMALL.get(name, {})}


def quantized_tiny(scheme: str):
    config = parse_config({"model": {"name": "tiny-random-llama", "dtype": "float32", "device": "cpu", "quantize": scheme}, "data": {"train": "x"}})
    return load_model(config.model)[0]


def method_of(name: str):
    return build_method(parse_config({"model": "tiny-random-llama", "data": {"train": "x"}, "method": options(name)}).method)


def nf4_codes(weight) -> torch.Tensor:
    """torchao's packed codes, two per byte (first in the high nibble), as one code per weight."""
    data = weight.quantized_data
    return torch.stack([data >> 4, data & 0b1111], dim=-1).flatten().long()


@pytest.mark.parametrize("shape", SMOLLM2_SHAPES)
def test_nf4_codes_equal_the_papers_quantizer_and_storage_is_under_0_6_bytes_per_weight(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    quantized = quantize_weight(weight, "nf4")
    blocks = weight.double().reshape(-1, 64)
    normalized = blocks / blocks.abs().amax(dim=1, keepdim=True)
    table = torch.tensor(NF4_PAPER, dtype=torch.float64)
    expected = (normalized[..., None] - table).abs().argmin(dim=-1).flatten()
    # torchao stores the table to 4 decimals, which moves each midpoint between two values by at
    # most 5e-5: a weight that close to one may round either way; everywhere else the codes must be
    # the paper's.
    midpoints = (table[1:] + table[:-1]) / 2
    ambiguous = ((normalized[..., None] - midpoints).abs().amin(dim=-1) < 6e-5).flatten()
    codes = nf4_codes(quantized)
    assert ambiguous.double().mean() < 2e-3
    assert torch.equal(codes[~ambiguous], expected[~ambiguous])
    # Double quantization: 64 weights per scale, the scales themselves in int8.
    assert quantized.block_size == 64 and quantized.quantized_scalers.dtype == torch.int8
    assert storage_bytes(quantized) / weight.numel() <= 0.6
    # Dequantization is torchao's own, bitwise (ours is a faster path to the same values).
    assert torch.equal(dequantize(quantized), quantized.get_original_weight())


def test_scaler_blocks_fit_real_shapes_and_a_shape_that_does_not_fit_stays_dense_and_is_counted():
    assert nf4_scaler_block(1536 * 576) == 256
    assert nf4_scaler_block(576 * 576) == 216
    assert nf4_scaler_block(192 * 576) == 216  # 1728 scales: QLoRA's 256 does not divide them
    assert nf4_scaler_block(70) is None
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(10, 7), torch.nn.Linear(64, 8))
    report = quantize_linears(model, "nf4", excluded={"2"})
    assert (report.layers, report.kept) == (1, ["1"])
    assert isinstance(model[0], QuantizedLinear) and type(model[1]) is torch.nn.Linear and type(model[2]) is torch.nn.Linear
    assert "1 kept in the model's dtype" in report.summary()


def test_int8_is_per_row_weight_only_within_half_a_step():
    weight = torch.randn(192, 576, generator=torch.Generator().manual_seed(0))
    quantized = quantize_weight(weight, "int8")
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((dequantize(quantized) - weight).abs() <= step / 2 + 1e-7).all()
    assert storage_bytes(quantized) / weight.numel() < 1.01


def test_the_quantized_model_keeps_embeddings_norms_and_head_in_the_model_dtype():
    model = quantized_tiny("nf4")
    layers = quantized_layers(model)
    assert len(layers) == 14  # 2 decoder layers x 7 projections
    dense = [name for name, p in model.named_parameters() if type(p) is torch.nn.Parameter and p.dtype == torch.float32]
    assert "model.embed_tokens.weight" in dense and "model.norm.weight" in dense
    assert all("proj" not in name for name in dense)


@pytest.mark.parametrize(("scheme", "name"), [(scheme, n) for scheme in ("nf4", "int8") for n in ADAPTER_METHODS])
def test_forward_and_adapter_gradients_equal_a_dense_linear_holding_the_dequantized_weight(scheme, name):
    quantized, dense = quantized_tiny(scheme), quantized_tiny(scheme)
    dequantize_linears(dense)
    assert not quantized_layers(dense)
    method_q, method_d = method_of(name), method_of(name)
    method_q.attach(quantized)
    method_d.attach(dense)
    randomize(method_q, quantized)
    method_d.load_state_dict(dense, method_q.state_dict(quantized), "test")
    ids = probe_ids()
    outputs = []
    for model in (quantized, dense):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outputs.append(out.logits)
    assert_close(outputs[0], outputs[1], 1e-6, "logits")
    grads_d = {n: p.grad for n, p in method_d.trainable_parameters(dense).items()}
    for param_name, param in method_q.trainable_parameters(quantized).items():
        assert_close(param.grad, grads_d[param_name], 1e-6, f"gradient of {param_name}")


@pytest.mark.parametrize(("scheme", "name"), [(scheme, n) for scheme in ("nf4", "int8") for n in ADAPTER_METHODS if get_method_class(n).mergeable])
def test_merging_into_the_dequantized_weights_keeps_the_logits(scheme, name):
    model = quantized_tiny(scheme)
    method = method_of(name)
    method.attach(model)
    randomize(method, model)
    ids = probe_ids()
    with torch.no_grad():
        unmerged = model.eval()(input_ids=ids).logits
        method.merge(model)
        dequantize_linears(model)
        assert not quantized_layers(model)
        assert_close(model(input_ids=ids).logits, unmerged, 1e-4, "merged")


@pytest.fixture(scope="module")
def records(module_cache, tmp_path_factory):
    return write_records_data(tmp_path_factory.mktemp("records"), n_train=8, n_eval=4)


def quantized_config(directory, records, name, scheme="nf4"):
    train_file, eval_file = records
    settings = {"max_steps": 4, "save_every": 2, "keep_checkpoints": 5, "lr": 1e-2}
    return tiny_run_config(directory, train_file, eval_file, model={"quantize": scheme}, method=options(name), train=settings)


@pytest.mark.parametrize(("scheme", "name"), [("nf4", n) for n in ADAPTER_METHODS] + [("int8", "lora")])
def test_every_adapter_method_trains_on_a_quantized_base_that_stays_bitwise_unchanged_and_resumes_exactly(scheme, name, records, tmp_path, monkeypatch):
    config = quantized_config(tmp_path / "run", records, name, scheme)
    result, kept = train_keeping_model(monkeypatch, config)
    model, method = kept["model"], kept["method"]
    moved = [n for n, p in method.trainable_parameters(model).items() if not torch.equal(p, kept["initial"][id(p)])]
    assert moved, "no trainable tensor moved"
    untrained = quantized_layers(quantized_tiny(scheme))
    trained = {n.replace(".base_layer", ""): layer for n, layer in quantized_layers(model).items()}
    assert sorted(trained) == sorted(untrained)
    for layer_name, layer in trained.items():
        for field in layer.weight.__tensor_flatten__()[0]:  # every inner tensor: codes, scales, ...
            assert torch.equal(getattr(layer.weight, field), getattr(untrained[layer_name].weight, field)), (layer_name, field)
    assert math.isfinite(result.report["eval_loss"]) and result.report["quantize"]["layers"] == 14
    finished = load_adapter(config["output"])
    assert tunelab.train(config, resume=True).report["resumed_from_step"] == 2
    assert_tensors_equal(load_adapter(config["output"]), finished)


@pytest.mark.parametrize("name", sorted(TRAIN_OWN_WEIGHTS))
def test_methods_that_train_the_base_weights_are_refused_on_a_quantized_base_writing_nothing(name, records, tmp_path):
    config = quantized_config(tmp_path / "run", records, name)
    with pytest.raises(TunelabError, match=f"method '{name}' trains the base model's own weights.*model.quantize: nf4"):
        tunelab.train(config)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("name", ["lora", "dora", "pissa"])
def test_qlora_exports_a_peft_adapter_for_the_full_precision_base_and_merges_into_the_dequantized_weights(name, records, tmp_path):
    """A QLoRA adapter is used on the full-precision base: peft loads it there and computes what
    tunelab computes with the same adapter on that base. `--format merged` folds it into the
    dequantized weights: a plain checkpoint with the quantized run's logits."""
    method = {"lora": {"name": "lora"}, "dora": {"name": "lora", "dora": True}, "pissa": {"name": "lora", "init": "pissa"}}[name]
    train_file, eval_file = records
    config = tiny_run_config(tmp_path / "run", train_file, model={"quantize": "nf4"}, method={"r": 4, "alpha": 8.0, **method}, train={"max_steps": 2, "lr": 1e-2})
    run = tunelab.train(config).output_dir
    ids = probe_ids()
    with torch.no_grad():
        quantized_logits = load_run(run).model.eval()(input_ids=ids).logits
        export_run(run, "merged", tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
        assert_close(merged, quantized_logits, 1e-4, "merged export")
        gguf_file = export_run(run, "gguf", tmp_path / "merged.gguf", "f32")  # merges the same way
        from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32).eval()(input_ids=ids).logits
        assert_close(from_gguf, quantized_logits, 1e-4, "GGUF export")
        if name == "pissa":  # its adapter is relative to the residual base: no full-precision use
            return
        export_run(run, "peft", tmp_path / "peft")
        on_full_base = peft.PeftModel.from_pretrained(quantized_tiny("none"), tmp_path / "peft").eval()(input_ids=ids).logits
        imported = import_peft(tmp_path / "peft", tmp_path / "imported", model="tiny-random-llama")
        ours_on_full_base = load_run(imported).model.eval()(input_ids=ids).logits
        assert_close(on_full_base, ours_on_full_base, 1e-5, "the adapter on the full-precision base")
        assert (on_full_base - quantized_logits).abs().max() > 1e-4  # the bases really differ
