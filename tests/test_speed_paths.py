"""The speed paths give the same numbers as the plain ones: the fused LoRA linear, the chunked
linear cross-entropy, padding-free packed attention, forwards split by tokens, activation
checkpointing, and the allocator setting.

Every comparison is against a plain PyTorch / Hugging Face reference computed in the same dtype,
so a wrong scale, a missing gradient term or a leak between packed samples fails.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tunelab
import tunelab.objectives.causal_lm as causal_lm_module
from helpers import load_adapter, read_metrics, tiny_run_config, write_records_data
from tunelab.config import ModelConfig
from tunelab.data.batching import IGNORE, make_batch, split_by_tokens
from tunelab.data.tokenize import tokenize_example
from tunelab.methods.lora import Lora, LoraLinear, LoraOptions
from tunelab.models.attention import enable_packed_attention, uses_packed_attention
from tunelab.models.loader import load_model
from tunelab.models.tiny import tiny_llama, tiny_tokenizer
from tunelab.objectives import sft
from tunelab.objectives.causal_lm import LinearCrossEntropy, causal_lm_loss
from tunelab.train import loop
from tunelab.train.allocator import keep_freed_memory, peak_memory_mb, reset_peak_memory
from tunelab.train.loop import resolve_tokens_per_forward

TINY = "tiny-random-llama"


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "") -> None:
    """Elementwise within `rel` relative, with an absolute floor of `rel` x the tensor's scale (so
    entries near zero, where float rounding of a sum is relative to its terms, do not fail)."""
    assert actual.shape == expected.shape, name
    assert actual.dtype == expected.dtype, name
    scale = float(expected.detach().abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{name}: {m}")


def norm_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


# --- 1. the fused LoRA linear ------------------------------------------------------------------------


def make_lora_layer(in_features: int, out_features: int, bias: bool, dropout: float, dtype=torch.float32, train_base: bool = False) -> LoraLinear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = nn.Linear(in_features, out_features, bias=bias).to(dtype)
        layer = LoraLinear(base, r=4, scaling=8.0 / 4, dropout=dropout, init="kaiming")
        nn.init.normal_(layer.lora_B.weight, std=0.5)  # B starts at zero: make the adapter path count
    base.requires_grad_(train_base)
    layer.train()
    return layer


def reference_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The textbook LoRA forward: dropout on x in x's dtype, the adapter in fp32."""
    adapter = layer.lora_B(layer.lora_A(layer.lora_dropout(x).to(layer.lora_A.weight.dtype))) * layer.scaling
    return layer.base_layer(x) + adapter.to(x.dtype)


def lora_grads(layer: LoraLinear, x: torch.Tensor, forward, upstream: torch.Tensor, seed: int) -> dict:
    """Output and gradients of sum(forward(x) * upstream) for x and every trainable tensor of `layer`."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask for both forwards
    y = forward(layer, x)
    (y.float() * upstream).sum().backward()
    grads = {"out": y.detach(), "x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters() if p.requires_grad})
    return grads


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "trained-base"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_function_matches_reference_fp32(dropout, bias, ndim, train_base):
    layer = make_lora_layer(24, 40, bias=bias, dropout=dropout, train_base=train_base)
    generator = torch.Generator().manual_seed(1)
    shape = (3, 7, 24) if ndim == 3 else (13, 24)
    x = torch.randn(shape, generator=generator)
    upstream = torch.randn((*shape[:-1], 40), generator=generator)

    fused = lora_grads(layer, x, lambda m, t: m(t), upstream, seed=5)
    reference = lora_grads(layer, x, reference_forward, upstream, seed=5)

    expected_names = {"out", "x", "lora_A.weight", "lora_B.weight"}
    if train_base:
        expected_names |= {"base_layer.weight"} | ({"base_layer.bias"} if bias else set())
    assert set(fused) == set(reference) == expected_names
    for name in sorted(expected_names):
        assert fused[name] is not None, name
        assert_close_rel(fused[name], reference[name], rel=1e-6, name=name)
    if dropout:
        # the check can fail: another dropout mask gives another output
        other = lora_grads(layer, x, reference_forward, upstream, seed=6)
        assert not torch.allclose(other["out"], fused["out"], rtol=1e-3, atol=1e-3)


def test_lora_linear_function_noncontiguous_input_and_output_grad():
    layer = make_lora_layer(16, 12, bias=True, dropout=0.0, train_base=True)
    generator = torch.Generator().manual_seed(2)
    source = torch.randn(16, 5, 3, generator=generator)
    upstream = torch.randn(5, 3, 12, generator=generator)

    def run(forward):
        layer.zero_grad(set_to_none=True)
        x = source.clone().requires_grad_(True)
        y = forward(layer, x.permute(1, 2, 0))  # a non-contiguous (5, 3, 16) view
        (y.transpose(0, 1) * upstream.transpose(0, 1)).sum().backward()  # a non-contiguous grad_out
        return {"out": y.detach(), "x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}

    fused, reference = run(lambda m, t: m(t)), run(reference_forward)
    for name in reference:
        assert_close_rel(fused[name], reference[name], rel=1e-6, name=name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_function_bf16_base_with_fp32_adapter(dropout):
    layer = make_lora_layer(32, 48, bias=True, dropout=dropout, dtype=torch.bfloat16)
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 32, generator=generator).to(torch.bfloat16)
    upstream = torch.randn(4, 9, 48, generator=generator)

    fused = lora_grads(layer, x, lambda m, t: m(t), upstream, seed=7)
    reference = lora_grads(layer, x, reference_forward, upstream, seed=7)
    assert fused["out"].dtype == torch.bfloat16 and fused["x"].dtype == torch.bfloat16
    assert fused["lora_A.weight"].dtype == fused["lora_B.weight"].dtype == torch.float32
    assert set(fused) == set(reference) == {"out", "x", "lora_A.weight", "lora_B.weight"}
    for name in fused:
        assert norm_rel_error(fused[name], reference[name]) < 2e-2, name


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_function_no_grad_matches_reference(dropout, dtype):
    layer = make_lora_layer(20, 28, bias=True, dropout=dropout, dtype=dtype)
    x = torch.randn(2, 6, 20, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        torch.manual_seed(9)
        fused = layer(x)
        torch.manual_seed(9)
        reference = reference_forward(layer, x)
    assert not fused.requires_grad
    if dtype == torch.float32:
        assert_close_rel(fused, reference, rel=1e-6)
    else:
        assert fused.dtype == dtype
        assert norm_rel_error(fused, reference) < 2e-2


def test_lora_linear_function_shared_input_flag_follows_dropout():
    """Without dropout the module passes x itself as x_lora (one summed input gradient)."""
    x = torch.randn(3, 8)
    assert make_lora_layer(8, 8, False, 0.0).lora_dropout(x) is x
    assert make_lora_layer(8, 8, False, 0.3).lora_dropout(x) is not x


# --- 2. the chunked linear cross-entropy -------------------------------------------------------------


def cross_entropy_case(n_rows=37, hidden_size=16, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) * 0.5
    labels = torch.randint(0, vocab, (n_rows,), generator=generator)
    return hidden, weight, labels


def cross_entropy_grads(fn, hidden, weight, labels, weight_grad: bool, scale: float = 1.0):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(weight_grad)
    loss = fn(hidden, weight, labels)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def plain_cross_entropy(hidden, weight, labels):
    return F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [None, 8], ids=["default-chunk", "8-row-chunks"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-head", "trained-head"])
def test_linear_cross_entropy_matches_plain(monkeypatch, chunk_rows, weight_grad):
    hidden, weight, labels = cross_entropy_case()
    if chunk_rows is not None:
        # 37 rows in chunks of 8: four full chunks and a ragged one of 5
        monkeypatch.setattr(causal_lm_module, "CHUNK_ELEMENTS", chunk_rows * weight.shape[0])
    calls = []
    real_log_softmax = torch.log_softmax
    monkeypatch.setattr(torch, "log_softmax", lambda t, *a, **k: calls.append(t.shape[0]) or real_log_softmax(t, *a, **k))
    loss, grad_hidden, grad_weight = cross_entropy_grads(LinearCrossEntropy.apply, hidden, weight, labels, weight_grad)
    monkeypatch.setattr(torch, "log_softmax", real_log_softmax)
    assert calls == ([8, 8, 8, 8, 5] if chunk_rows else [37])

    ref_loss, ref_grad_hidden, ref_grad_weight = cross_entropy_grads(plain_cross_entropy, hidden, weight, labels, weight_grad)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert_close_rel(grad_hidden, ref_grad_hidden, rel=1e-5, name="hidden")
    if weight_grad:
        assert grad_weight is not None
        assert_close_rel(grad_weight, ref_grad_weight, rel=1e-5, name="weight")
    else:
        assert grad_weight is None


@pytest.mark.parametrize("scale", [0.01, 3.0])
def test_linear_cross_entropy_backward_uses_grad_output(monkeypatch, scale):
    monkeypatch.setattr(causal_lm_module, "CHUNK_ELEMENTS", 8 * 50)
    hidden, weight, labels = cross_entropy_case(seed=1)
    _, grad_hidden, grad_weight = cross_entropy_grads(LinearCrossEntropy.apply, hidden, weight, labels, True, scale)
    _, ref_grad_hidden, ref_grad_weight = cross_entropy_grads(plain_cross_entropy, hidden, weight, labels, True, scale)
    _, unit_grad_hidden, _ = cross_entropy_grads(LinearCrossEntropy.apply, hidden, weight, labels, True, 1.0)
    assert_close_rel(grad_hidden, ref_grad_hidden, rel=1e-5, name="hidden")
    assert_close_rel(grad_weight, ref_grad_weight, rel=1e-5, name="weight")
    assert_close_rel(grad_hidden, unit_grad_hidden * scale, rel=1e-5, name="scaled")


def test_linear_cross_entropy_in_a_larger_graph():
    """The loss feeds other operations: a sum with another term and a division, as in the loop."""
    hidden, weight, labels = cross_entropy_case(seed=2)
    results = []
    for fn in (LinearCrossEntropy.apply, plain_cross_entropy):
        h = hidden.clone().requires_grad_(True)
        loss = (fn(h, weight, labels) + (h**2).sum()) / 17.0
        loss.backward()
        results.append((loss.detach(), h.grad))
    assert results[0][0].item() == pytest.approx(results[1][0].item(), rel=1e-5)
    assert_close_rel(results[0][1], results[1][1], rel=1e-5)


# --- 3. padding-free packed batches ------------------------------------------------------------------


def speed_samples(tokenizer) -> list[dict]:
    conversation = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
    examples = [
        {"messages": conversation},
        {"messages": conversation[1:3]},
        {"messages": [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y"}]},
        {"segments": [{"text": "The prompt is here.", "train": False}, {"text": " Completion!", "train": True}]},
        {"segments": [{"text": "Short text.", "train": True}]},
    ]
    samples = [tokenize_example(example, tokenizer) for example in examples]
    assert len({len(s["input_ids"]) for s in samples}) == len(samples)
    return samples


@pytest.fixture(scope="module")
def lora_tiny_model():
    """tiny-random-llama as load_model gives it (packed attention on), with LoRA and a nonzero B."""
    model, tokenizer = load_model(ModelConfig(name=TINY, dtype="float32", device="cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Lora(LoraOptions(r=4, alpha=8.0)).attach(model)
        for module in model.modules():
            if isinstance(module, LoraLinear):
                nn.init.normal_(module.lora_B.weight, std=0.05)
    return model, tokenizer


def loss_and_lora_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_padding_free_batch_layout(lora_tiny_model):
    _, tokenizer = lora_tiny_model
    samples = speed_samples(tokenizer)
    lengths = [len(s["input_ids"]) for s in samples]
    batch = make_batch(samples, max_length=max(lengths), packing=True, pad_id=tokenizer.pad_token_id, padding_free=True)
    assert batch.attention_mask is None
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (1, sum(lengths))
    cumulative = [0]
    for n in lengths:
        cumulative.append(cumulative[-1] + n)
    assert batch.cu_seq_lens.tolist() == cumulative
    assert batch.input_ids[0].tolist() == [t for s in samples for t in s["input_ids"]]
    assert batch.position_ids[0].tolist() == [p for n in lengths for p in range(n)]
    assert batch.n_tokens == sum(lengths)
    assert batch.n_targets == sum(sum(s["target_mask"][1:]) for s in samples)
    # no label crosses a sample boundary: each sample's last token predicts nothing
    assert all(batch.labels[0, end - 1] == IGNORE for end in cumulative[1:])
    inputs = batch.model_inputs()
    assert inputs["attention_mask"] is None and inputs["cu_seq_lens_q"] is batch.cu_seq_lens
    moved = batch.to(torch.device("cpu"))
    assert moved.cu_seq_lens.tolist() == cumulative


def test_padding_free_loss_and_grads_equal_padded_and_mask_packed(lora_tiny_model):
    model, tokenizer = lora_tiny_model
    assert uses_packed_attention(model)
    model.train()
    pad_id = tokenizer.pad_token_id
    samples = speed_samples(tokenizer)
    lengths = [len(s["input_ids"]) for s in samples]
    max_length = max(max(lengths), sum(lengths) // 2)

    padding_free = make_batch(samples, max_length, packing=True, pad_id=pad_id, padding_free=True)
    padded = make_batch(samples, max_length, packing=False, pad_id=pad_id)
    mask_packed = make_batch(samples, max_length, packing=True, pad_id=pad_id)
    assert 1 < mask_packed.input_ids.shape[0] < len(samples)
    assert padding_free.n_targets == padded.n_targets == mask_packed.n_targets

    free_loss, free_grads = loss_and_lora_grads(model, padding_free)
    assert len(free_grads) == 2 * 7 * 2  # 2 layers x 7 linears x (A, B)
    for other in (padded, mask_packed):
        other_loss, other_grads = loss_and_lora_grads(model, other)
        assert free_loss == pytest.approx(other_loss, rel=1e-5)
        assert sorted(free_grads) == sorted(other_grads)
        for name in other_grads:
            assert_close_rel(free_grads[name], other_grads[name], rel=1e-5, name=name)

    # the check can fail: one causal block over the whole row lets samples see each other
    leaky = dataclasses.replace(padding_free, cu_seq_lens=torch.tensor([0, sum(lengths)], dtype=torch.int32))
    with torch.no_grad():
        leaky_loss = causal_lm_loss(model, leaky).item()
    assert abs(leaky_loss - free_loss) > 1e-4 * free_loss
    model.eval()


def test_swiglu_mlps_give_the_plain_forward_and_gradients_bitwise(lora_tiny_model):
    """The switched MLPs (SiluMul, the down projection's input rebuilt in backward) against the
    same model with transformers' own MLP forward: the same loss and the same gradients, bit for bit."""
    model, tokenizer = lora_tiny_model
    plain = copy.deepcopy(model)
    switched = [m for m in plain.modules() if "forward" in m.__dict__]
    assert len(switched) == model.config.num_hidden_layers
    for module in switched:
        del module.forward
    batch = make_batch(speed_samples(tokenizer), 256, packing=True, pad_id=tokenizer.pad_token_id, padding_free=True)
    model.train(), plain.train()
    (loss, grads), (plain_loss, plain_grads) = loss_and_lora_grads(model, batch), loss_and_lora_grads(plain, batch)
    model.eval()
    assert loss == plain_loss and grads.keys() == plain_grads.keys()
    assert all(torch.equal(grads[name], plain_grads[name]) for name in grads)


def test_only_silu_mlps_with_llamas_forward_are_switched():
    from transformers.activations import GELUActivation

    from tunelab.models.swiglu import enable_swiglu

    model = tiny_llama(64)
    model.model.layers[0].mlp.act_fn = GELUActivation()
    assert enable_swiglu(model) == model.config.num_hidden_layers - 1


def test_causal_lm_loss_matches_full_logits_reference(lora_tiny_model):
    """The chunked head (tied to the embeddings) gives the loss and gradients of the full logits."""
    model, tokenizer = lora_tiny_model
    model.train()
    samples = speed_samples(tokenizer)
    batch = make_batch(samples, 64, packing=False, pad_id=tokenizer.pad_token_id)
    loss, grads = loss_and_lora_grads(model, batch)

    targets = batch.labels != IGNORE
    logits = model(**batch.model_inputs(), use_cache=False).logits[targets]
    reference = F.cross_entropy(logits.float(), batch.labels[targets], reduction="sum")
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close_rel(grads[name], p.grad, rel=1e-5, name=name)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_packed_attention_model_generates_like_sdpa():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    packed, sdpa = tiny_llama(len(tokenizer)), tiny_llama(len(tokenizer))
    assert enable_packed_attention(packed) and uses_packed_attention(packed)
    sdpa.set_attn_implementation("sdpa")
    assert not uses_packed_attention(sdpa)
    encoded = tokenizer(["Hello there, how are", "A much longer prompt that needs no padding at all"], return_tensors="pt", padding=True)
    assert (encoded.attention_mask[0] == 0).any()  # the first prompt really is left-padded

    outputs = []
    for model in (packed, sdpa):
        model.eval()
        with torch.no_grad():
            logits = model(**encoded).logits
            tokens = model.generate(**encoded, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs.append((logits, tokens))
    (packed_logits, packed_tokens), (sdpa_logits, sdpa_tokens) = outputs
    assert packed_tokens.shape == (2, encoded.input_ids.shape[1] + 12)
    assert torch.equal(packed_tokens, sdpa_tokens)
    real = encoded.attention_mask.bool()
    torch.testing.assert_close(packed_logits[real], sdpa_logits[real], rtol=1e-5, atol=1e-5)


# --- 4. splitting a micro-batch by tokens ------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 10, 64, 300])
@pytest.mark.parametrize("seed", [0, 1])
def test_split_by_tokens_groups_every_sample_once(max_tokens, seed):
    rng = random.Random(seed)
    samples = [{"input_ids": [7] * rng.randint(1, 100), "target_mask": [1]} for _ in range(40)]
    groups = split_by_tokens(samples, max_tokens)
    seen = [id(s) for group in groups for s in group]
    assert sorted(seen) == sorted(id(s) for s in samples)  # each sample exactly once, by identity
    for group in groups:
        assert group
        total = sum(len(s["input_ids"]) for s in group)
        assert total <= max_tokens or len(group) == 1
    if max_tokens >= 100:
        assert len(groups) < len(samples)  # it groups, not just one sample per forward


def test_split_by_tokens_zero_is_one_group():
    samples = [{"input_ids": [1] * n} for n in (5, 50, 500)]
    groups = split_by_tokens(samples, 0)
    assert len(groups) == 1 and [id(s) for s in groups[0]] == [id(s) for s in samples]
    assert split_by_tokens([], 0) == [[]]
    assert split_by_tokens([], 10) == []


# --- 5. the loss does not depend on how a step is run ------------------------------------------------


def test_resolve_tokens_per_forward():
    assert resolve_tokens_per_forward("auto", torch.device("cpu")) == 1024
    assert resolve_tokens_per_forward("auto", torch.device("cuda")) == 0
    assert resolve_tokens_per_forward("auto", torch.device("cuda:0")) == 0
    assert resolve_tokens_per_forward(0, torch.device("cpu")) == 0
    assert resolve_tokens_per_forward(64, torch.device("cuda")) == 64


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_records_data(tmp_path_factory.mktemp("records"), n_train=24, seed=0)


def run_once(output, train_file, train: dict, method: dict | None = None):
    config = tiny_run_config(output, train_file, method=method, train={"max_steps": 3, "batch_size": 4, "max_grad_norm": 1.0, **train})
    tunelab.train(config)
    return read_metrics(output), load_adapter(output)


@pytest.fixture(scope="module")
def baseline_run(module_cache, records, tmp_path_factory):
    """One forward per micro-batch, no checkpointing (packing on: the padding-free path)."""
    train_file, _ = records
    return run_once(tmp_path_factory.mktemp("baseline") / "run", train_file, {"max_tokens_per_forward": 0})


def assert_same_run(run, baseline) -> None:
    """Same per-step losses to float32 rounding, and adapters within 1e-5. Another split of a step
    sums in another order (~1e-7 relative per gradient); Adam divides by sqrt(v), so an entry with
    a near-zero gradient can move by a few 1e-8 more or less (seen: 5e-8). A real error (a
    per-forward mean, a lost gradient term) moves weights by O(lr) = 1e-3 and fails."""
    metrics, adapter = run
    base_metrics, base_adapter = baseline
    assert [m["step"] for m in metrics] == [m["step"] for m in base_metrics] == [1, 2, 3]
    for m, b in zip(metrics, base_metrics):
        assert m["tokens"] == b["tokens"] and m["target_tokens"] == b["target_tokens"]
        assert m["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert m["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert sorted(adapter) == sorted(base_adapter)
    moved = 0
    for name in base_adapter:
        torch.testing.assert_close(adapter[name], base_adapter[name], rtol=1e-5, atol=1e-5, msg=name)
        moved += int("lora_B" in name and bool(base_adapter[name].abs().max() > 0))
    assert moved  # training moved the adapter: the comparison is not of two untouched inits


def test_max_tokens_per_forward_does_not_change_training(tmp_path, records, baseline_run, monkeypatch):
    train_file, _ = records
    forwards = []
    real = causal_lm_module.causal_lm_loss

    def counting(model, batch):
        forwards.append(batch.n_tokens)
        return real(model, batch)

    monkeypatch.setattr(sft, "causal_lm_loss", counting)
    run = run_once(tmp_path / "split", train_file, {"max_tokens_per_forward": 64})
    assert len(forwards) == 3 * 4  # every ~300-token sample alone: 4 forwards a step
    assert_same_run(run, baseline_run)


def test_activation_checkpointing_does_not_change_training(tmp_path, records, baseline_run, monkeypatch):
    train_file, _ = records
    enabled = []
    real = loop._enable_activation_checkpointing
    monkeypatch.setattr(loop, "_enable_activation_checkpointing", lambda m: enabled.append(m) or real(m))
    run = run_once(tmp_path / "ckpt", train_file, {"max_tokens_per_forward": 0, "activation_checkpointing": True})
    assert len(enabled) == 1 and enabled[0].is_gradient_checkpointing
    assert_same_run(run, baseline_run)


def test_activation_checkpointing_with_dropout_recomputes_the_same_masks(tmp_path, records):
    """Recomputation must replay the forward's dropout masks (the RNG state is restored)."""
    train_file, _ = records
    runs = [run_once(tmp_path / f"ckpt-{on}", train_file, {"activation_checkpointing": on}, method={"dropout": 0.2}) for on in (False, True)]
    assert_same_run(runs[1], runs[0])


# --- 6. the allocator setting ------------------------------------------------------------------------


def test_keep_freed_memory_is_idempotent():
    first, second = keep_freed_memory(), keep_freed_memory()
    assert isinstance(first, bool) and isinstance(second, bool)
    assert first is True and second is True  # Linux with glibc: mallopt accepts both settings


def test_a_runs_peak_memory_leaves_out_what_an_earlier_run_freed():
    """Under keep_freed_memory, 800 MB freed by an earlier run (8 MB blocks, below the mmap
    threshold) stays in the process; reset_peak_memory hands it back, so a later run in the same
    process (a sequential sweep's next cell) does not count it in its peak."""
    keep_freed_memory()
    reset_peak_memory()
    before = peak_memory_mb()
    blocks = [torch.ones(2_000_000) for _ in range(100)]
    assert peak_memory_mb() > before + 700
    del blocks
    reset_peak_memory()
    assert peak_memory_mb() < before + 200


# --- bf16 copies of frozen weights (train.frozen_dtype) ----------------------------------------


def test_frozen_dtype_resolution(monkeypatch):
    from tunelab.train import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.resolve_frozen_dtype("float32", torch.float32, cpu) == torch.float32
    assert precision.resolve_frozen_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)  # AMX or AVX512-BF16
    assert precision.resolve_frozen_dtype("auto", torch.float32, cpu) == torch.bfloat16
    assert precision.resolve_frozen_dtype("auto", torch.bfloat16, cuda) == torch.bfloat16
    assert precision.resolve_frozen_dtype("auto", torch.float32, cuda) == torch.float32
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)  # without them bf16 is slower
    assert precision.resolve_frozen_dtype("auto", torch.float32, cpu) == torch.float32


def test_bf16_training_copy_leaves_weights_and_evaluation_exact():
    torch.manual_seed(0)
    model = tiny_llama(64)
    method = Lora(LoraOptions(r=4, alpha=8))
    method.attach(model)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            nn.init.normal_(module.lora_B.weight, std=0.02)
    ids = torch.randint(0, 64, (2, 12))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    keys = sorted(model.state_dict())
    assert method.store_frozen_weights(model, torch.bfloat16)
    assert sorted(model.state_dict()) == keys, "the training copy is not part of the saved state"
    assert all(m.base_layer.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, LoraLinear))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before), "evaluation uses the fp32 weights"
        model.train()
        trained_view = model(input_ids=ids).logits
    assert not torch.equal(trained_view, before), "training multiplies by the bf16 copy"
    assert norm_rel_error(trained_view, before) < 2e-2


def test_bf16_head_copy_serves_training_only_while_the_head_is_frozen_and_unchanged():
    """The output head computes on its bf16 training copy in training; evaluation, a head that
    trains and a head whose weight changed after the copy use the weight itself."""
    torch.manual_seed(0)
    model = tiny_llama(64)
    model.requires_grad_(False)
    samples = [{"input_ids": torch.randint(0, 64, (n,)).tolist(), "target_mask": [0] * 3 + [1] * (n - 3)} for n in (9, 14)]
    batch = make_batch(samples, 64, packing=False, pad_id=0)

    def loss(training: bool) -> torch.Tensor:
        model.train(training)
        with torch.no_grad():
            return causal_lm_loss(model, batch)

    exact = loss(False)
    assert causal_lm_module.store_head_weight(model, torch.bfloat16)
    assert loss(False) == exact, "evaluation uses the fp32 head"
    assert loss(True) != exact and norm_rel_error(loss(True), exact) < 2e-2, "training uses the bf16 copy"
    model.lm_head.weight.requires_grad_(True)
    assert loss(True) == exact, "a head that trains is never replaced by a copy"
    model.lm_head.weight.requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    changed = loss(False)
    assert loss(True) == changed, "a copy older than the weight is not used"


def test_bf16_frozen_weights_train_like_fp32(tmp_path, records):
    train_file, _ = records
    fp32_metrics, fp32_adapter = run_once(tmp_path / "fp32", train_file, {"frozen_dtype": "float32"})
    bf16_metrics, bf16_adapter = run_once(tmp_path / "bf16", train_file, {"frozen_dtype": "bfloat16"})
    for a, b in zip(bf16_metrics, fp32_metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)
    assert sorted(bf16_adapter) == sorted(fp32_adapter)
    assert all(t.dtype == torch.float32 for t in bf16_adapter.values()), "adapters stay fp32"
