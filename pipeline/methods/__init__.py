"""The merge methods, one module each, and the registry that names them.

`pipeline.methods.registry` holds the rows (plain data, no torch): what a method needs, which
settings name its artifacts, how tables and figures show it. `pipeline.methods.layer` holds
what one layer's merge reads and returns (`MergeSettings`, `LayerInputs`, `LayerResult`) and
each method's per-tensor entry point. Methods are pure: the driver in `pipeline.merge` reads
the inputs and hands each function the tensors of one layer.

Importing this package does not import torch; `MergeSettings`, `LayerInputs`, `LayerResult`,
`COORDINATES` and the method modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.methods.registry import METHODS, Method, get_method, setting_name, setting_names

__all__ = [
    "COORDINATES",
    "METHODS",
    "LayerInputs",
    "LayerResult",
    "MergeSettings",
    "Method",
    "get_method",
    "setting_name",
    "setting_names",
]

_LAYER = ("COORDINATES", "LayerInputs", "LayerResult", "MergeSettings")
_MODULES = ("epimer", "fisher", "gradmatch", "iso", "ta", "ties", "tsvm")


def __getattr__(name: str) -> Any:
    """The torch-side names, imported when first asked for (PEP 562)."""
    if name in _LAYER:
        return getattr(importlib.import_module("pipeline.methods.layer"), name)
    if name in _MODULES:
        return importlib.import_module(f"pipeline.methods.{name}")
    raise AttributeError(f"module `pipeline.methods` has no attribute `{name}`")
