"""The merge config (`tunelab merge MERGE.yaml`), in mergekit's shape so that a mergekit config of
these methods reads as it is:

    merge_method: ties                  # linear | task_arithmetic | ties | dare_ties | dare_linear | slerp | magnitude_prune
    base_model: smollm2-135m-instruct   # what task vectors are taken against (a model, or a run directory)
    models:                             # run directories, peft adapters or full checkpoints of that base
      - model: runs/records
        parameters: {weight: 1.0, density: 0.5}
      - model: runs/sst2
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}   # shared: normalize, rescale, lambda, t, and weight/density defaults
    dtype: float32                      # what the merged weights are written in
    output: model                       # tunelab's: model (a merged checkpoint) | lora (one LoRA adapter)
    rank: 32                            # output: lora by truncated SVD (default: the inputs' ranks summed)
    seed: 0                             # DARE's random drop
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from tunelab.config.schema import Strict, error_at
from tunelab.merging.tensors import METHODS


class ModelParameters(Strict):
    weight: float | None = None
    density: float | None = Field(default=None, ge=0, le=1)


class MergeInput(Strict):
    model: str = Field(min_length=1, description="a run directory, a peft adapter directory or a model (alias, HF directory, hub id)")
    parameters: ModelParameters = ModelParameters()


class SharedParameters(ModelParameters):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    normalize: bool | None = None
    rescale: bool | None = None
    scale: float = Field(default=1.0, alias="lambda")
    t: float | None = Field(default=None, ge=0, le=1)
    # mergekit's memory saving (sign masks as int8); accepted so its configs read, no effect here.
    int8_mask: bool = False


class MergeConfig(Strict):
    merge_method: Literal[METHODS]
    base_model: str | None = Field(default=None, min_length=1)
    models: list[MergeInput] = Field(min_length=1)
    parameters: SharedParameters = SharedParameters()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    output: Literal["model", "lora"] = "model"
    rank: int | None = Field(default=None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _method_needs(self) -> MergeConfig:
        method = self.merge_method
        if method != "linear" and self.base_model is None:
            raise error_at("base_model", None, f"merge_method {method} takes task vectors against a base_model; name it", missing=True)
        if method == "slerp":
            names = [entry.model for entry in self.models]
            if self.parameters.t is None:
                raise error_at("parameters.t", None, "slerp needs t (0: base_model, 1: the other model)", missing=True)
            if len(names) != 2 or self.base_model not in names:
                raise error_at("models", names, "slerp interpolates between two models: base_model and one other, both listed")
        return self
