"""The validated shape of a run config. Unknown keys, wrong types and impossible values fail here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tunelab.errors import TunelabError
from tunelab.methods.registry import method_options_model
from tunelab.objectives.registry import objective_options_model


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = Field(min_length=1, description="built-in alias | local HF dir | hub id | path to .gguf")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # Frozen linear weights of the decoder stored as NF4 (QLoRA) or int8; models/quantize.py.
    quantize: Literal["none", "nf4", "int8"] = "none"


class DataConfig(Strict):
    train: str = Field(min_length=1)
    eval: str | None = None
    eval_split: float | None = Field(default=None, gt=0.0, lt=1.0)
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"] = "auto"
    max_length: int = Field(default=1024, ge=8)
    packing: bool = True
    too_long: Literal["truncate", "drop"] = "truncate"
    # "assistant": loss on assistant turns (and their end-of-turn token) only; "all": every token.
    train_on: Literal["assistant", "all"] = "assistant"

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("give either data.eval or data.eval_split, not both")
        return self


# GaLore's pre-training settings (Zhao et al. 2024): rank 128 (their 60M model; larger models took
# 256-512), the projection refreshed every 200 steps, scale 0.25, on the attention and MLP linears.
GALORE_DEFAULTS = {"galore_rank": 128, "galore_update_every": 200, "galore_scale": 0.25, "galore_target": "attention-mlp"}


class TrainConfig(Strict):
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = Field(default=0.03, ge=0, description="fraction of steps if < 1, else a step count")
    weight_decay: float = Field(default=0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0)
    max_grad_norm: float = Field(default=1.0, ge=0, description="0 disables clipping")
    # "galore": AdamW with the targeted matrices' moments in a rank-r projection of their gradient
    # (train/galore.py); the galore_* keys take the defaults in GALORE_DEFAULTS only with it.
    optimizer: Literal["adamw", "galore"] = "adamw"
    galore_rank: int | None = Field(default=None, ge=1)
    galore_update_every: int | None = Field(default=None, ge=1, description="steps between projection refreshes")
    galore_scale: float | None = Field(default=None, gt=0)
    galore_target: Literal["attention-mlp"] | Annotated[list[str], Field(min_length=1)] | None = None
    # NEFTune: uniform noise of scale alpha / sqrt(L * d) on the input embeddings during training
    # (train/neftune.py); none or 0: off.
    neftune_alpha: float | None = Field(default=None, ge=0)
    # Forward passes of at most this many tokens (samples are grouped, never split): bounds
    # activation memory; the loss is the same (with LoRA dropout, the same in distribution: the
    # masks are drawn per forward). "auto": 1024 on CPU, no limit on GPU; 0: no limit.
    max_tokens_per_forward: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # Recompute each layer's activations in backward instead of keeping them: about a third more
    # compute for a fraction of the memory; for sequences that do not fit otherwise.
    activation_checkpointing: bool = False
    # Dtype of a training copy of the frozen weights under an adapter (their matmuls run in it;
    # activations, adapters and evaluation keep model.dtype). "auto": bfloat16 on CPUs where a
    # bf16 matmul measures at least 2x faster than fp32 (AMX), else model.dtype. Only methods with
    # mixed-dtype kernels (lora) take it.
    frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0
    save_every: int = Field(default=50, ge=0, description="0: only the final weights")
    eval_every: int = Field(default=50, ge=0, description="0: eval only at the end")
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=1, ge=1)
    # Trackers that get every logged record besides metrics.jsonl (train/reporting.py).
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    # Under torchrun or Ray Train (train/distributed.py): "ddp" replicates the model on every rank
    # and sums gradients; "fsdp" shards parameters, gradients and optimizer state (FSDP2); "auto":
    # fsdp for methods that train the whole model, ddp for adapters. One process: ignored.
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    # Seconds a rank waits in a collective (model loading included) before it gives up on the others.
    distributed_timeout: float = Field(default=1800, gt=0)
    # Start from these weights of the method instead of its initialization: a safetensors file of
    # its tensors, named as a run's adapter/adapter.safetensors names them (`tunelab federate`
    # starts each round's clients from the global model so).
    init_weights: str | None = Field(default=None, min_length=1)
    # FedProx's proximal term mu/2 * ||w - w0||^2 on the trainable tensors, w0 their values at the
    # start of the run (kept in checkpoints); 0: off.
    proximal_mu: float = Field(default=0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _galore_options(cls, values: Any) -> Any:
        """Under `optimizer: galore` the galore_* keys not given take their defaults; with another
        optimizer, giving one is a mistake (it would do nothing)."""
        if not isinstance(values, dict):
            return values
        if values.get("optimizer") == "galore":
            return {**values, **{k: v for k, v in GALORE_DEFAULTS.items() if values.get(k) is None}}
        given = [k for k in GALORE_DEFAULTS if values.get(k) is not None]
        if given:
            raise error_at(given[0], values[given[0]], f"train.{given[0]} is a GaLore option: it needs train.optimizer: galore")
        return values

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give either train.max_steps or train.epochs, not both")
        return self


class RunConfig(Strict):
    model: ModelConfig
    data: DataConfig
    # validate_default: an omitted `method` also becomes LoRA's options object, not a bare dict.
    method: Any = Field(default_factory=lambda: {"name": "lora"}, validate_default=True)
    # validate_default: an omitted `objective` also becomes SFT's options object.
    objective: Any = Field(default_factory=lambda: {"name": "sft"}, validate_default=True)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: str = "runs/run"

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("method", mode="before")
    @classmethod
    def _method_options(cls, value: Any) -> Any:
        value = _named_section(value, "method")
        if isinstance(value.get("from_peft"), str) and value["from_peft"]:
            value = _options_with_peft_adapter(value)
        return _options_model(value, "lora", method_options_model).model_validate(value)

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_options(cls, value: Any) -> Any:
        value = _named_section(value, "objective")
        return _options_model(value, "sft", objective_options_model).model_validate(value)

    @model_validator(mode="after")
    def _objective_fits_training(self) -> RunConfig:
        check = getattr(self.objective, "check_train", None)  # options that constrain train.* (KTO's batch size)
        if check is not None:
            check(self.train)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def error_at(key: str, value: Any, message: str, missing: bool = False) -> ValidationError:
    """A validation error about dotted `key` of the section a validator checks (pydantic puts the
    section's own location in front), so that the message names the key and its line; `missing`:
    the key is absent (named all the same, at its section's line)."""
    kind = PydanticCustomError("missing" if missing else "value_error", "{message}", {"message": message})
    return ValidationError.from_exception_data("config", [{"type": kind, "loc": tuple(key.split(".")), "input": value}])


def _named_section(value: Any, section: str) -> dict:
    """`method: lora` is `method: {name: lora}`; the named class then validates its own options
    (unknown keys fail, naming the key)."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ValueError(f"{section} must be a mapping with a 'name' key")
    return value


def _options_model(section: dict[str, Any], default: str, options_model_of) -> type[BaseModel]:
    """The options class of the section's `name` (a registry lookup: `options_model_of`)."""
    name = section.get("name", default)
    try:
        if not isinstance(name, str):
            raise ValueError("a name must be a string")
        return options_model_of(name)
    except ValueError as err:  # an unknown name: the registry's message lists the choices
        raise error_at("name", name, str(err)) from None


def _options_with_peft_adapter(given: dict[str, Any]) -> dict[str, Any]:
    """`from_peft: DIR`: the options come from the adapter's config; keys given as well must agree."""
    from tunelab.methods.peft_io import method_options_from_peft

    try:
        options = method_options_from_peft(given["from_peft"])
    except TunelabError as err:
        raise error_at("from_peft", given["from_peft"], str(err)) from None
    conflicts = [key for key, v in given.items() if key != "from_peft" and key in options and options[key] != v]
    if conflicts:
        raise ValueError(f"{', '.join(f'{k}={given[k]!r}' for k in conflicts)} differ from the peft adapter ({', '.join(f'{k}={options[k]!r}' for k in conflicts)})")
    return {**given, **options}
