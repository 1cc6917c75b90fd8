"""LoFiT (Yin et al. 2024, "LoFiT: Localized Fine-tuning on LLM Representations"): learned offsets
added to the outputs of a few task-specific attention heads.

z_l^i ∈ R^{d_head} is head i's output in layer l: its slice of the attention's per-head value output,
the input of o_proj (reshaped to (…, heads, d_head)). Two steps, both with the base model frozen:

1. Head selection (`prepare`, on the first training batches): every head gets a scaling vector A_l^i
   (zeros at init, so the model starts unchanged), z_l^i ← (1 + A_l^i) ⊙ z_l^i, trained for
   `select_steps` Adam steps (lr `select_lr`) on  L = L_LM / n_targets + λ Σ_{l,i} ‖A_l^i‖₁ .
   The K heads with the largest ‖A_l^i‖₂ are kept (K = `heads`, a count or a share of all heads;
   the paper's default is 3%). The scalings are then discarded: "only the tuned biases are used in
   the final model".
2. Bias tuning (the run): each selected head gets an offset v_l^i (zeros at init),
   z_l^i ← z_l^i + v_l^i.

Tensors: `lofit.lofit_bias` (K, d_head), the v_l^i of the selected heads in order of
`lofit.head_index` (K,), a saved buffer holding each selected head as l · heads + i; load_run and
resume read the selection from it. Trainable count: K · d_head.

Not mergeable: o_proj(z + v) = W_o z + W_o v needs a bias on o_proj, which Llama-family models do
not have (a plain Hugging Face checkpoint could not hold it).

Choices where the paper leaves room: A starts at zero rather than at random (deterministic, and
(1 + A) is the identity at init); the selection score is the L2 norm of A; ties go to the lower head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import Method, MethodOptions, decoder_layers


class LofitOptions(MethodOptions):
    name: Literal["lofit"] = "lofit"
    # How many heads get an offset: a count, or a share of all heads (the paper's 3%; at least one).
    heads: Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0.0, lt=1.0)] = 0.03
    # Head selection: Adam steps on the scalings A, their learning rate, and the L1 weight λ.
    select_steps: int = Field(default=8, ge=1)
    select_lr: float = Field(default=5e-3, gt=0.0)
    l1: float = Field(default=1e-3, ge=0.0)


class LofitHeads(nn.Module):
    """The selected heads (`head_index`, l · heads + i) and their offsets (`lofit_bias`)."""

    def __init__(self, layers: int, heads: int, head_dim: int, selected: int, device: torch.device):
        super().__init__()
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        # Until `prepare` chooses: the first heads (a placeholder that load_state_dict overwrites).
        self.register_buffer("head_index", torch.arange(selected, device=device))
        # fp32 even on a half-precision base: small offsets would round away in bf16.
        self.lofit_bias = nn.Parameter(torch.zeros(selected, head_dim, device=device, dtype=torch.float32))

    def offsets(self) -> torch.Tensor:
        """(layers, heads · d_head): v_l^i in the slots of the selected heads, zeros elsewhere."""
        table = self.lofit_bias.new_zeros(self.layers * self.heads, self.head_dim)
        return table.index_copy(0, self.head_index, self.lofit_bias).view(self.layers, -1)


class Lofit(Method):
    """LoFiT: learned offsets on the outputs of the few attention heads a short L1-scaled run selects."""

    name = "lofit"
    Options = LofitOptions

    @property
    def prepare_steps(self) -> int:
        return self.options.select_steps

    def attach(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        self.out_projections = [self._out_projection(model, layer) for layer in decoder_layers(model, self.name)]
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        total = len(self.out_projections) * heads
        selected = self.options.heads
        if isinstance(selected, float):
            selected = max(1, round(selected * total))
        elif selected > total:
            raise TunelabError(f"method.heads: {selected} is more than the model's {total} attention heads")
        device = self.out_projections[0].weight.device
        model.add_module("lofit", LofitHeads(len(self.out_projections), heads, head_dim, selected, device))
        heads_module = model.lofit
        edit_head_outputs(self.out_projections, lambda layer, z: z + heads_module.offsets()[layer])

    def _out_projection(self, model: nn.Module, layer: str) -> nn.Module:
        for name in (f"{layer}.self_attn.o_proj", f"{layer}.attn.o_proj"):
            try:
                return model.get_submodule(name)
            except AttributeError:
                continue
        raise TunelabError(f"method '{self.name}': {type(model).__name__}'s decoder layer {layer} has no attention o_proj")

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The offsets, plus which heads they belong to."""
        return {**super().state_dict(model), "lofit.head_index": model.lofit.head_index}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        heads = model.lofit
        index = state.get("lofit.head_index")
        if index is None:
            raise TunelabError(f"{source}: no 'lofit.head_index' (which heads were selected) among the weights")
        if index.shape != heads.head_index.shape or not (0 <= index.min() and index.max() < heads.layers * heads.heads):
            raise TunelabError(f"{source}: 'lofit.head_index' {index.tolist()} does not select {heads.head_index.numel()} of this model's {heads.layers * heads.heads} heads")
        super().load_state_dict(model, {k: v for k, v in state.items() if k != "lofit.head_index"}, source)
        heads.head_index.copy_(index)

    def prepare(self, model: nn.Module, batches: list, loss_fn) -> None:
        """Step 1: train a scaling per head with an L1 penalty, keep the K largest by norm."""
        heads = model.lofit
        scaling = torch.zeros(heads.layers, heads.heads, heads.head_dim, device=heads.lofit_bias.device, requires_grad=True)
        optimizer = torch.optim.Adam([scaling], lr=self.options.select_lr)
        flat = scaling.view(heads.layers, -1)
        handles = edit_head_outputs(self.out_projections, lambda layer, z: z * (1 + flat[layer]))
        try:
            for step in range(self.options.select_steps):
                batch = batches[step % len(batches)]
                loss = loss_fn(model, batch) / batch.n_targets + self.options.l1 * scaling.abs().sum()
                # Gradients of the scalings only: the offsets (zero here) keep no gradient from this.
                (scaling.grad,) = torch.autograd.grad(loss, [scaling])
                optimizer.step()
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            heads.head_index.copy_(top_heads(scaling.detach().flatten(0, 1).norm(dim=1), heads.head_index.numel()))


def top_heads(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring heads, in ascending order (ties: the lower index wins)."""
    ranked = torch.argsort(scores, descending=True, stable=True)[:k]
    return ranked.sort().values


def edit_head_outputs(out_projections: list[nn.Module], edit: Callable[[int, torch.Tensor], torch.Tensor]) -> list:
    """Pre-hooks on each layer's o_proj that replace its input z (…, heads · d_head) by
    edit(layer, z), computed in fp32 or wider and cast back; the hooks' handles."""

    def hook(layer: int, module: nn.Module, args: tuple) -> tuple:
        z = args[0]
        return (edit(layer, z.to(torch.promote_types(z.dtype, torch.float32))).to(z.dtype), *args[1:])

    return [projection.register_forward_pre_hook(lambda module, args, layer=layer: hook(layer, module, args)) for layer, projection in enumerate(out_projections)]
