"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): during
training, uniform noise on the input embeddings,

    X ← X + ε · α / √(L · d),   ε ~ U(−1, 1) elementwise,

X the (tokens × d) embeddings of one sample, L its length in tokens, d the embedding width.

L is each sample's own length, as the paper defines it: in a packed row (several samples, positions
restarting at 0 for each) every sample gets its own L, and in a padded row L excludes the padding
(TRL and transformers take the padded row width instead). The lengths are read from `position_ids`
(a token's sample runs from the last position 0 on); without them a row counts as one sample.

It is a pre-hook on the model's backbone, registered first: it replaces `input_ids` by the noisy
`inputs_embeds` before any method's hook runs, so virtual-token methods (prompt tuning) put their
noise-free learned tokens around noisy real ones. The noise is drawn from the torch RNG the loop
seeds and checkpoints (resume stays exact), and only while the backbone is in training mode: eval
loss and generation (model.eval()) never see it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tunelab.errors import TunelabError


def add_embedding_noise(model: nn.Module, alpha: float) -> RemovableHandle:
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None or backbone is model:
        raise TunelabError(f"train.neftune_alpha: cannot find the backbone of {type(model).__name__}")
    embedding = backbone.get_input_embeddings()

    def noisy_embeddings(module, args, kwargs):
        if not module.training:
            return None
        if args:
            raise TunelabError("train.neftune_alpha: call the model with keyword arguments")
        ids = kwargs.pop("input_ids", None)
        embeds = embedding(ids) if ids is not None else kwargs["inputs_embeds"]
        lengths = sample_lengths(kwargs.get("position_ids"), embeds.shape[:2], embeds.device)
        scale = alpha / torch.sqrt(lengths * embeds.shape[-1]).to(embeds.dtype)
        kwargs["inputs_embeds"] = embeds + torch.empty_like(embeds).uniform_(-1, 1) * scale[..., None]
        return args, kwargs

    return backbone.register_forward_pre_hook(noisy_embeddings, with_kwargs=True, prepend=True)


def sample_lengths(position_ids: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """(rows, length) float: the length of the sample each token belongs to. Padding (position 0,
    see data/batching.py) counts as samples of length 1; nothing attends to it."""
    rows, width = shape
    if position_ids is None:
        return torch.full((rows, width), float(width), device=device)
    position_ids = position_ids.expand(rows, width)
    # A distinct number per (row, sample): the count of sample starts so far, offset per row.
    sample = (position_ids == 0).cumsum(dim=1) + (width + 1) * torch.arange(rows, device=device)[:, None]
    return torch.bincount(sample.flatten())[sample].float()
