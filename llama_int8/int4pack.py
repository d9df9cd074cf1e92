"""GGUF's Q4_0 / Q4_1 weights served as they are stored, through torch's int4pack matmul kernels.

ggml stores a 4-bit weight as rows of 32-weight blocks along the input: an fp16 scale d (Q4_1: then
an fp16 minimum m), then 16 bytes whose low nibbles are the block's weights 0..15 and high nibbles
16..31. Q4_0 means w = d * (q - 8), Q4_1 w = d * q + m. torch's int4pack kernels
(`_weight_int4pack_mm_for_cpu`, CUDA's `_weight_int4pack_mm`) compute with w = (q - 8) * scale + zero
per group of 32 weights along the input, so the nibbles are repacked once at load, as they are, with
scale d and zero 0 (Q4_0) or zero m + 8d (Q4_1).

Exact in float32: d * (q - 8) and d * q are exact (an 11-bit d times a 4-bit q), so the kernel's one
rounding of (q - 8) * d + zero gives gguf's own float32 value bit for bit whenever zero is exact:
always for Q4_0, and for Q4_1 wherever m + 8d is (both fp16: unless their exponents lie more than 13
apart). bfloat16 scales (CUDA's kernel takes nothing else; on the CPU, a bfloat16 model) round d and
m + 8d to 8 significant bits: close to gguf's weights, not equal.

Speed on the CPU: only the bfloat16 kernel is vectorized (AVX2, AVX-512); float32 and float16 run a
scalar loop, about 50 times slower (1.3 ms against 26 us for a 1536 x 576 weight and one row, one
AVX-512 core).

The CPU layout depends on the CPU's vector width (rows packed in blocks of 64 with AVX-512, 32
otherwise): a weight is packed where it runs and never saved packed. Packing is row-local in those
blocks (and CUDA's in blocks of 8), which is what lets rows be packed a chunk at a time here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .model import fused_bias, member_rows

GROUP_SIZE = 32  # ggml's block: one scale (and zero) per 32 weights along the input
# Bytes of one block by ggml type: fp16 d (and fp16 m for Q4_1), then 16 bytes of nibbles.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
# Rows packed per step: whole CPU packing blocks (64 rows on AVX-512, 32 elsewhere; 8 on CUDA), about
# this many weights, so that the int32 transient the CPU packer reads stays a few MB whatever the layer.
PACK_ROWS = 64
PACK_CHUNK_ELEMENTS = 1 << 18
# What the kernels accept: output rows a multiple of 16 (CPU) or 8 (CUDA); CUDA's k-tiles per load.
CPU_ROW_MULTIPLE, CUDA_ROW_MULTIPLE = 16, 8
CUDA_INNER_K_TILES = (8, 4, 2)


class Int4PackLinear(nn.Module):
    """A linear layer [..., in_features] -> [..., out_features] whose weight is 4-bit values in torch's
    int4pack layout for the device it was packed on (`weight`), with a scale and a zero per group of
    32 along the input (`scales_and_zeros` [in / 32, out, 2]); the bias, when the loader gives one, is
    added in the activations' dtype. Outputs come back in x's dtype; the kernel computes in the
    scales' dtype. It refuses to move off its device: the packed layout is that device's."""

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, scales_and_zeros: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: a layer of an Int4PackProduct holds a column slice of its scales, which the kernel
        # would read wrongly, without an error; the model calls the product instead where it can.
        scales_and_zeros = self.scales_and_zeros.contiguous()
        out = int4pack_product(x.reshape(-1, self.in_features), self.weight, scales_and_zeros)  # [rows, out]
        if out.dtype != x.dtype:  # a no-op .to() is a call too, and calls are what a batch-1 step costs
            out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        here = self.weight.device
        there = fn(torch.empty(0, device=here)).device
        if there != here:
            raise RuntimeError(f"Int4PackLinear was packed for {here}'s int4pack kernel and cannot move to {there}: "
                               "build the model on the device it runs on (Llama.build(..., device=...))")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4PackProduct:
    """Int4PackLinear layers that read the same input as one kernel call (see quantized_layers'
    products): their packed rows are one tensor, each layer's weight a view of its rows (packing is
    row-local in blocks of PACK_ROWS, so every layer but the last must have a multiple of them),
    their scales and zeros one [in / 32, sum of outs, 2] tensor, each layer's a column slice of it.
    Inputs [rows, in] -> [rows, sum of outs] in the inputs' dtype; each column as its layer computes it."""

    def __init__(self, layers: Sequence[Int4PackLinear]):
        if len(layers) == 1:
            self.packed, self.scales_and_zeros = layers[0].weight, layers[0].scales_and_zeros
        else:
            self.packed = torch.cat([layer.weight for layer in layers])
            self.scales_and_zeros = torch.cat([layer.scales_and_zeros for layer in layers], dim=1)
            for layer, rows in zip(layers, member_rows(layers)):  # views; the layers' own tensors are freed
                layer.weight = self.packed[rows]
                layer.scales_and_zeros = self.scales_and_zeros[:, rows]
        self.bias = fused_bias(layers)

    @staticmethod
    def fusable(layers: Sequence[nn.Module]) -> bool:
        """Whether layers are Int4PackLinear layers that can share one product."""
        return (all(type(layer) is Int4PackLinear for layer in layers)
                and len({(layer.weight.device, layer.scales_and_zeros.dtype, layer.in_features)
                         for layer in layers}) == 1
                and all(layer.out_features % PACK_ROWS == 0 for layer in layers[:-1]))

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        out = int4pack_product(a, self.packed, self.scales_and_zeros)
        if out.dtype != a.dtype:
            out = out.to(a.dtype)
        return out if self.bias is None else out.add_(self.bias)


def int4pack_product(a: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """a [rows, in] times the packed weight transposed: [rows, out] in the scales' dtype (the kernels
    take activations in their scales' dtype, contiguous)."""
    if a.dtype != scales_and_zeros.dtype:
        a = a.to(scales_and_zeros.dtype)
    if not a.is_contiguous():
        a = a.contiguous()
    if packed.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(a, packed, GROUP_SIZE, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed, GROUP_SIZE, scales_and_zeros)


def int4pack_linear(blocks: np.ndarray, kind: str, device: torch.device | str, dtype: torch.dtype) -> Int4PackLinear:
    """An Int4PackLinear on device from a weight's ggml blocks (uint8 [out, in / 32 * BLOCK_BYTES[kind]],
    as GGUFReader maps them; kind "Q4_0" or "Q4_1"); dtype is the activations' dtype (see scale_dtype)."""
    device = torch.device(device)
    if kind not in BLOCK_BYTES:
        raise ValueError(f"int4pack serves Q4_0 and Q4_1 blocks, not {kind}")
    rows, width = blocks.shape
    if width % BLOCK_BYTES[kind]:
        raise ValueError(f"{kind} rows of {width} bytes are not whole {BLOCK_BYTES[kind]}-byte blocks")
    in_features = width // BLOCK_BYTES[kind] * GROUP_SIZE
    multiple = CUDA_ROW_MULTIPLE if device.type == "cuda" else CPU_ROW_MULTIPLE
    if rows % multiple:
        raise ValueError(f"a weight of {rows} rows: torch's int4pack kernel on {device.type} needs a multiple "
                         f"of {multiple}; load it with another quant mode")
    packed, scales_and_zeros = pack_blocks(blocks, kind, in_features, device)
    scales_and_zeros = scales_and_zeros.to(device=device, dtype=scale_dtype(device, dtype))
    return Int4PackLinear(in_features, rows, packed, scales_and_zeros).eval()


def pack_blocks(blocks: np.ndarray, kind: str, in_features: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's packed weight (on device) and scales and zeros ([in / 32, out, 2] float32, on the
    host) of a weight's ggml blocks, converted a chunk of whole packing blocks of rows at a time."""
    rows = blocks.shape[0]
    # On the CPU the packed weight itself; for CUDA the byte pairs its converter reads.
    nibble_bytes = torch.empty(rows, in_features // 2, dtype=torch.uint8)
    scales_and_zeros = torch.empty(in_features // GROUP_SIZE, rows, 2, dtype=torch.float32)
    step = max(PACK_ROWS, PACK_CHUNK_ELEMENTS // in_features // PACK_ROWS * PACK_ROWS)
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        q, scale, zero = unpack_q4_blocks(blocks[chunk], kind)
        nibble_bytes[chunk] = nibble_pairs(q) if device.type == "cuda" else pack_for_cpu(q)
        # [rows, groups, 2] -> [groups, rows, 2]
        scales_and_zeros[:, chunk] = torch.stack([scale, zero], dim=-1).transpose(0, 1)
    if device.type != "cuda":
        return nibble_bytes, scales_and_zeros
    inner_k_tiles = next(t for t in CUDA_INNER_K_TILES if in_features % (16 * t) == 0)
    return torch._convert_weight_to_int4pack(nibble_bytes.to(device), inner_k_tiles), scales_and_zeros


def unpack_q4_blocks(blocks: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml blocks [rows, groups * BLOCK_BYTES[kind]] -> the 4-bit values q [rows, groups * 32] (uint8,
    0..15) and, per block, the kernel's scale and zero [rows, groups] (float32) for w = (q - 8) * scale + zero."""
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, BLOCK_BYTES[kind])  # [rows, groups, bytes]
    d = b[..., 0:2].view(np.float16)[..., 0].astype(np.float32)  # [rows, groups]
    if kind == "Q4_0":
        zero = np.zeros_like(d)
    else:
        zero = b[..., 2:4].view(np.float16)[..., 0].astype(np.float32) + 8 * d  # m + 8d
    nibbles = b[..., -16:]  # [rows, groups, 16]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, -1)  # [rows, groups * 32]
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero)


def pack_for_cpu(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [rows, in] (uint8) in the CPU kernel's layout, [rows, in / 2] uint8."""
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)  # the CPU ignores inner k-tiles


def nibble_pairs(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [rows, in] as the bytes CUDA's converter reads, [rows, in / 2]: weight 2j in the
    high nibble of byte j, weight 2j + 1 in the low one."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def scale_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype an Int4PackLinear's scales (and so its product) take: bfloat16 on CUDA, whose kernel
    takes nothing else; on the CPU the activations' dtype (float32: gguf's weights exactly)."""
    return torch.bfloat16 if device.type == "cuda" else dtype


def int4pack_bytes(out_features: int, in_features: int, scales: torch.dtype) -> int:
    """Bytes of a packed weight: 4 bits a weight, and a scale and a zero in dtype scales per 32 weights."""
    return out_features * in_features // 2 + 2 * scales.itemsize * out_features * (in_features // GROUP_SIZE)


def int4pack_weight(layer: Int4PackLinear) -> torch.Tensor:
    """The [out, in] weight layer's kernel computes with, in its scales' dtype: the layer's product with
    the identity, exact, since each output is one weight times 1 plus zeros (in bfloat16, the weights
    rounded to bfloat16)."""
    eye = torch.eye(layer.in_features, dtype=layer.scales_and_zeros.dtype, device=layer.weight.device)
    return int4pack_product(eye, layer.weight, layer.scales_and_zeros).t()  # [in, out] -> [out, in]
