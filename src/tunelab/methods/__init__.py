"""The method registry: every adaptation method, by the name used in `method.name`.

Adding a method: write one file in this folder with a `Method` subclass decorated by `@register`,
and add the file to the import at the bottom of this file.
"""

from __future__ import annotations

from tunelab.methods.base import Method, MethodOptions

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def method_options_model(name: str) -> type[MethodOptions]:
    return get_method_class(name).Options


def build_method(options: MethodOptions) -> Method:
    return get_method_class(options.name)(options)


from tunelab.methods import (  # noqa: E402,F401  (registers them)
    adalora, bottleneck, diablo, ether, full, ia3, layer_sampling, lofit, lora, lycoris, nola, oft, partial, prompt, reft, s2ft, sparse_ft, subtuning, vera,
)

__all__ = ["Method", "MethodOptions", "REGISTRY", "register", "build_method", "get_method_class"]
