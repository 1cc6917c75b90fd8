"""A registry of classes by name, as a static table imported lazily: listing the names or validating
a config loads no implementation, and a class's module is imported only when it is asked for.
The method and objective registries are two of these."""

from __future__ import annotations

import importlib


class LazyRegistry:
    def __init__(self, kind: str, package: str, table: dict[str, str]):
        self.kind = kind  # "method", "objective": for messages
        self.package = package
        self.table = table  # name -> "module:Class", the module under `package`

    def names(self) -> list[str]:
        return sorted(self.table)

    def get(self, name: str):
        if name not in self.table:
            raise ValueError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        module, cls = self.table[name].split(":")
        return getattr(importlib.import_module(f"{self.package}.{module}"), cls)
