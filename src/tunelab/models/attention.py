"""Padding-free attention for packed batches.

A packed batch is one row holding several samples back to back, with their boundaries in
`cu_seq_lens_q` (cumulative lengths, as flash-attention names them) or, failing that, where its
`position_ids` restart at 0. Each sample attends causally within itself through torch's SDPA (its
CPU flash kernel: no mask, no padding, no repeated KV heads), and no (tokens x tokens) mask is
ever built. Calls with a padding mask (generation, padded batches) are plain SDPA, so a model
with this attention set behaves exactly as with `sdpa` everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED = "tunelab_packed"
# The model input that gives each packed sample the span of the row it also attends to (a prompt
# its pair shares: data/batching.py's make_shared_prefix_batch).
PREFIX_SPANS = "shared_prefix_spans"


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    bounds = _sample_bounds(query, attention_mask, kwargs)
    if bounds is None and attention_mask is None and query.shape[2] > 1 and key.shape[2] > query.shape[2]:
        bounds = [0, query.shape[2]]  # one sample after cached entries (prefix tuning's virtual keys)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    shared_spans = kwargs.get(PREFIX_SPANS) or [None] * (len(bounds) - 1)
    return _attend_samples(query, key, value, bounds, shared_spans, dropout if module.training else 0.0, scaling), None


def _attend_samples(query, key, value, bounds: list[int], shared_spans: list, dropout: float, scaling) -> torch.Tensor:
    """Causal attention within each sample of a packed row, as (1, tokens, heads, head_dim).
    query: (1, heads, tokens, head_dim); key and value may have fewer (grouped) heads, and may
    start with `prefix` entries every sample sees (prefix tuning's virtual keys, in the cache).
    A sample may also see a shared span of the row before it (its prompt, computed once:
    data/batching.py's make_shared_prefix_batch)."""
    grouped = query.shape[1] != key.shape[1]
    prefix = key.shape[2] - query.shape[2]
    outputs = []
    for start, end, shared in zip(bounds[:-1], bounds[1:], shared_spans):
        seen = ([(0, prefix)] if prefix else []) + ([(prefix + shared[0], prefix + shared[1])] if shared else [])
        spans = seen + [(prefix + start, prefix + end)]
        keys = torch.cat([key[:, :, a:b] for a, b in spans], dim=2) if seen else key[:, :, prefix + start : prefix + end]
        values = torch.cat([value[:, :, a:b] for a, b in spans], dim=2) if seen else value[:, :, prefix + start : prefix + end]
        mask = None
        if seen:
            causal = torch.ones(end - start, end - start, dtype=torch.bool, device=query.device).tril()
            mask = torch.cat([causal.new_ones(end - start, keys.shape[2] - (end - start)), causal], dim=1)
        outputs.append(
            F.scaled_dot_product_attention(query[:, :, start:end], keys, values, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling, enable_gqa=grouped)
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def _sample_bounds(query, attention_mask, kwargs) -> list[int] | None:
    """Where the samples of a packed row start and end; None for anything that is not a packed row."""
    if kwargs.get("cu_seq_lens_q") is not None:
        return kwargs["cu_seq_lens_q"].tolist()
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] == 1:
        return None
    starts = (position_ids == 0).nonzero()
    if len(starts) <= position_ids.shape[0]:  # at most one sample per row: plain causal attention
        return None
    if position_ids.shape[0] != 1:
        raise ValueError(f"{PACKED} attention: several rows of packed samples need cu_seq_lens_q; pack them into one row")
    return starts[:, 1].tolist() + [position_ids.shape[1]]


def packed_mask(*args, attention_mask=None, **kwargs):
    """No mask for unpadded input (the attention above finds the samples); sdpa's mask otherwise."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED, packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, packed_mask)


def enable_packed_attention(model) -> bool:
    """Switch `model` to padding-free packed attention where that is exact; True if it now uses it.

    Left alone: models that cannot take a custom attention function, and those whose attention
    is not plain causal softmax (sliding windows, logit softcapping).
    """
    config = model.config
    if not getattr(model, "_supports_attention_backend", False):
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attn_logit_softcapping", None):
        return False
    if not getattr(config, "is_decoder", True) or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        model.set_attn_implementation(PACKED)
    except (ValueError, ImportError):
        return False
    return uses_packed_attention(model)


def uses_packed_attention(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == PACKED
