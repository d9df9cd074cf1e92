"""Build a Transformer on the meta device and fill it, tensor by tensor, from a checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import CheckpointError, NamedTensor
from .memory import return_freed_host_memory
from .model import ModelArgs, Transformer, empty_model  # noqa: F401  (empty_model: re-exported)

log = logging.getLogger(__name__)

# Called with the weight of each linear layer of the blocks and of the (untied) output head; returns
# the module that replaces it (e.g. a quantized layer already on the device) or None to keep a plain
# nn.Linear.
LinearHook = Callable[[str, nn.Linear, torch.Tensor], nn.Module | None]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU (exact, and fast enough); bfloat16 where the GPU has it, else float16."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def is_block_linear(name: str) -> bool:
    return name.startswith("layers.") and (".attention.w" in name or ".feed_forward.w" in name)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def fill_model(model: Transformer, tensors: Iterable[NamedTensor], device: torch.device, dtype: torch.dtype,
               linear_hook: LinearHook | None = None, total: int | None = None) -> None:
    """Assign each tensor to its parameter (converted to dtype on device), freeing the source at once.

    Raises CheckpointError naming the file and key for an unknown name, a wrong shape, a tensor given
    twice, or parameters the checkpoint never provided.
    """
    for item in checked_tensors(model, tensors, total):
        module_path, _, attr = item.name.rpartition(".")
        module = model.get_submodule(module_path)
        replacement = None
        if linear_hook is not None and (is_block_linear(item.name) or item.name == "output.weight"):
            replacement = linear_hook(item.name, module, item.tensor)
        if replacement is not None:
            set_submodule(model, module_path, replacement)
        else:
            value = item.tensor.to(device=device, dtype=dtype)
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        del item  # drop the last reference to the source tensor before reading the next one
        return_freed_host_memory()
    if model.args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight


def checked_tensors(model: Transformer, tensors: Iterable[NamedTensor], total: int | None = None
                    ) -> Iterator[NamedTensor]:
    """The tensors that fill model's parameters still on the meta device, each checked against the
    model's configuration as it passes; a tied head is skipped.

    Raises CheckpointError naming the file and key for an unknown name, a wrong shape or a tensor given
    twice, and after the last tensor for parameters never provided.
    """
    # Parameters already on a device (layers restored from a pre-baked folder) are not expected again.
    expected = {name: p for name, p in model.named_parameters() if p.is_meta}
    if model.args.tie_word_embeddings:
        expected.pop("output.weight", None)
    seen: set[str] = set()
    for item in tqdm(tensors, total=total, desc="Loading weights", unit="tensor", leave=False):
        name, source = item.name, item.source
        if name == "output.weight" and model.args.tie_word_embeddings:
            continue  # some exports save the tied head too; the embedding is the one kept
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r}")
        if name in seen:
            raise CheckpointError(f"{source}: tensor {name!r} appears twice")
        want = tuple(expected[name].shape)
        if tuple(item.tensor.shape) != want:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(item.tensor.shape)}, "
                                  f"expected {want} from the model configuration")
        seen.add(name)
        yield item
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model needs: {missing[:8]}"
                              + (" ..." if len(missing) > 8 else ""))


def count_expected_tensors(args: ModelArgs) -> int:
    per_layer = 9  # wq wk wv wo w1 w2 w3 + two norms
    return args.n_layers * per_layer + 2 + (0 if args.tie_word_embeddings else 1)


def flash_attention_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """flash-attn needs its package, an Ampere or newer GPU, and 16-bit activations."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_attention_backend(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The requested backend, or flash-attn where usable and SDPA otherwise."""
    if requested is None:
        if flash_attention_usable(device, dtype):
            return "flash"
        if device.type == "cuda":
            log.info("flash-attn is not installed or not usable with this GPU and dtype: using PyTorch SDPA")
        return "sdpa"
    if requested == "flash" and not flash_attention_usable(device, dtype):
        raise ValueError("attention='flash' needs the flash_attn package, a CUDA GPU of compute capability "
                         f">= 8.0 and float16/bfloat16 (got {device}, {dtype})")
    return requested
