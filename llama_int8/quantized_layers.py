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
from functools import partial
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .int4pack import Int4PackProduct
from .model import Linear, fuse_linear, fused_bias, member_rows

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
    # Not vector_norm(inf), one kernel but a scalar loop on the CPU: 3x slower at one row, 8x at eight.
    magnitudes = a16.abs()
    row_stats = magnitudes.amax(1, keepdim=True).float()  # [rows, 1]
    cols = None
    # Outliers are rare: the largest row maximum tells whether there are any (a host read of a host tensor).
    if threshold > 0 and (row_stats if a.shape[0] == 1 else row_stats.max()).item() >= threshold:
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


def int8_product(a: torch.Tensor, cb_t: torch.Tensor, scb: torch.Tensor, threshold: float,
                 outlier_weights: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None = None) -> torch.Tensor:
    """LLM.int8() of a [rows, in] with int8 weights cb_t [in, out] (the layer's [out, in] transposed)
    and their scales scb [out], exactly as bitsandbytes computes it on the CPU (row-wise int8
    activations from float16, int32 products, outlier columns >= threshold in a's dtype against
    their dequantized weight columns): [rows, out]. outlier_weights(cols, dtype): those weight
    columns [out, n_cols], as dequantized_columns computes them (a product may keep them)."""
    q = quantize_activation(a, threshold)
    # (int32 products * (row scale * column scale)) * constant, bitsandbytes' order; in place after the first.
    out = int32_product(q.ca, cb_t).mul(q.row_stats * scb).mul_(INT8_PRODUCT_SCALE)  # [rows, out] float32
    if out.dtype != a.dtype:
        out = out.to(a.dtype)
    if q.cols is not None:
        weights = (outlier_weights or partial(dequantized_columns, cb_t, scb))(q.cols, a.dtype)
        out = out.addmm(a.index_select(1, q.cols), weights.t())
    return out


def dequantized_columns(cb_t: torch.Tensor, scb: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Columns cols of the int8 weight [out, in] (given as cb_t [in, out]) dequantized to dtype as
    bitsandbytes does for its outlier product: [out, n_cols]. index_select, since indexing a wide
    int8 matrix's columns with [:, cols] is ~50x slower on the CPU."""
    return (cb_t.t().index_select(1, cols) * scb.unsqueeze(1) * INT8_WEIGHT_SCALE).to(dtype)


def int32_product(ca: torch.Tensor, cb_t: torch.Tensor) -> torch.Tensor:
    """ca [rows, in] int8 times cb_t [in, out] int8, in int32: [rows, out]. Either route gives
    bitsandbytes' numbers: _int_mm's are exact, and bitsandbytes' own float32 product is exact too
    while its partial sums stay below 2**24 (127 * 127 * in at most: always for in <= 1040, and for
    wider layers unless a row's products nearly all share one sign and their largest size)."""
    if INT_MM_IS_FAST_ON_CPU or (ca.shape[0] <= INT_MM_MAX_ROWS_WITHOUT_AVX512
                                 and cb_t.numel() >= INT_MM_MIN_WEIGHTS_WITHOUT_AVX512):
        return torch._int_mm(ca, cb_t)
    return torch.matmul(ca.float(), cb_t.float()).to(torch.int32)  # what bitsandbytes does here


def int8_forward_cpu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Linear8bitLt's eval forward, x [..., in] -> [..., out] in x's dtype: int8_product, bit for bit
    what bitsandbytes computes, in fewer kernels."""
    weight = layer.weight
    scb = weight.SCB if weight.SCB is not None else layer.state.SCB  # [out] float32
    out = int8_product(x.reshape(-1, x.shape[-1]), weight.data.t(), scb, layer.state.threshold)
    return with_bias(layer, out).view(*x.shape[:-1], layer.out_features)


def gemv_4bit_forward_cpu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit's eval forward on a weight repacked for the AVX512-BF16 kernel, x [..., in] ->
    [..., out]: the same kernel bitsandbytes calls (bfloat16 in and out), without the Python layers
    and dispatches around it."""
    out = Gemv4bitProduct([layer])(x.reshape(-1, layer.in_features))
    return out.view(*x.shape[:-1], layer.out_features)


# --- Products: what the model calls at inference --------------------------------------------------
# A product computes, for inputs a [rows, in], the outputs [rows, sum of outs] of one or more linear
# layers that read the same input (a block's wq, wk, wv; its w1, w3), side by side, in a's dtype:
# one call where a decode step would otherwise go through each layer's module, its wrappers and the
# small kernels around each matmul. Each returns exactly the numbers its layers compute alone.
# The model takes them from fused_product at load (Transformer.fuse_projections) and calls them
# under inference only; the layers stay in place, for training, saving and memory accounting.

# `--int8_matmul` choices: LLM.int8() itself, or a weight-only product of the same stored bytes
# (bfloat16 activations against the int8 weights and their scales) for steps of few rows.
INT8_MATMULS = ("llm.int8", "weight_only")
# Rows up to which the weight-only product is faster than LLM.int8()'s _int_mm (README: measured
# crossover); above it the step takes LLM.int8() as the default mode does.
WEIGHT_ONLY_MAX_ROWS = 4
# Outlier weight columns an int8 product keeps dequantized (see Int8Product.outlier_weights): at most
# this many times its output size in values (a column of the head's is its vocabulary).
KEPT_OUTLIER_COLUMNS = 16
# Rows of the bfloat16 output a 4-bit product keeps from call to call (Gemv4bitProduct.output).
KEPT_OUTPUT_ROWS = 8


class Int8Product:
    """LLM.int8() of int8 layers sharing an input: their rows are one int8 matrix, each layer's weight a
    view of its rows (no byte held twice), the input quantized and multiplied once; bit for bit what
    each layer computes (LLM.int8() scales each output column by its own row of weights). With
    weight_only, steps of up to WEIGHT_ONLY_MAX_ROWS rows take _weight_int8pack_mm instead: bfloat16
    activations times the same int8 bytes and per-row scales, without LLM.int8()'s activation
    rounding or outlier split (closer to the stored weights, not bit-equal to bitsandbytes)."""

    def __init__(self, layers: Sequence[nn.Module], weight_only: bool):
        if len(layers) == 1:
            cb, scb = layers[0].weight.data, layers[0].weight.SCB
        else:
            cb = torch.cat([layer.weight.data for layer in layers])
            scb = torch.cat([layer.weight.SCB for layer in layers])
            for layer, rows in zip(layers, member_rows(layers)):  # views of its rows; its own tensors are freed
                layer.weight.data = layer.weight.CB = cb[rows]
                layer.weight.SCB = scb[rows]
        self.cb, self.cb_t, self.scb = cb, cb.t(), scb
        self.threshold = layers[0].state.threshold
        self.bias = fused_bias(layers)
        self.weight_only_rows = WEIGHT_ONLY_MAX_ROWS if weight_only else 0
        # The kernel takes bfloat16 scales only, which would round each row's to 8 bits (+0.17% perplexity
        # on SmolLM2): it gets ones, and the float32 scales multiply its output.
        self.ones = torch.ones_like(scb, dtype=torch.bfloat16) if weight_only else None  # [out]
        self.row_scales = scb * INT8_WEIGHT_SCALE if weight_only else None  # [out] float32
        self.kept_columns: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # see outlier_weights

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        if a.shape[0] <= self.weight_only_rows:
            out = torch._weight_int8pack_mm(a.to(torch.bfloat16), self.cb, self.ones).mul(self.row_scales)
            if out.dtype != a.dtype:  # float32 from the scaling
                out = out.to(a.dtype)
        else:
            out = int8_product(a, self.cb_t, self.scb, self.threshold, self.outlier_weights)
        return out if self.bias is None else out.add_(self.bias)

    def outlier_weights(self, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dequantized_columns, each column kept once made: LLM.int8()'s outliers sit in a few
        feature columns, token after token, in sets that vary, and gathering columns of a wide matrix
        (the head's) costs more than its whole int8 product. Up to KEPT_OUTLIER_COLUMNS are kept; a
        set with any column not kept is gathered whole, in one call."""
        names = cols.tolist()
        kept = [self.kept_columns.get((col, dtype)) for col in names]
        if all(column is not None for column in kept):
            return torch.stack(kept, dim=1)  # [out, n_cols]
        weights = dequantized_columns(self.cb_t, self.scb, cols, dtype)
        for i, col in enumerate(names):
            if kept[i] is None and len(self.kept_columns) < KEPT_OUTLIER_COLUMNS:
                self.kept_columns[col, dtype] = weights[:, i].clone()  # a copy: a view would hold all of weights
        return weights


class Gemv4bitProduct:
    """bitsandbytes' AVX512-BF16 4-bit kernel over layers sharing an input, each writing its columns
    of one output: one cast of the input, one output, one kernel call per layer (their weights and
    block scales stay where they are)."""

    def __init__(self, layers: Sequence[nn.Module]):
        state = layers[0].weight.quant_state
        self.kernel = getattr(bnb_cpu_lib, f"gemv_4bit_inference_cpu_{state.quant_type}_bf16")
        self.k, self.blocksize = layers[0].in_features, ct.c_int64(state.blocksize)
        self.n = sum(layer.out_features for layer in layers)
        # (rows of output, weight, block scales, byte offset of its first output column)
        self.parts = [(ct.c_int64(layer.out_features), bnbf.get_ptr(layer.weight.data),
                       bnbf.get_ptr(layer.weight.quant_state.absmax), rows.start * torch.bfloat16.itemsize)
                      for layer, rows in zip(layers, member_rows(layers))]
        self.held = [(layer.weight.data, layer.weight.quant_state.absmax) for layer in layers]  # the pointers' owners
        self.bias = fused_bias(layers)
        self.buffer: torch.Tensor | None = None  # see output

    def output(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """Where the kernel writes [rows, n] bfloat16: a buffer kept for decode steps (up to
        KEPT_OUTPUT_ROWS rows) when the result is converted to another dtype, a copy that leaves it
        free for the next call; a new tensor otherwise."""
        if dtype == torch.bfloat16 or rows > KEPT_OUTPUT_ROWS:
            return torch.empty(rows, self.n, dtype=torch.bfloat16)
        if self.buffer is None or self.buffer.shape[0] != rows:
            self.buffer = torch.empty(rows, self.n, dtype=torch.bfloat16)
        return self.buffer

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        rows, bf16 = a.shape[0], a.dtype == torch.bfloat16
        a16 = a.contiguous() if bf16 else a.to(torch.bfloat16).contiguous()
        out = self.output(rows, a.dtype)
        m, k, ldc = ct.c_int64(rows), ct.c_int64(self.k), ct.c_int64(self.n)  # a16's rows are k apart
        a_ptr, out_ptr = ct.c_void_p(a16.data_ptr()), out.data_ptr()
        for n, weight, absmax, offset in self.parts:
            self.kernel(m, n, k, a_ptr, weight, absmax, ct.c_void_p(out_ptr + offset), self.blocksize, k, ldc)
        if not bf16:
            out = out.to(a.dtype)
        return out if self.bias is None else out.add_(self.bias)


def fused_product(layers: Sequence[nn.Module],
                  int8_matmul: str = "llm.int8") -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A product (see above) of layers that read the same input, or None where they cannot share one
    (layers of different kinds, quantized layers off the CPU, some with a bias and some without):
    the model then calls the layers themselves. int8_matmul: one of INT8_MATMULS."""
    if int8_matmul not in INT8_MATMULS:
        raise ValueError(f"int8_matmul={int8_matmul!r} is not one of {INT8_MATMULS}")
    if len({layer.in_features for layer in layers}) != 1 or not uniform_bias(layers):
        return None
    first = layers[0]
    on_cpu = all(layer.weight.device.type == "cpu" for layer in layers)
    if on_cpu and all(type(layer) is DeviceBoundLinear8bitLt for layer in layers):
        thresholds = {layer.state.threshold for layer in layers}
        if len(thresholds) == 1 and all(layer.weight.SCB is not None for layer in layers):
            return Int8Product(layers, weight_only=int8_matmul == "weight_only")
        return None
    if on_cpu and all(type(layer) is DeviceBoundLinear4bit for layer in layers):
        states = [layer.weight.quant_state for layer in layers]
        if (all(getattr(qs, "packing_format_for_cpu", False) for qs in states)
                and len({(qs.quant_type, qs.blocksize) for qs in states}) == 1):
            return Gemv4bitProduct(layers)
        return None
    if Int4PackProduct.fusable(layers):
        return Int4PackProduct(layers)
    if type(first) is not Linear:
        return None
    return fuse_linear(layers)


def uniform_bias(layers: Sequence[nn.Module]) -> bool:
    """Whether all of layers have a bias or none has."""
    return len({layer.bias is None for layer in layers}) == 1


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

    def hook(name: str, module: nn.Module, weight: torch.Tensor) -> nn.Module | None:
        if name in HEAD_WEIGHTS:
            return quantize_linear_on_host(weight, cfg.head_config(), device, dtype) if cfg.quantize_head else None
        return quantize_linear_on_host(weight, cfg, device, dtype)

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
