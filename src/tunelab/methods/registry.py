"""The method registry: every adaptation method, by the name used in `method.name`.

A static table rather than classes registering themselves on import, so that validating a config
(or listing the names) loads no method implementation: `get_method_class` imports just the module
of the method asked for. Adding a method: one file in this folder and one line in `METHODS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.registry import LazyRegistry

if TYPE_CHECKING:
    from tunelab.methods.base import Method, MethodOptions

# method name -> "module:Class", the module under tunelab.methods.
METHODS: dict[str, str] = {
    "adalora": "adalora:AdaLora",
    "boft": "oft:Boft",
    "diablo": "diablo:Diablo",
    "ether": "ether:Ether",
    "freeze": "partial:Freeze",
    "full": "full:Full",
    "hft": "partial:Hft",
    "ia3": "ia3:Ia3",
    "lisa": "layer_sampling:Lisa",
    "lofit": "lofit:Lofit",
    "loha": "lycoris:Loha",
    "lokr": "lycoris:Lokr",
    "lora": "lora:Lora",
    "nola": "nola:Nola",
    "oft": "oft:Oft",
    "owlore": "layer_sampling:Owlore",
    "parallel_adapter": "bottleneck:ParallelAdapter",
    "prefix_tuning": "prompt:PrefixTuning",
    "prompt_tuning": "prompt:PromptTuning",
    "reft": "reft:Reft",
    "s2ft": "s2ft:S2ft",
    "series_adapter": "bottleneck:SeriesAdapter",
    "sparse_ft": "sparse_ft:SparseFt",
    "subtuning": "subtuning:SubTuning",
    "vera": "vera:Vera",
}


REGISTRY = LazyRegistry("method", "tunelab.methods", METHODS)


def method_names() -> list[str]:
    return REGISTRY.names()


def get_method_class(name: str) -> type[Method]:
    return REGISTRY.get(name)


def method_options_model(name: str) -> type[MethodOptions]:
    return get_method_class(name).Options


def build_method(options: MethodOptions) -> Method:
    return get_method_class(options.name)(options)
