"""Memory accounting: bytes held by weights and caches, and what the process has used."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from .quantize import quantization_state_tensors

GiB = 1024**3
MiB = 1024**2


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


def peak_host_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def describe_memory(model: nn.Module, device: torch.device) -> str:
    parts = [f"weights {weight_bytes(model) / GiB:.2f} GiB",
             f"KV cache {model.cache_bytes() / MiB:.0f} MiB ({model.max_batch_size} x {model.max_seq_len} tokens"
             + (f", {model.args.sliding_window}-token sliding window)" if model.args.sliding_window else ")"),
             f"peak host RSS {peak_host_rss_bytes() / GiB:.2f} GiB"]
    if device.type == "cuda":
        parts.append(f"peak GPU allocated {torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB")
    return ", ".join(parts)
