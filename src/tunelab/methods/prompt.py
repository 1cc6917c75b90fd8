"""Virtual-token methods: the model reads n learned vectors before every sample.

- `prompt_tuning` (Lester et al. 2021): n trainable input embeddings, initialized randomly or from
  the embeddings of a text.
- `prefix_tuning` (Li & Liang 2021; P-tuning v2, Liu et al. 2022): n trainable keys and values in
  every attention layer, optionally produced by a two-layer MLP during training (reparameterization).

Both leave the weights untouched, so neither can be merged. They work by two hooks on the model's
backbone. Before it runs: prompt tuning inserts the n embeddings before each sample (each sample of
a padding-free packed row, or the start of each row), prefix tuning puts the n keys/values into the
KV cache; both then shift positions by n and widen the attention mask, as peft does. After it runs,
prompt tuning drops the virtual positions from the hidden states, so the outputs stay aligned with
the caller's tokens and the loss code does not change. During generation the cache holds the n
virtual entries, and every later step gets the same shift.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import DynamicCache

from tunelab.config.schema import ModelConfig
from tunelab.errors import TunelabError
from tunelab.methods.base import Method, MethodOptions, cache_argument, reject_peft_settings
from tunelab.models.loader import load_tokenizer


class PromptTuningOptions(MethodOptions):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(default=20, ge=1)
    # "random": N(0, 1) as peft's default; "text": the embeddings of `init_text`'s tokens, repeated
    # to n (Lester et al. found this trains better than random).
    init: Literal["random", "text"] = "random"
    init_text: str | None = None


class PrefixTuningOptions(MethodOptions):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(default=20, ge=1)
    # P-tuning v2 / Li & Liang's reparameterization: train an MLP that maps n small embeddings to
    # the prefixes (more stable); after training only its output is needed.
    projection: bool = False
    projection_hidden: int | None = Field(default=None, ge=1, description="MLP width (default: the key/value width)")


class VirtualTokenMethod(Method):
    """Shared machinery: the backbone hooks and the bookkeeping of n extra positions."""

    module_name: ClassVar[str]  # where the trainable module sits on the model
    inserts_tokens: ClassVar[bool]  # prompt tuning adds sequence positions; prefix tuning only cache entries
    shares_prefixes = False  # its virtual tokens sit at each sample's start

    def attach(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        backbone = getattr(model, model.base_model_prefix, None)
        if backbone is None or backbone is model:
            raise TunelabError(f"method '{self.name}': cannot find the backbone of {type(model).__name__}")
        model.add_module(self.module_name, self.build_module(model))
        self._inserted_at: torch.Tensor | None = None  # positions of the caller's tokens, when inserted
        backbone.register_forward_pre_hook(self._before_backbone, with_kwargs=True)
        backbone.register_forward_hook(self._after_backbone)
        self.model = model

    def build_module(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    @property
    def n(self) -> int:
        return self.options.num_virtual_tokens

    def _before_backbone(self, backbone, args, kwargs):
        if args:
            raise TunelabError(f"method '{self.name}': call the model with keyword arguments")
        cache_key = cache_argument(backbone, kwargs)
        cache = kwargs.get(cache_key)
        first_pass = cache is None or cache.get_seq_length() == 0
        self._inserted_at = None
        if first_pass and self.inserts_tokens:
            return args, self._insert_prompt(backbone, kwargs)
        if first_pass:
            kwargs[cache_key] = self._prefix_cache(backbone, kwargs, cache)
        return args, _shift_for_virtual_entries(kwargs, self.n)

    def _after_backbone(self, backbone, args, output):
        if self._inserted_at is not None:
            output.last_hidden_state = output.last_hidden_state[:, self._inserted_at]
            self._inserted_at = None
        return output

    def _insert_prompt(self, backbone, kwargs: dict) -> dict:
        ids, embeds = kwargs.pop("input_ids", None), kwargs.get("inputs_embeds")
        embeds = backbone.get_input_embeddings()(ids) if embeds is None else embeds
        prompt = self.prompt_embeddings().to(embeds.dtype)
        n, (rows, length) = self.n, embeds.shape[:2]
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:  # a padding-free packed row: n virtual tokens before each sample
            bounds = cu.tolist()
            pieces, positions, kept = [], [], []
            for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
                pieces += [prompt, embeds[0, start:end]]
                positions.append(torch.arange(n + end - start))
                kept.append(torch.arange(start, end) + n * (k + 1))
            kwargs["inputs_embeds"] = torch.cat(pieces)[None]
            kwargs["position_ids"] = torch.cat(positions)[None].to(embeds.device)
            shifted = cu + n * torch.arange(len(bounds), dtype=cu.dtype)
            for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
                if key in kwargs:
                    kwargs[key] = shifted
            for key in ("max_length_q", "max_length_k"):
                if key in kwargs:
                    kwargs[key] += n
            self._inserted_at = torch.cat(kept).to(embeds.device)
            return kwargs
        # Rows (padded or single samples): n virtual tokens at the start of each row, as peft does.
        kwargs["inputs_embeds"] = torch.cat([prompt.expand(rows, -1, -1), embeds], dim=1)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            virtual = torch.arange(n, device=position_ids.device).expand(position_ids.shape[0], -1)
            kwargs["position_ids"] = torch.cat([virtual, position_ids + n], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            kwargs["attention_mask"] = _mask_with_leading_tokens(mask, n)
        elif mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(rows, n), mask], dim=1)
        self._inserted_at = torch.arange(n, n + length, device=embeds.device)
        return kwargs

    def _prefix_cache(self, backbone, kwargs: dict, cache):
        reference = kwargs.get("inputs_embeds")
        rows = (reference if reference is not None else kwargs["input_ids"]).shape[0]
        cache = DynamicCache(config=backbone.config) if cache is None else cache
        dtype = backbone.get_input_embeddings().weight.dtype
        for layer, (keys, values) in enumerate(self.layer_prefixes()):
            cache.update(keys.to(dtype).expand(rows, -1, -1, -1), values.to(dtype).expand(rows, -1, -1, -1), layer)
        return cache

    def merge(self, model: nn.Module) -> None:
        raise TunelabError(
            f"method '{self.name}' cannot be merged into the base weights: it adds virtual tokens, "
            "not a change of weights; export it with --format peft (or keep the run directory) instead"
        )

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        config = model.config
        return {
            "num_virtual_tokens": self.n,
            "num_transformer_submodules": 1,
            "num_layers": config.num_hidden_layers,
            **self.peft_dims(config),
        }

    def peft_dims(self, config) -> dict[str, Any]:
        raise NotImplementedError

    def peft_export(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", **self.peft_config(model), "inference_mode": True}
        # peft stores the final virtual-token table under one name, without the model prefix.
        return config, {"prompt_embeddings": self.peft_table().detach().contiguous()}


def _shift_for_virtual_entries(kwargs: dict, n: int) -> dict:
    """The cache holds n virtual entries before the caller's tokens: positions move by n and the
    attention mask gains n visible columns in front."""
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        visible = torch.ones_like(mask[..., :1]).expand(*mask.shape[:-1], n) if mask.dtype == torch.bool else torch.zeros_like(mask[..., :1]).expand(*mask.shape[:-1], n)
        kwargs["attention_mask"] = torch.cat([visible, mask], dim=-1)
    elif mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    return kwargs


def _mask_with_leading_tokens(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A (rows, 1, T, T) boolean mask for n tokens put before every row: they attend causally among
    themselves, and every query of the row sees them."""
    if mask.dtype != torch.bool:
        raise TunelabError("prompt tuning needs boolean 4D attention masks")
    rows, heads, length, _ = mask.shape
    grown = torch.zeros(rows, heads, n + length, n + length, dtype=torch.bool, device=mask.device)
    grown[:, :, :n, :n] = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    grown[:, :, n:, :n] = True
    grown[:, :, n:, n:] = mask
    return grown


class PromptTuning(VirtualTokenMethod):
    """Prompt tuning: n trainable input embeddings before every sample."""

    name = "prompt_tuning"
    Options = PromptTuningOptions
    peft_type = "PROMPT_TUNING"
    module_name = "prompt_tuning"
    inserts_tokens = True
    # Mask-packed rows hold several samples whose boundaries the hooks cannot see (one row would
    # share one prompt); padding-free packing (the default) and unpacked rows are exact.
    supports_mask_packing = False

    def build_module(self, model: nn.Module) -> nn.Module:
        embeddings = model.get_input_embeddings().weight
        module = nn.Module()
        # fp32 like every adapter: small updates vanish in bf16.
        table = torch.randn(self.n, embeddings.shape[1], device=embeddings.device)
        if self.options.init == "text":
            table = self._text_init(model, embeddings)
        module.prompt_embeddings = nn.Parameter(table)
        return module

    def _text_init(self, model: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
        text = self.options.init_text
        if not text:
            raise TunelabError("method.init_text: prompt_tuning with init: text needs the text")
        tokenizer = load_tokenizer(ModelConfig(name=model.config.name_or_path))  # the model's own tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TunelabError("method.init_text: the text has no tokens")
        repeated = (ids * (self.n // len(ids) + 1))[: self.n]  # cycle the text's tokens up to n
        return embeddings.detach()[torch.tensor(repeated, device=embeddings.device)].float().clone()

    def prompt_embeddings(self) -> torch.Tensor:
        return getattr(self.model, self.module_name).prompt_embeddings

    def peft_table(self) -> torch.Tensor:
        return self.prompt_embeddings()

    def peft_dims(self, config) -> dict[str, Any]:
        return {
            "token_dim": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "prompt_tuning_init": "RANDOM",
        }

    def peft_import(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        self.load_state_dict(model, {f"{self.module_name}.prompt_embeddings": _peft_table(tensors, source)}, source)

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        reject_peft_settings(config, source, {"num_transformer_submodules": (1, None)})
        return {"name": cls.name, "num_virtual_tokens": config["num_virtual_tokens"]}


class PrefixTuning(VirtualTokenMethod):
    """Prefix tuning (P-tuning v2): n trainable keys and values in every attention layer."""

    name = "prefix_tuning"
    Options = PrefixTuningOptions
    peft_type = "PREFIX_TUNING"
    module_name = "prefix_encoder"
    inserts_tokens = False

    def build_module(self, model: nn.Module) -> nn.Module:
        config = model.config
        width = self._kv_width(config) * config.num_hidden_layers * 2  # keys and values of every layer
        device = model.get_input_embeddings().weight.device
        module = nn.Module()
        if self.options.projection:
            kv = self._kv_width(config)
            hidden = self.options.projection_hidden or kv
            module.embedding = nn.Embedding(self.n, kv, device=device)
            module.transform = nn.Sequential(nn.Linear(kv, hidden, device=device), nn.Tanh(), nn.Linear(hidden, width, device=device))
        else:
            module.embedding = nn.Embedding(self.n, width, device=device)
        return module

    @staticmethod
    def _kv_width(config) -> int:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim

    def peft_table(self) -> torch.Tensor:
        """(n, layers · 2 · kv width): every layer's keys and values, as peft lays them out."""
        encoder = getattr(self.model, self.module_name)
        table = encoder.embedding.weight
        return encoder.transform(table) if self.options.projection else table

    def layer_prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (keys, values) of shape (1, kv heads, n, head dim)."""
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        table = self.peft_table().view(1, self.n, config.num_hidden_layers * 2, heads, -1).permute(2, 0, 3, 1, 4)
        return [(table[2 * layer], table[2 * layer + 1]) for layer in range(config.num_hidden_layers)]

    def peft_dims(self, config) -> dict[str, Any]:
        kv = self._kv_width(config)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        # The exported table is the MLP's output: peft loads it without the MLP.
        return {"token_dim": kv, "num_attention_heads": heads, "encoder_hidden_size": kv, "prefix_projection": False}

    def peft_import(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        if self.options.projection:
            raise TunelabError(f"{source}: a peft prefix adapter holds final prefixes; import it with projection: false")
        self.load_state_dict(model, {f"{self.module_name}.embedding.weight": _peft_table(tensors, source)}, source)

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        reject_peft_settings(config, source, {"num_transformer_submodules": (1, None)})
        # Whatever the training used, peft saved the final table: no projection is needed to use it.
        return {"name": cls.name, "num_virtual_tokens": config["num_virtual_tokens"]}


def _peft_table(tensors: dict[str, torch.Tensor], source: str) -> torch.Tensor:
    if set(tensors) != {"prompt_embeddings"}:
        raise TunelabError(f"{source}: expected one tensor 'prompt_embeddings', found {sorted(tensors)[:5]}")
    return tensors["prompt_embeddings"].float()
