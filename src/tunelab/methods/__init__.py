"""Adaptation methods: the `Method` interface (base.py), one file per method, and the registry
(registry.py) that finds a method's class by name, importing only that method's module."""

from __future__ import annotations

from tunelab.methods.base import Method, MethodOptions
from tunelab.methods.registry import build_method, get_method_class

__all__ = ["Method", "MethodOptions", "build_method", "get_method_class"]
