"""`tunelab methods`: every registered method with what it trains on a given model."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.config.schema import ModelConfig
from tunelab.errors import TunelabError
from tunelab.methods.registry import get_method_class, method_names
from tunelab.models.loader import load_model_skeleton


@dataclass
class MethodRow:
    name: str
    trainable: int
    total: int  # parameters of the model without the method
    summary: str

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total


def method_rows(model: str, target: str | list[str] | None = None) -> list[MethodRow]:
    """Each registered method with its default options (and `target` where it wraps linear layers),
    attached to a weightless copy of `model`: its trainable parameters and their share."""
    rows = []
    for name in method_names():
        cls = get_method_class(name)
        options = {"name": name}
        if target is not None and "target" in cls.Options.model_fields:
            options["target"] = target
        method = cls(cls.Options.model_validate(options))
        skeleton = load_model_skeleton(ModelConfig(name=model))
        total = sum(p.numel() for p in skeleton.parameters())
        try:
            method.attach(skeleton)
        except TunelabError as err:
            raise TunelabError(f"method '{name}' on {model}: {err}") from None
        trainable = sum(p.numel() for p in method.trainable_parameters(skeleton).values())
        rows.append(MethodRow(name, trainable, total, (cls.__doc__ or "").strip().splitlines()[0]))
    return rows
