"""Memory accounting: bytes held by weights and caches, what the process has used, and handing freed
host memory back to the system."""

from __future__ import annotations

import ctypes
import resource
import sys

import torch
from torch import nn

from .quantized_layers import quantization_state_tensors

GiB = 1024**3
MiB = 1024**2
# glibc's malloc_trim, or None where the C library has none (macOS, musl).
MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer of module, quantization state included."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers(), *quantization_state_tensors(module)]:
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def weight_bytes(model: nn.Module) -> int:
    return tensor_bytes(model) - model.cache_bytes() - rope_bytes(model)


def rope_bytes(model: nn.Module) -> int:
    """The rotary table, a buffer derived from the configuration rather than a weight."""
    rope = model.get_buffer("rope")
    return 0 if rope.device.type == "meta" else rope.numel() * rope.element_size()


def return_freed_host_memory() -> None:
    """Give the pages of freed host memory back to the system.

    glibc keeps freed blocks for reuse, and once a large block is freed it serves later requests
    below that size from its heap, where each freed source tensor leaves a hole the process is still
    charged for. Loading 1.1B parameters to int8 kept 0.15 to 0.54 GiB of such holes, varying from run
    to run, without this after each tensor.
    """
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def peak_host_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def cache_kind(model: nn.Module) -> str:
    """What the KV cache holds keys and values in: int8 (with scales), or the model's dtype."""
    if model.kv_cache == "int8":
        return "int8"
    return str(next(model.layers[0].attention.cache.buffers()).dtype).removeprefix("torch.")


def describe_memory(model: nn.Module, device: torch.device) -> str:
    parts = [f"weights {weight_bytes(model) / GiB:.2f} GiB",
             f"KV cache {model.cache_bytes() / MiB:.0f} MiB ({cache_kind(model)}, {model.max_batch_size} x "
             f"{model.max_seq_len} tokens"
             + (f", {model.args.sliding_window}-token sliding window)" if model.args.sliding_window else ")"),
             f"peak host RSS {peak_host_rss_bytes() / GiB:.2f} GiB"]
    if device.type == "cuda":
        parts.append(f"peak GPU allocated {torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB")
    return ", ".join(parts)
