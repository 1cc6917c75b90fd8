"""Full fine-tuning: every parameter trains; the run's result is a complete model checkpoint."""

from __future__ import annotations

from typing import Literal

from torch import nn

from tunelab.methods.base import Method, MethodOptions


class FullOptions(MethodOptions):
    name: Literal["full"] = "full"


class Full(Method):
    """Full fine-tuning: every weight trains."""

    name = "full"
    Options = FullOptions
    artifact = "model"
    mergeable = True
    shards = True

    def attach(self, model: nn.Module) -> None:
        model.requires_grad_(True)

    def merge(self, model: nn.Module) -> None:
        """Nothing to fold: the trained weights already are the model."""
