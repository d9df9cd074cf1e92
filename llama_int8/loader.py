"""Build a Transformer on the meta device and fill it, tensor by tensor, from a checkpoint.

Weights are converted (or quantized, through a hook from quantized_layers) one at a time as the
checkpoint yields them, and each source tensor is freed before the next is read. In quant mode gguf
a GGUF file's Q4_0 / Q4_1 block weights are packed as they are stored for torch's int4pack kernel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .formats import Checkpoint, CheckpointError, NamedTensor
from .formats.common import check_finite, checked_tensors, is_block_linear
from .formats.gguf_file import GGUFCheckpoint
from .int4pack import int4pack_linear, scale_dtype
from .memory import GiB, MiB, return_freed_host_memory
from .model import ModelArgs, Transformer, kv_cache_bytes
from .quantize import NonFiniteWeightError, QuantConfig, quantized_layer_names, quantized_weight_bytes
from .quantized_layers import LinearHook, QuantizedEmbedding, make_linear_hook, quantized_linear

log = logging.getLogger(__name__)


class NotEnoughMemoryError(ValueError):
    """The weights and the KV cache asked for do not fit in the device's free memory."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU (exact, and fast enough); on a GPU bfloat16 where that GPU computes in it
    (compute capability 8.0 on), else float16. Not torch.cuda.is_bf16_supported(): it asks the
    current device instead of this one, and says yes where bfloat16 is only emulated (T4, V100)."""
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def check_memory_fits(model: Transformer, cfg: QuantConfig, device: torch.device, dtype: torch.dtype,
                      max_batch_size: int, max_seq_len: int, kv_cache: str = "model",
                      packed: Collection[str] | None = None) -> None:
    """Refuse, before anything is allocated, weights and a KV cache (of kind kv_cache, which is
    checked here) that need more than the device has free (the host's MemAvailable; a GPU's free
    memory): an allocator failure, or the kernel's OOM killer, says less and comes later. packed: as
    expected_weight_bytes takes it."""
    cache = kv_cache_bytes(model.args, max_batch_size, max_seq_len, dtype, model.args.sliding_window, kv_cache)
    free = free_memory_bytes(device)
    if free is None:
        return
    weights = expected_weight_bytes(model, cfg, device, dtype, packed)
    if weights + cache <= free:
        return
    advice = ("lower --max_seq_len or --max_batch_size" + (", or pass --kv_cache int8" if kv_cache == "model" else "")
              if weights < free else "the weights alone do not fit: choose a smaller --quant mode or a bigger device")
    kind = "int8" if kv_cache == "int8" else str(dtype).removeprefix("torch.")
    raise NotEnoughMemoryError(
        f"{device}: loading needs {size(weights)} of {cfg.name} weights and {size(cache)} of {kind} KV cache "
        f"(--max_batch_size {max_batch_size} x --max_seq_len {max_seq_len}), {weights + cache} bytes in all, "
        f"but {free} bytes ({size(free)}) are free; {advice}")


def size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory the device can still give: the host's MemAvailable (free plus reclaimable caches), or
    a GPU's free memory; None where the system does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def expected_weight_bytes(model: Transformer, cfg: QuantConfig, device: torch.device, dtype: torch.dtype,
                          packed: Collection[str] | None = None) -> int:
    """Bytes the weights of a meta-device model will take once loaded: quantized layers as cfg
    stores them, every other parameter in dtype (a tied head counted once, as the quantized head or
    as the embedding). In mode gguf, packed names the block linear weights that load packed
    (gguf_packed_weights); the others load as dtype layers. None: every one."""
    args = model.args
    quantized = set(quantized_layer_names(args.n_layers, cfg.quantize_head, args.n_experts)) if cfg.enabled else set()
    shared = "tok_embeddings.weight" if "output" in quantized else "output.weight"  # a tied head's other name
    scales = scale_dtype(device, dtype)  # a gguf layer's
    total = 0
    for name, p in model.named_parameters():
        module = name.removesuffix(".weight")
        if name == shared and model.args.tie_word_embeddings:
            continue
        stays_float = cfg.mode == "gguf" and packed is not None and is_block_linear(name) and name not in packed
        if module in quantized and not stays_float:
            total += quantized_weight_bytes(p.shape[0], p.shape[1], cfg.layer_config(module), scales)
        else:
            total += p.numel() * dtype.itemsize
    return total


def load_weights(model: Transformer, checkpoint: Checkpoint, cfg: QuantConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
    """Fill a meta-device model from checkpoint, converting to dtype on device.

    The linear layers of the blocks (and the head, if cfg says so) are quantized on the host as cfg
    says; a checkpoint whose layers are stored quantized has them built as they are, in its own
    mode (cfg, which must be that mode, lends its int8 threshold), and only the experts it holds in
    16 bits are quantized (see expert_quantizing_hook). In mode gguf, see load_gguf_as_stored.
    """
    if cfg.mode == "gguf":
        load_gguf_as_stored(model, checkpoint, cfg, device, dtype)
    elif checkpoint.quant is not None:
        load_quantized_layers(model, checkpoint, cfg, device, dtype)
        fill_model(model, checkpoint.tensors(), device, dtype, linear_hook=expert_quantizing_hook(cfg, device, dtype))
    else:
        fill_model(model, checkpoint.tensors(), device, dtype, linear_hook=make_linear_hook(cfg, device, dtype),
                   total=count_expected_tensors(checkpoint.args))


def load_gguf_as_stored(model: Transformer, checkpoint: Checkpoint, cfg: QuantConfig, device: torch.device,
                        dtype: torch.dtype) -> None:
    """Quant mode gguf: each block linear weight the file stores Q4_0 or Q4_1 becomes an
    int4pack.Int4PackLinear, its 4-bit values and scales repacked as stored (in float32, gguf's own
    dequantized weights bit for bit); block weights stored in other types (F16, Q8_0, Q6_K...) are
    dequantized into plain dtype layers; the head is quantized as cfg says (int8 by default), and
    every other tensor loads as in mode none."""
    check_gguf(checkpoint)
    packed = 0
    for weight in tqdm(checkpoint.q4_linear_weights(), desc="Packing Q4 layers", unit="layer", leave=False):
        path = weight.name.removesuffix(".weight")
        linear = model.get_submodule(path)
        if weight.shape != (linear.out_features, linear.in_features):
            raise CheckpointError(f"{weight.source}: tensor {weight.name!r} has shape {weight.shape}, expected "
                                  f"{(linear.out_features, linear.in_features)} from the model configuration")
        layer = int4pack_linear(weight.blocks, weight.kind, device, dtype)
        check_finite(layer.scales_and_zeros, weight.name, weight.source)
        keep_bias(linear, layer)
        set_submodule(model, path, layer)
        packed += 1
    others = len(quantized_layer_names(model.args.n_layers, False, model.args.n_experts)) - packed
    if others:
        log.warning("%s: %d block linear weights are not stored Q4_0/Q4_1: quant 'gguf' keeps them as %s layers "
                    "(%d packed)", checkpoint.location, others, str(dtype).removeprefix("torch."), packed)
    fill_model(model, checkpoint.tensors(leave_out_q4_linears=True), device, dtype,
               linear_hook=head_quantizing_hook(cfg, device, dtype))


def gguf_packed_weights(checkpoint: Checkpoint, cfg: QuantConfig) -> frozenset[str] | None:
    """In quant mode gguf, the names of the block linear weights that load packed (those the file
    stores Q4_0 / Q4_1), read from its tensor list alone; None in the other modes."""
    if cfg.mode != "gguf":
        return None
    check_gguf(checkpoint)
    return frozenset(checkpoint.q4_linear_names())


def check_gguf(checkpoint: Checkpoint) -> None:
    if not isinstance(checkpoint, GGUFCheckpoint):
        raise ValueError(f"quant='gguf' serves the Q4_0/Q4_1 weights of a GGUF file as they are stored, but "
                         f"{checkpoint.location} is a {checkpoint.format} checkpoint: pass a .gguf file, or choose "
                         "int8, nf4, nf4-dq, fp4, fp4-dq or none")


def head_quantizing_hook(cfg: QuantConfig, device: torch.device, dtype: torch.dtype) -> LinearHook | None:
    """For quant mode gguf: a hook that quantizes the head as cfg says and leaves the block linears it
    is given (those the file does not store Q4_0/Q4_1) as plain layers."""
    hook = make_linear_hook(cfg, device, dtype)
    if hook is None or not cfg.quantize_head:
        return None

    def quantize_head(name: str, module: nn.Module, weight: torch.Tensor) -> nn.Module | None:
        return None if is_block_linear(name) else hook(name, module, weight)

    return quantize_head


def expert_quantizing_hook(cfg: QuantConfig, device: torch.device, dtype: torch.dtype) -> LinearHook | None:
    """For a checkpoint stored quantized: a hook that quantizes, in its mode, the Mixtral expert weights
    it holds in 16 bits, and leaves its other 16-bit layers as saved. transformers' bitsandbytes Mixtral
    folders hold their experts so (it quantizes nn.Linear modules only, and its experts are not), and
    they are nearly all of the model's weights."""
    hook = make_linear_hook(cfg, device, dtype)
    if hook is None:
        return None

    def quantize_experts(name: str, module: nn.Module, weight: torch.Tensor) -> nn.Module | None:
        return hook(name, module, weight) if ".feed_forward.experts." in name else None

    return quantize_experts


def load_quantized_layers(model: Transformer, checkpoint: Checkpoint, cfg: QuantConfig, device: torch.device,
                          dtype: torch.dtype) -> None:
    """Give each layer the checkpoint stores quantized its saved tensors, on device (see quantized_linear)."""
    for layer in tqdm(checkpoint.quantized_layers(), desc="Loading quantized layers", unit="layer", leave=False):
        linear = model.get_submodule(layer.name)
        quantized = quantized_linear(layer.tensors, linear.in_features, linear.out_features,
                                     cfg.layer_config(layer.name), device, dtype)
        if layer.name == "output" and model.args.tie_word_embeddings:
            tie_quantized_head(model, quantized, dtype)
        else:
            keep_bias(linear, quantized)
            set_submodule(model, layer.name, quantized)
        del layer
        return_freed_host_memory()


def tie_quantized_head(model: Transformer, head: nn.Module, dtype: torch.dtype) -> None:
    """Make the quantized head the model's output and the table its embedding looks rows up in."""
    model.output = head
    model.tok_embeddings = QuantizedEmbedding(head, dtype)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def fill_model(model: Transformer, tensors: Iterable[NamedTensor], device: torch.device, dtype: torch.dtype,
               linear_hook: LinearHook | None = None, total: int | None = None) -> None:
    """Assign each tensor to its parameter still on the meta device (converted to dtype on device),
    freeing the source at once; a tied head is skipped and tied after.

    Raises CheckpointError naming the file and key for an unknown name, a wrong shape, a tensor given
    twice, an integer tensor, NaN or infinite values (in the file, or once converted to dtype), or
    parameters the checkpoint never provided.
    """
    # Parameters already on a device (layers restored quantized) are not expected again.
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if p.is_meta}
    tied = frozenset({"output.weight"}) if model.args.tie_word_embeddings else frozenset()
    for name in tied:
        expected.pop(name, None)
    head_weights = {"tok_embeddings.weight"} if tied else {"output.weight"}  # what a quantized head is made from
    for item in checked_tensors(tensors, expected, ignored=tied, total=total):
        module_path, _, attr = item.name.rpartition(".")
        module = model.get_submodule(module_path)
        replacement = None
        if linear_hook is not None and (is_block_linear(item.name) or item.name in head_weights):
            try:
                replacement = linear_hook(item.name, module, item.tensor)
            except NonFiniteWeightError as e:  # the quantizer saw it in its scales
                raise CheckpointError(f"{item.source}: tensor {item.name!r} {e}") from e
        if replacement is not None and item.name == "tok_embeddings.weight":
            tie_quantized_head(model, replacement, dtype)
        elif replacement is not None:
            keep_bias(module, replacement)
            set_submodule(model, module_path, replacement)
        else:
            value = item.tensor.to(device=device, dtype=dtype)
            check_finite(value, item.name, item.source)
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        del item  # drop the last reference to the source tensor before reading the next one
        return_freed_host_memory()
    if model.args.tie_word_embeddings and not isinstance(model.tok_embeddings, QuantizedEmbedding):
        model.output.weight = model.tok_embeddings.weight


def keep_bias(linear: nn.Module, replacement: nn.Module) -> None:
    """Give the quantized layer that replaces linear linear's bias, which stays 16-bit: as loaded when
    the checkpoint gave it before the weight, else still on the meta device, where fill_model finds
    it by name and fills it."""
    if linear.bias is not None:
        replacement.bias = linear.bias


def never_generate(model: Transformer, ids: list[int]) -> None:
    """Give ids a logit of -inf in every forward of model, so that no sampling (Llama's or the
    engine's, at any temperature, penalty or logit bias) can pick them: the embedding rows a padded
    model has past its tokenizer, which decode to no text. Call once the caches are set up."""
    if not ids:
        return
    masked = torch.tensor(ids, dtype=torch.long, device=model.device)

    def mask_logits(module: nn.Module, inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill_(-1, masked, float("-inf"))

    model.register_forward_hook(mask_logits)


def release_page_cache(paths: Iterable[Path]) -> None:
    """Tell the kernel the checkpoint's files will not be read again (posix_fadvise DONTNEED), so the
    page cache their reading filled is let go at once instead of when memory runs short: a container's
    memory limit counts those pages, and a 1.1B float32 source fills 4.4 GB of them. Pages still mapped
    by this process are kept by the kernel: call it once the checkpoint's memory maps are closed.
    Nowhere but where the C library offers posix_fadvise (Linux and most Unixes)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else []
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue  # unreadable now: nothing of it to release
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def count_expected_tensors(args: ModelArgs) -> int:
    feed_forward = 1 + 3 * args.n_experts if args.n_experts else 3  # the router and each expert's w1 w2 w3
    per_layer = 6 + feed_forward + 3 * args.qkv_bias + 2 * args.qk_norm  # wq wk wv wo + two norms; biases; q/k norms
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
