"""llama_int8: a memory-frugal, quantized, single-GPU inference engine for LLaMA-family models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .generation import Llama
    from .model import ModelArgs, Transformer

from .version import __version__

__all__ = ["Llama", "ModelArgs", "Transformer", "__version__"]

# The module each public name comes from, imported on first use: the command lines check their flags,
# and `python -m llama_int8.demo` runs, without waiting seconds for torch and bitsandbytes to import.
PUBLIC_NAMES = {"Llama": ".generation", "ModelArgs": ".model", "Transformer": ".model"}


def __getattr__(name: str) -> Any:
    if name not in PUBLIC_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(PUBLIC_NAMES[name], __name__), name)
