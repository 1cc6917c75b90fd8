"""`model.quantize`: the frozen weights of the decoder's linear layers stored in 4 bits (NF4 with
double quantization, as QLoRA) or 8 bits (weight-only int8, one scale per output row).

torchao holds the quantized tensors (its NF4Tensor and Int8Tensor: one pure-PyTorch code path for
CPU and CUDA, and the NF4 tensor is the one FSDP2 can shard). A quantized layer becomes a
`QuantizedLinear`: still an `nn.Linear`, so every method targets and wraps it as any linear layer,
whose forward dequantizes the weight for its matmul and again in backward, keeping only the
quantized weight in between (the memory saving is the point). The embeddings, norms and output
head stay in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.models.modules import replace_module

NF4_BLOCK = 64  # weights per absmax scale (QLoRA's block)
NF4_SCALER_BLOCK = 256  # scales per double-quantization block (QLoRA's); shapes it does not divide use a divisor


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is one of torchao's quantized tensors (without importing torchao)."""
    return type(tensor).__module__.startswith("torchao.")


def dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight in `dtype` (default: the dtype it was quantized from); a dense tensor as it is."""
    if not is_quantized(weight):
        return weight if dtype is None else weight.to(dtype)
    target = dtype or weight.dtype
    if type(weight).__name__ == "NF4Tensor":
        dense = _dequantize_nf4(weight)
    else:
        dense = weight.dequantize()
    return dense.to(target)


def _dequantize_nf4(weight) -> torch.Tensor:
    """torchao's NF4Tensor.get_original_weight, equal to it bitwise, in one table lookup: each byte
    (two 4-bit codes) indexes a 256-row table of value pairs, then each block is scaled. Several
    times faster than torchao's per-nibble path on CPU, and dequantization runs twice a step."""
    table = weight.nf4
    pairs = torch.stack(torch.meshgrid(table, table, indexing="ij"), dim=-1).reshape(256, 2)
    values = F.embedding(weight.quantized_data.int(), pairs)
    scalers = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size)
    return (values.view(-1, weight.block_size) * scalers[:, None]).view(weight.shape)


def storage_bytes(weight: torch.Tensor) -> int:
    """Bytes a (quantized) weight occupies: its inner tensors for torchao's, else its own."""
    if not is_quantized(weight):
        return weight.numel() * weight.element_size()
    names, _ = weight.__tensor_flatten__()
    return sum(getattr(weight, name).numel() * getattr(weight, name).element_size() for name in names)


def nf4_scaler_block(numel: int) -> int | None:
    """The double-quantization block for a weight of `numel` values: QLoRA's 256 scales where it
    divides the number of blocks, else the largest divisor below it; None if NF4's block of 64
    does not divide the weight."""
    if numel % NF4_BLOCK:
        return None
    blocks = numel // NF4_BLOCK
    return next(size for size in range(min(NF4_SCALER_BLOCK, blocks), 0, -1) if blocks % size == 0)


def quantize_weight(weight: torch.Tensor, scheme: str) -> torch.Tensor | None:
    """`weight` quantized with `scheme`, or None when its shape does not fit the scheme's blocks."""
    if scheme == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        scaler_block = nf4_scaler_block(weight.numel())
        return None if scaler_block is None else to_nf4(weight.detach().contiguous(), NF4_BLOCK, scaler_block)
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow

    return Int8Tensor.from_hp(weight.detach(), PerRow())


def quantize_like(reference: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """`dense` quantized as `reference` is (a method that rewrites a quantized base weight)."""
    return quantize_weight(dense.to(reference.dtype), "nf4" if type(reference).__name__ == "NF4Tensor" else "int8")


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear on a frozen weight, dense or quantized, computed in `dtype` (default: the weight's)."""
    dtype = dtype or weight.dtype
    if not is_quantized(weight) and x.dtype == weight.dtype == dtype:
        return F.linear(x, weight, bias)  # autograd's own path (a weight gradient, should one be asked for)
    return FrozenLinearFunction.apply(x, weight, bias, dtype)


class QuantizedLinear(nn.Linear):
    """A linear layer whose frozen weight is quantized. In training it may compute in a faster
    matmul dtype than the weight's (`compute_dtype`, from train.frozen_dtype); evaluation computes
    in the weight's own dtype."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias
        self.compute_dtype: torch.dtype | None = None

    @property
    def matmul_dtype(self) -> torch.dtype:
        return self.compute_dtype if self.training and self.compute_dtype is not None else self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias, self.matmul_dtype)

    def dequantized(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A plain nn.Linear holding `weight` (default: this layer's weight, dequantized)."""
        dense = dequantize(self.weight) if weight is None else weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=dense.device, dtype=dense.dtype)
        linear.weight = nn.Parameter(dense.detach(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantized={type(self.weight).__name__}"


class FrozenLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b on a frozen W, computed in `dtype`. A quantized W is dequantized in forward and
    again in backward (for the input gradient), so a step holds one layer's dense weight at a time."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        dense = dequantize(weight, dtype)
        y = F.linear(x.to(dtype), dense, None if bias is None else bias.to(dtype)).to(x.dtype)
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out.to(ctx.dtype) @ dequantize(weight, ctx.dtype)).to(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


@dataclass
class QuantizeReport:
    scheme: str
    layers: int = 0  # linear layers quantized
    params: int = 0  # their weights' parameter count
    bytes: int = 0  # what those weights occupy now
    kept: list[str] = field(default_factory=list)  # linear layers whose shape does not fit the scheme

    def summary(self) -> str:
        per_param = self.bytes / max(self.params, 1)
        kept = f"; {len(self.kept)} kept in the model's dtype (shape does not fit the blocks): {', '.join(self.kept[:3])}" if self.kept else ""
        return f"model.quantize {self.scheme}: {self.layers} linear layers, {self.params / 1e6:.1f}M weights at {per_param:.3f} bytes each{kept}"

    def as_dict(self) -> dict:
        return {"scheme": self.scheme, "layers": self.layers, "params": self.params, "bytes": self.bytes, "kept": self.kept}


def output_head(model: nn.Module) -> set[str]:
    """The name of the model's output head (it stays in the model's dtype), if it has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def quantize_linears(model: nn.Module, scheme: str, excluded: set[str] | None = None) -> QuantizeReport:
    """Replace every nn.Linear of `model` whose shape fits `scheme` by a QuantizedLinear, except
    `excluded` (default: the output head)."""
    excluded = output_head(model) if excluded is None else excluded
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name in excluded:
            continue
        quantized = quantize_weight(module.weight, scheme)
        if quantized is not None:
            replace_module(model, name, QuantizedLinear(module, quantized))
    return quantization_report(model, scheme, excluded)


def quantization_report(model: nn.Module, scheme: str, excluded: set[str] | None = None) -> QuantizeReport:
    """What `quantize_linears` did to `model` (before a method adds linear layers of its own)."""
    excluded = output_head(model) if excluded is None else excluded
    report = QuantizeReport(scheme)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            report.layers += 1
            report.params += module.weight.numel()
            report.bytes += storage_bytes(module.weight)
        elif type(module) is nn.Linear and name not in excluded:
            report.kept.append(name)
    return report


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def dequantize_linears(model: nn.Module) -> int:
    """Replace every QuantizedLinear by a plain nn.Linear holding its dequantized weight; the count."""
    layers = quantized_layers(model)
    for name, layer in layers.items():
        replace_module(model, name, layer.dequantized())
    return len(layers)


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> bool:
    """Training matmuls of the quantized layers in `dtype`; True if the model has any."""
    layers = quantized_layers(model).values()
    for layer in layers:
        layer.compute_dtype = dtype
    return bool(layers)
