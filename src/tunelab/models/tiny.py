"""`tiny-random-llama`: a seeded 2-layer random Llama with a byte-level tokenizer, built in-process.

For tests and smoke runs: no download, a few hundred thousand parameters, deterministic.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every byte is one token, so any text round-trips."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    # alphabet() comes in a different order on every call: sort it, or each tokenizer built would
    # map bytes to different ids (a saved run would not match its reloaded tokenizer).
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=4096)


def tiny_llama(vocab_size: int, seed: int = 1234) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    # A private RNG stream: building the model must not move the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = "tiny-random-llama"
    return model
