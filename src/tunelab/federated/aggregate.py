"""The server's arithmetic, on plain tensors: clients' weights p_k = n_k / Σ n, FedAvg's weighted
mean, FLoRA's stacking, and the bytes a set of tensors takes on the wire.

FedAvg averages every trained tensor: on LoRA that averages the A's and the B's apart (FedIT), and
Σ p_k B_k · Σ p_k A_k is not Σ p_k B_k A_k: the cross terms p_j p_k B_j A_k (j ≠ k) enter and each
client's own product is weighted by p_k² instead of p_k. FLoRA stacks the factors instead (A_k
along the rank, p_k·s_k·B_k side by side), whose product is exactly Σ p_k s_k B_k A_k; the global
rank is the sum of the clients'.
"""

from __future__ import annotations

import torch

from tunelab.errors import TunelabError
from tunelab.merging.tensors import stack_lora_factors

# Names of a stacked LoRA update in a safetensors file: `<layer>.lora_A.weight`, `<layer>.lora_B.weight`
# (as a LoRA adapter names its factors; the scale is folded into B).
FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def client_weights(examples: list[int]) -> list[float]:
    """p_k = n_k / Σ n."""
    total = sum(examples)
    if total <= 0:
        raise TunelabError("the round's clients hold no examples")
    return [n / total for n in examples]


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float], trained: list[str], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The new global state: each tensor of `trained` the weighted mean Σ p_k t_k of the clients'
    (summed in float64, clients in order, then cast back); every other tensor of `start` (state
    that does not train, such as PiSSA's initial factors) as it was."""
    merged = {}
    for name, tensor in start.items():
        if name not in trained:
            merged[name] = tensor
            continue
        missing = [k for k, state in enumerate(states) if name not in state]
        if missing:
            raise TunelabError(f"client {missing[0]} of the round sent no tensor '{name}'")
        total = torch.zeros(tensor.shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            total += state[name].to(torch.float64) * weight
        merged[name] = total.to(tensor.dtype)
    return merged


def flora_stack(factors: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The round's update as one stacked LoRA per layer (`stack_lora_factors`): B·A = Σ p_k s_k B_k A_k
    exactly; `factors`: each client's layer -> (A_k, B_k, s_k). Named by FACTOR_SUFFIXES."""
    stacked = {}
    for layer in factors[0]:
        a, b = stack_lora_factors([client[layer] for client in factors], weights)
        stacked[layer + FACTOR_SUFFIXES[0]], stacked[layer + FACTOR_SUFFIXES[1]] = a.contiguous(), b.contiguous()
    return stacked


def stacked_layers(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (A, B) of a stacked update (`flora_stack`'s naming)."""
    a_suffix, b_suffix = FACTOR_SUFFIXES
    return {name.removesuffix(a_suffix): (tensor, state[name.removesuffix(a_suffix) + b_suffix]) for name, tensor in state.items() if name.endswith(a_suffix)}


def concatenate(rounds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several stacked updates as one: their A's along the rank, their B's side by side (the sum of
    their products, the global model's update after those rounds)."""
    layers = [stacked_layers(state) for state in rounds]
    joined = {}
    for layer in layers[0]:
        joined[layer + FACTOR_SUFFIXES[0]] = torch.cat([update[layer][0] for update in layers], dim=0)
        joined[layer + FACTOR_SUFFIXES[1]] = torch.cat([update[layer][1] for update in layers], dim=1)
    return joined


def stacked_rank(state: dict[str, torch.Tensor]) -> int:
    return next(iter(stacked_layers(state).values()))[0].shape[0] if state else 0


def fold(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """W += B·A for every layer of a stacked update (in float32 at least, rounded to W's dtype)."""
    with torch.no_grad():
        for layer, (a, b) in stacked_layers(state).items():
            weight = model.get_submodule(layer).weight
            compute = torch.promote_types(weight.dtype, torch.float32)
            weight.copy_((weight.to(compute) + b.to(compute) @ a.to(compute)).to(weight.dtype))


def nbytes(tensors) -> int:
    """The bytes of these tensors' values (what sending them takes, before any compression)."""
    return sum(t.numel() * t.element_size() for t in tensors)
