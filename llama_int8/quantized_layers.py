"""bitsandbytes layers on their device, built from host-quantized tensors, and their CPU forwards.

bitsandbytes 0.50 quantizes inside `Int8Params.to(device)` / `Params4bit.to(device)`, on the target
device, and a host-quantized layer moved afterwards keeps host tensors or garbage (docs/bitsandbytes.md).
So each layer is built under the meta device and given parameters made directly on the device it
will run on, from the tensors `quantize.quantize_weight` made (or a pre-baked folder stored), and
it refuses to be moved after (StaysOnItsDevice). Only the quantized bytes and their scales reach the
device.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# quantize first: it quiets bitsandbytes' import-time messages before bitsandbytes is imported.
from .quantize import QuantConfig, quantize_weight  # isort: skip
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
from bitsandbytes.cextension import lib as bnb_cpu_lib  # noqa: E402

# Called by the loader with the weight of each linear layer of the blocks and of the (untied) output
# head; returns the module that replaces it (a quantized layer already on the device) or None to
# keep a plain Linear.
LinearHook = Callable[[str, nn.Linear, torch.Tensor], nn.Module | None]


# --- Building a quantized layer on its device ---------------------------------------------------

def quantized_linear(tensors: dict[str, torch.Tensor], in_features: int, out_features: int, cfg: QuantConfig,
                     device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes linear layer on device from quantize_weight's tensors, in eval mode; without a
    bias (the loader gives it one where the checkpoint has it).

    Only the quantized tensors are copied to the device. dtype is the dtype of the activations.
    """
    device = torch.device(device)
    if cfg.mode == "int8":
        layer = build_int8_linear(tensors, in_features, out_features, cfg, device)
    elif cfg.is_4bit:
        layer = build_4bit_linear(tensors, in_features, out_features, cfg, device, dtype)
    else:
        raise ValueError(f"quant mode {cfg.name!r} does not quantize")
    return layer.eval()


def build_int8_linear(tensors: dict[str, torch.Tensor], in_features: int, out_features: int, cfg: QuantConfig,
                      device: torch.device) -> nn.Module:
    with torch.device("meta"):
        layer = DeviceBoundLinear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False,
                                        threshold=cfg.int8_threshold)
    cb, scb = tensors["weight"].to(device), tensors["SCB"].to(device)
    # Made on the device directly: Linear8bitLt.to() would leave CB/SCB behind (docs/bitsandbytes.md), and
    # CB must be set or the first forward would quantize the int8 bytes again.
    layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    return layer


def build_4bit_linear(tensors: dict[str, torch.Tensor], in_features: int, out_features: int, cfg: QuantConfig,
                      device: torch.device, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        layer = DeviceBoundLinear4bit(in_features, out_features, bias=False, compute_dtype=dtype,
                                      compress_statistics=cfg.double_quant, quant_type=cfg.mode,
                                      quant_storage=torch.uint8)
    # Linear4bit.load_state_dict drops the quant state (bitsandbytes#1946): build the parameter directly.
    # Without module=: the parameter would point back at the layer that holds it, a reference cycle
    # that keeps both (and their device memory) alive after `del` until a garbage collection runs.
    stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"}
    layer.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, requires_grad=False, device=device)
    layer.quant_state = layer.weight.quant_state  # what module= would have set (a state holds no layer)
    # The state records the source's dtype; it only sets the dtype weights are dequantized to.
    layer.weight.quant_state.dtype = dtype
    if device.type == "cpu" and layer.support_avx512bf16_for_cpu and not repackable_for_cpu(layer, cfg):
        # bitsandbytes would try, and fail halfway with the quant state already changed.
        layer.support_avx512bf16_for_cpu = False
    if device.type == "cpu" and layer.support_avx512bf16_for_cpu:
        # The first CPU forward repacks the weight in place for the AVX512-BF16 kernel: do it now,
        # once, so the first token is not slowed and memory accounting sees the final layout.
        with torch.inference_mode():
            layer.eval()(torch.zeros(1, in_features, dtype=dtype))
    return layer


def repackable_for_cpu(layer: nn.Module, cfg: QuantConfig) -> bool:
    """Whether bitsandbytes' AVX512-BF16 layout takes this weight: output rows in blocks of 32, and
    every row a whole number of quantization blocks."""
    return layer.out_features % 32 == 0 and layer.in_features % cfg.blocksize == 0


# --- The layers: bitsandbytes' own, bound to the device they were built on -----------------------

class StaysOnItsDevice:
    """Refuses to move a bitsandbytes layer off the device it was built on (mixed in before it).

    Moving one is broken in bitsandbytes 0.50: `nn.Module._apply` keeps the old parameter object, so
    an int8 layer's CB/SCB stay where they were, and a CPU-repacked 4-bit weight moves as garbage
    (docs/bitsandbytes.md). `Module.to`, `.cuda()` and `.cpu()` reach every submodule through
    `_apply(fn)`: fn is tried on an empty tensor here, and a conversion that would change the device
    raises instead; same-device calls and dtype conversions (which leave int8 and uint8 weights as
    they are) go through.
    """

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        here = self.weight.device
        try:
            there = fn(torch.empty(0, device=here)).device
        except (RuntimeError, AssertionError) as e:  # torch without that device raises either
            raise RuntimeError(move_refused(self, here, None)) from e
        if there != here:
            raise RuntimeError(move_refused(self, here, there))
        return super()._apply(fn, recurse)


def move_refused(layer: nn.Module, here: torch.device, there: torch.device | None) -> str:
    target = "another device" if there is None else str(there)
    example = "cuda" if there is None else str(there)
    return (f"{type(layer).__name__} was built on {here} and cannot be moved to {target}: bitsandbytes layers "
            "moved after they are built keep part of their quantization state behind. Build the model on "
            f"the device it runs on instead, e.g. Llama.build(..., device={example!r}) (anything already "
            "moved before this layer is now elsewhere: build the model again)")


class DeviceBoundLinear8bitLt(StaysOnItsDevice, bnb.nn.Linear8bitLt):
    """LLM.int8() (`Linear8bitLt`) on the device it was built on; on the CPU, eval-mode forwards
    take int8_forward_cpu."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_fast_path(self, x):
            return int8_forward_cpu(self, x)
        return super().forward(x)


class DeviceBoundLinear4bit(StaysOnItsDevice, bnb.nn.Linear4bit):
    """nf4/fp4 (`Linear4bit`) on the device it was built on; a weight repacked for the CPU's
    AVX512-BF16 kernel takes gemv_4bit_forward_cpu in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_fast_path(self, x) and getattr(self.weight.quant_state, "packing_format_for_cpu", False):
            return gemv_4bit_forward_cpu(self, x)
        return super().forward(x)


# --- Eval-mode forwards on the CPU in fewer kernels ----------------------------------------------
# At batch 1 bitsandbytes' CPU forwards spend more time in Python and in a dozen small ops than in
# the matmul itself (LLM.int8(): 320 us for a 576 -> 1536 layer, of which _int_mm is 20 us). These
# compute the same numbers, bit for bit, with fewer kernels; training mode and gradients take
# bitsandbytes' own forward. A bias (Qwen2's q/k/v) is added to the output in the activations' dtype:
# bitsandbytes adds it before its last rounding, so a biased layer's numbers may differ from its own
# by that rounding (none with float32 activations unless outlier columns are added).

# As in bitsandbytes' CPU backend: torch._int_mm is fast with AVX-512 (VNNI), a scalar loop without.
INT_MM_IS_FAST_ON_CPU = torch.backends.cpu.get_cpu_capability() == "AVX512"
# Without AVX-512 bitsandbytes multiplies in float32 (its default backend), which first converts the
# whole int8 weight to float32: cheap for a weight whose float copy stays in the caches, four times
# the weight's bytes through memory for one that does not. There _int_mm's scalar loop, which reads
# the int8 bytes once, is faster for a few rows: measured on one AVX2 core with one row, float32 won
# up to 2560 x 2048 (5 M weights) and _int_mm was 4x faster from 11264 x 2048 (23 M) up.
INT_MM_MIN_WEIGHTS_WITHOUT_AVX512 = 1 << 23
INT_MM_MAX_ROWS_WITHOUT_AVX512 = 4  # its time grows with the rows, the float32 product's barely
# bitsandbytes' own constants (the first is not quite 1 / 127**2): the same rounding, the same outputs.
INT8_PRODUCT_SCALE = 6.200124e-05
INT8_WEIGHT_SCALE = 7.874015718698502e-3


def takes_fast_path(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether a CPU forward below may serve layer(x): an eval-mode call without gradients, on an input
    and a weight that are both on the CPU (their kernels read host memory)."""
    return (not layer.training and not x.requires_grad
            and x.device.type == "cpu" and layer.weight.device.type == "cpu")


def with_bias(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """out plus layer's bias, when it has one (never in place: out may be a view of a shared product)."""
    return out if layer.bias is None else out + layer.bias


@dataclass(frozen=True)
class Int8Activation:
    """An activation [rows, in] as LLM.int8() quantizes it for a matmul."""

    ca: torch.Tensor  # [rows, in] int8, outlier columns zeroed when rows > 1
    row_stats: torch.Tensor  # [rows, 1] float32: max |x| per row (outliers excluded), in float16 precision
    cols: torch.Tensor | None  # outlier columns (int64), or None when there are none


def quantize_activation(a: torch.Tensor, threshold: float) -> Int8Activation:
    """bitsandbytes' int8_vectorwise_quant of a [rows, in] (cast to float16 first, as it does)."""
    a16 = a.to(torch.float16)
    magnitudes = a16.abs()
    row_stats = magnitudes.amax(1, keepdim=True).float()  # [rows, 1]
    cols = None
    # Outliers are rare: the largest row maximum tells whether there are any (a host read of a host tensor).
    if threshold > 0 and row_stats.max().item() >= threshold:
        outliers = magnitudes >= threshold
        cols = outliers.any(0).nonzero().view(-1)
        a16 = a16.masked_fill(outliers, 0)
        row_stats = a16.abs().amax(1, keepdim=True).float()
    # bitsandbytes' a16 * (127.0 / row_stats), which Python runs as reciprocal() * 127.0: the same two
    # kernels without the operator's wrapper.
    ca = (a16 * row_stats.reciprocal().mul_(127.0)).round_().to(torch.int8)
    if cols is not None and a.shape[0] > 1:
        ca[:, cols] = 0
    return Int8Activation(ca, row_stats, cols)


class SharedInputGroup:
    """Int8 layers that a block calls one after another on the same input (its wq, wk, wv; its w1,
    w3), computed as one layer: their weights are rows of one int8 matrix (each layer's weight a
    view of its rows, so no byte is held twice), the input is quantized and multiplied once, and
    each layer returns its columns of the product. One product instead of three cost measurably
    less per decode step than the small kernels around each (README); every number is the one the
    layer alone computes, since LLM.int8() scales each output column by its own row of weights.

    Members join as they are built (join); once all have, their weights move into the shared
    matrix. A layer reuses the product only when its input is the very tensor object multiplied
    last (`x is self.x`); holding that tensor keeps its address from being reused, and the model
    does not modify a normed input in place between the calls that read it. After every member has
    read it the product is let go, so none outlives the block's forward.
    """

    def __init__(self, size: int):
        self.size = size
        self.members: list[nn.Module] = []
        self.cb: torch.Tensor | None = None  # [sum of members' out, in] int8, once all have joined
        self.scb: torch.Tensor | None = None  # [sum of members' out] float32
        self.x: torch.Tensor | None = None
        self.product: torch.Tensor | None = None
        self.reads = 0

    def join(self, layer: nn.Module) -> None:
        self.members.append(layer)
        layer.shared_input = self
        if len(self.members) == self.size:
            self.fuse()

    def fuse(self) -> None:
        """Move the members' int8 rows and scales into one matrix; each keeps a view of its rows."""
        self.cb = torch.cat([layer.weight.data for layer in self.members])
        self.scb = torch.cat([layer.weight.SCB for layer in self.members])
        start = 0
        for layer in self.members:
            rows = slice(start, start + layer.out_features)
            layer.weight.data = layer.weight.CB = self.cb[rows]  # the old tensors are freed here
            layer.weight.SCB = self.scb[rows]
            layer.columns = rows
            start = rows.stop
        self.members.clear()  # the layers hold the group, not the other way round

    def columns_for(self, layer: nn.Module, x: torch.Tensor, a: torch.Tensor, threshold: float) -> torch.Tensor:
        """layer's output [rows, out] for x (a is x as [rows, in]): its columns of the shared product,
        computed on the group's first read of x."""
        if x is not self.x or self.product is None:
            self.x, self.product, self.reads = x, int8_product(a, self.cb, self.scb, threshold), 0
        out = self.product[:, layer.columns]
        self.reads += 1
        if self.reads >= self.size:
            self.x, self.product = None, None
        return out


def int8_product(a: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8() of a [rows, in] with int8 weights cb [out, in] and their scales scb [out], exactly as
    bitsandbytes computes it on the CPU (row-wise int8 activations from float16, int32 products,
    outlier columns >= threshold in a's dtype against their dequantized weight columns): [rows, out]."""
    q = quantize_activation(a, threshold)
    # (int32 products * (row scale * column scale)) * constant, bitsandbytes' order; in place after the first.
    out = int32_product(q.ca, cb).mul(q.row_stats * scb).mul_(INT8_PRODUCT_SCALE)  # [rows, out] float32
    if out.dtype != a.dtype:
        out = out.to(a.dtype)
    if q.cols is not None:
        outlier_weights = (cb[:, q.cols] * scb.unsqueeze(1) * INT8_WEIGHT_SCALE).to(a.dtype)  # [out, n_cols]
        out = out.addmm(a[:, q.cols], outlier_weights.t())
    return out


def int32_product(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """ca [rows, in] int8 times cb [out, in] int8 transposed, in int32: [rows, out]. Either route gives
    bitsandbytes' numbers: _int_mm's are exact, and bitsandbytes' own float32 product is exact too
    while its partial sums stay below 2**24 (127 * 127 * in at most: always for in <= 1040, and for
    wider layers unless a row's products nearly all share one sign and their largest size)."""
    if INT_MM_IS_FAST_ON_CPU or (ca.shape[0] <= INT_MM_MAX_ROWS_WITHOUT_AVX512
                                 and cb.numel() >= INT_MM_MIN_WEIGHTS_WITHOUT_AVX512):
        return torch._int_mm(ca, cb.t())
    return torch.matmul(ca.float(), cb.float().t()).to(torch.int32)  # what bitsandbytes does here


def int8_forward_cpu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Linear8bitLt's eval forward, x [..., in] -> [..., out] in x's dtype: int8_product, bit for bit
    what bitsandbytes computes, in fewer kernels. A layer of a SharedInputGroup
    (`layer.shared_input`, set by share_input) takes its columns of the group's product."""
    weight = layer.weight
    a = x.reshape(-1, x.shape[-1])  # [rows, in]
    threshold = layer.state.threshold
    group = layer.__dict__.get("shared_input")  # a plain attribute, when there is one
    if group is not None and group.cb is not None:
        out = group.columns_for(layer, x, a, threshold)
    else:
        scb = weight.SCB if weight.SCB is not None else layer.state.SCB  # [out] float32
        out = int8_product(a, weight.data, scb, threshold)
    return with_bias(layer, out).view(*x.shape[:-1], layer.out_features)


def gemv_4bit_forward_cpu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit's eval forward on a weight repacked for the AVX512-BF16 kernel, x [..., in] ->
    [..., out]: the same kernel bitsandbytes calls (bfloat16 in and out), without the Python layers
    and dispatches around it."""
    state = layer.weight.quant_state
    # The repacked layout exists only where bitsandbytes' CPU library (and so this kernel) loaded.
    kernel = getattr(bnb_cpu_lib, f"gemv_4bit_inference_cpu_{state.quant_type}_bf16")
    n, k = state.shape
    a = x.reshape(-1, k).to(torch.bfloat16).contiguous()  # [rows, in]
    out = torch.empty(a.shape[0], n, dtype=torch.bfloat16)
    kernel(ct.c_int64(a.shape[0]), ct.c_int64(n), ct.c_int64(k), bnbf.get_ptr(a), bnbf.get_ptr(layer.weight.data),
           bnbf.get_ptr(state.absmax), bnbf.get_ptr(out), ct.c_int64(state.blocksize), ct.c_int64(a.stride(0)),
           ct.c_int64(out.stride(0)))
    return with_bias(layer, out.to(x.dtype)).view(*x.shape[:-1], n)


def quantize_linear_on_host(weight: torch.Tensor, cfg: QuantConfig, device: torch.device | str,
                            dtype: torch.dtype) -> nn.Module:
    """Quantize a [out_features, in_features] host weight and return the layer, ready on device."""
    out_features, in_features = weight.shape
    return quantized_linear(quantize_weight(weight, cfg), in_features, out_features, cfg, device, dtype)


def make_linear_hook(cfg: QuantConfig, device: torch.device | str, dtype: torch.dtype) -> LinearHook | None:
    """A loader hook that quantizes each linear weight of the blocks, and with cfg.quantize_head the
    head (an untied `output.weight`, or the `tok_embeddings.weight` a tied head is), in the head's
    mode; None when nothing is quantized."""
    if not cfg.enabled:
        return None

    groups: dict[str, SharedInputGroup] = {}

    def hook(name: str, module: nn.Module, weight: torch.Tensor) -> nn.Module | None:
        if name in HEAD_WEIGHTS:
            return quantize_linear_on_host(weight, cfg.head_config(), device, dtype) if cfg.quantize_head else None
        layer = quantize_linear_on_host(weight, cfg, device, dtype)
        share_input(name, layer, groups)
        return layer

    return hook


# The weights a quantized head is made from: its own, or the embedding's when the two are tied.
HEAD_WEIGHTS = ("output.weight", "tok_embeddings.weight")


class QuantizedEmbedding(nn.Module):
    """The embedding of a model whose tied head is an int8 layer: the rows of that layer's table,
    looked up and dequantized (row * its scale / 127, as bitsandbytes dequantizes them) only for the
    tokens asked for. It holds the head's tensors without registering them, so the one table is
    counted, saved and moved once, as the head's."""

    def __init__(self, head: nn.Module, dtype: torch.dtype):
        super().__init__()
        if not isinstance(head, bnb.nn.Linear8bitLt):
            raise TypeError(f"a tied quantized head must be an int8 layer, got {type(head).__name__}")
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.rows, self.scales = head.weight.data, head.weight.SCB  # [vocab, dim] int8, [vocab] float32
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.rows).float()  # [..., dim]
        return rows.mul_(self.scales[ids].mul(INT8_WEIGHT_SCALE).unsqueeze(-1)).to(self.dtype)


# Layers of a block that the model calls on the same input tensor, one after another, by the kind of
# module holding them (a Mixtral expert, `feed_forward.experts.N`, is of kind "experts").
SHARED_INPUT_GROUPS = {"attention": ("wq", "wk", "wv"), "feed_forward": ("w1", "w3"), "experts": ("w1", "w3")}


def share_input(name: str, layer: nn.Module, groups: dict[str, SharedInputGroup]) -> None:
    """Make the lean int8 layer at module path name (`.weight` optional) a member of its block's
    SharedInputGroup, made on the group's first layer and kept in groups (one dict per model); other
    layers are left as they are."""
    group = shared_input_group(name)
    lean = isinstance(layer, DeviceBoundLinear8bitLt) and layer.weight.device.type == "cpu"
    if group is not None and lean:
        key, size = group
        groups.setdefault(key, SharedInputGroup(size)).join(layer)


def shared_input_group(name: str) -> tuple[str, int] | None:
    """For a block linear weight `layers.N.<part>.<w>.weight` that shares its input with others, the
    group's key (`layers.N.<part>`) and its number of layers; else None."""
    path, _, leaf = name.removesuffix(".weight").rpartition(".")
    kind = next((part for part in reversed(path.split(".")) if not part.isdigit()), "")
    members = SHARED_INPUT_GROUPS.get(kind)
    if not path.startswith("layers.") or members is None or leaf not in members:
        return None
    return path, len(members)


def quantization_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors bitsandbytes layers under module hold outside their parameters (int8 row scales,
    4-bit block scales and code books), for memory accounting."""
    found: list[torch.Tensor] = []
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            found += [t for t in (getattr(m.weight, "SCB", None), m.state.SCB, m.state.CB) if t is not None]
        elif isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            if qs is None:
                continue
            found += [qs.absmax, qs.code]
            if qs.nested:
                found += [qs.offset, qs.state2.absmax, qs.state2.code]
    return [t for t in found if isinstance(t, torch.Tensor)]
