"""SwiGLU feed-forward blocks that keep less for backward.

A Llama-style MLP computes down(silu(gate(x)) * up(x)). Left to autograd, the product keeps both
of its factors, silu(gate) and up, and silu keeps gate; an adapter on the down projection (LoRA's
A gradient) keeps the product too: four (tokens x intermediate) tensors per layer, the largest
activations of a step. `SiluMul` keeps gate and up only and recomputes the silu in backward, and
whatever the down projection keeps of the product is recomputed from gate and up when backward
reads it (one elementwise pass each): about a third of a Llama layer's activations, with the same
values and the same gradient kernels. `load_model` switches every MLP whose forward is exactly
Llama's (Mistral's, Qwen2's and others copy it) with a SiLU activation; others are left alone.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP

from tunelab.models.quantize import is_quantized


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        activated = F.silu(gate)
        ctx.save_for_backward(gate, up)
        return activated.mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = SiluMul.apply(gate, up)
    if not product.requires_grad:
        return self.down_proj(product)
    storage = product.untyped_storage().data_ptr()

    def pack(saved: torch.Tensor):
        if is_quantized(saved) or saved.untyped_storage().data_ptr() != storage:  # a quantized weight has no storage of its own
            return saved
        return saved.shape, saved.stride(), saved.storage_offset()  # a view of the product: rebuilt

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        shape, stride, offset = packed
        with torch.no_grad():
            return (F.silu(gate) * up).as_strided(shape, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(product)


def _computes_llama_mlp(module: torch.nn.Module) -> bool:
    forward = type(module).forward
    llama = LlamaMLP.forward.__code__
    return (
        isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU))
        and all(isinstance(getattr(module, name, None), torch.nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
        and getattr(forward, "__code__", None) is not None
        and (forward.__code__.co_code, forward.__code__.co_names) == (llama.co_code, llama.co_names)
    )


def enable_swiglu(model: torch.nn.Module) -> int:
    """Switch the model's Llama-style MLPs to `SiluMul`; returns how many."""
    switched = 0
    for module in model.modules():
        if _computes_llama_mlp(module):
            module.forward = types.MethodType(_swiglu_forward, module)
            switched += 1
    return switched
