"""GGUF out: a (merged) Llama-family model or a LoRA adapter as llama.cpp reads them.

The layout is the one llama.cpp's own converters write (convert_hf_to_gguf.py, and
convert_lora_to_gguf.py for `--lora` adapters), written with the `gguf` package:
- tensor names from gguf's name map for the architecture (`blk.N.attn_q.weight`, ...); a tied
  output head is not written (llama.cpp reuses `token_embd`);
- the query and key rows permuted per head from Hugging Face's rotate-half rotary layout to GGML's
  interleaved pairs (for an adapter: the rows of B, since permuting W's rows permutes ΔW = BA's);
- norms (1-D tensors) in f32, matrices in the chosen type;
- the tokenizer: tokens and their types, merges, the pre-tokenizer's name, special tokens, the chat
  template; the hyperparameters under `llama.*`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from tunelab.console import console
from tunelab.errors import TunelabError

GGUF_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# Hugging Face model types whose checkpoints llama.cpp reads as its `llama` architecture.
LLAMA_TYPES = ("llama", "mistral")
# llama.cpp's pre-tokenizer names for the Hugging Face pre-tokenizers we recognize (its converter
# identifies them by hashing their output; a model converted from GGUF keeps its file's name).
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
KNOWN_PRE_TOKENIZERS = {
    json.dumps(BYTE_LEVEL, sort_keys=True): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}, sort_keys=True): "smollm",
}


def check_llama_family(model: nn.Module) -> None:
    config = model.config
    if config.model_type not in LLAMA_TYPES:
        raise TunelabError(f"--format gguf: '{config.model_type}' models are not supported yet (Llama-family only: {', '.join(LLAMA_TYPES)})")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TunelabError(f"--format gguf: rope scaling '{rope.get('rope_type')}' is not supported yet")


def permute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query/key projection (or of its LoRA B) from HF's per-head [first halves; second
    halves] rotary layout to GGML's interleaved (x0, x1) pairs."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _rotary_heads(name: str, config) -> int | None:
    """How many heads a projection's rows hold if it is a query or key projection, else None."""
    if name.endswith("q_proj"):
        return config.num_attention_heads
    if name.endswith("k_proj"):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def _gguf_name(name_map, hf_name: str) -> str:
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise TunelabError(f"--format gguf: no GGUF tensor name for '{hf_name}'")
    return mapped


def _new_writer(path: Path, file_kind: gguf.GGUFType, name: str, config):
    """A llama-architecture GGUF writer of a model or an adapter, and the tensor name map for `config`."""
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(file_kind)
    writer.add_name(name)
    return writer, gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def _add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, gguf_type: str) -> None:
    """A tensor as the file stores it: 1-D tensors and rows a block does not divide in f32."""
    data = tensor.detach().float().cpu().numpy()
    qtype = GGUF_TYPES[gguf_type][0]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.ndim == 1 or data.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype == gguf.GGMLQuantizationType.F16:
        data = data.astype(np.float16)
    elif qtype != gguf.GGMLQuantizationType.F32:
        data = gguf.quants.quantize(data, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)


def write_model(model: nn.Module, tokenizer, path: Path, gguf_type: str, name: str, pre_tokenizer: str | None) -> None:
    """A plain (merged) Llama-family model and its tokenizer as one GGUF file at `path`."""
    check_llama_family(model)
    if model.get_output_embeddings() is None:
        raise TunelabError("--format gguf: this model has no language-model head (a reward model?): llama.cpp cannot run it")
    config = model.config
    writer, name_map = _new_writer(path, gguf.GGUFType.MODEL, name, config)
    _add_hyperparameters(writer, config)
    writer.add_file_type(GGUF_TYPES[gguf_type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp computes the output with token_embd when there is no output tensor
        heads = _rotary_heads(hf_name.removesuffix(".weight").removesuffix(".bias"), config)  # biases permute as rows
        if heads is not None:
            tensor = permute_rotary_rows(tensor, heads)
        # A tied embedding is the output head too: llama.cpp's quantizer keeps it at 8 bits.
        tensor_type = "q8_0" if gguf_type == "q4_0" and tied and hf_name.endswith("embed_tokens.weight") else gguf_type
        _add_tensor(writer, _gguf_name(name_map, hf_name), tensor, tensor_type)
    _finish(writer)


def write_lora(model: nn.Module, adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]], path: Path, name: str) -> None:
    """A LoRA adapter as llama.cpp's `--lora` reads it: `<tensor>.lora_a` (r × in) and
    `<tensor>.lora_b` (out × r) per adapted weight, f32, with one `adapter.lora.alpha` such that
    alpha / r is the adapter's scale. `adapters` maps a linear layer's name to (A, B, scale)."""
    check_llama_family(model)
    config = model.config
    ranks = {a.shape[0] for a, _, _ in adapters.values()}
    scales = {scale for _, _, scale in adapters.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise TunelabError(f"--format gguf-adapter: llama.cpp takes one rank and one alpha per adapter file; this adapter has ranks {sorted(ranks)} and scales {sorted(scales)}")
    (rank,), (scale,) = ranks, scales
    writer, name_map = _new_writer(path, gguf.GGUFType.ADAPTER, name, config)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * rank)  # rsLoRA's 1/√r folded in too
    for layer_name, (lora_a, lora_b, _) in adapters.items():
        heads = _rotary_heads(layer_name, config)
        if heads is not None:
            lora_b = permute_rotary_rows(lora_b, heads)
        tensor_name = _gguf_name(name_map, layer_name + ".weight")
        _add_tensor(writer, tensor_name + ".lora_a", lora_a, "f32")
        _add_tensor(writer, tensor_name + ".lora_b", lora_b, "f32")
    _finish(writer)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _add_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre_tokenizer: str | None) -> None:
    """A byte-level BPE tokenizer (tokenizer.ggml.model gpt2), as llama.cpp's converter writes one."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise TunelabError(f"--format gguf: only BPE tokenizers are supported yet (this one is {backend['model']['type']})")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise TunelabError(f"--format gguf: the tokenizer has {len(vocab)} tokens, more than the model's {vocab_size} embeddings")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # embedding rows no token uses
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    if pre_tokenizer is None:
        pre_tokenizer = KNOWN_PRE_TOKENIZERS.get(json.dumps(backend.get("pre_tokenizer"), sort_keys=True))
    if pre_tokenizer is None:
        pre_tokenizer = "default"
        console.print("[yellow]--format gguf: unrecognized pre-tokenizer; llama.cpp will split text with its default pattern[/yellow]")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_add_space_prefix(bool((backend.get("pre_tokenizer") or {}).get("add_prefix_space", False)))
    merges = bool(backend["model"].get("merges"))
    with tempfile.TemporaryDirectory() as folder:  # gguf reads merges, special ids and template from files
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=vocab_size)
    # Whether encoding starts with BOS, as the tokenizer does it (its config may not say).
    bos = tokenizer.bos_token_id
    special.add_special_token["bos"] = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    special.add_to_gguf(writer, quiet=True)
    if not merges:  # a byte-level vocabulary without merges (llama.cpp still expects the key)
        writer.add_token_merges([])
