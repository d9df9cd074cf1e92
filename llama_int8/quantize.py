"""Quantize linear weights on the host with bitsandbytes: LLM.int8() and 4-bit nf4/fp4.

Each weight is quantized on the CPU a block of rows at a time, so the transient is a small fraction
of the weight whatever its size. A quantized weight is described by the tensors of bitsandbytes' own
state dict (int8: `weight`, `SCB`; 4-bit: `weight`, `weight.absmax`, `weight.quant_map`, ...): what
pre-baked folders store and what `quantized_layers` builds device layers from.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace

import torch

# bitsandbytes' CPU backend warns at import that an optional hub-fetched kernel is absent (its own
# kernel serves), and LLM.int8() logs its float16 cast on every call: neither is news to a user.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402  (after the logger settings above)
import bitsandbytes.functional as bnbf  # noqa: E402

from .int4pack import GROUP_SIZE, int4pack_bytes  # noqa: E402

BITSANDBYTES_VERSION = bnb.__version__

# What --quant accepts; litgpt's names ("bnb.nf4", ...) are accepted too.
QUANT_MODES = ("int8", "nf4", "nf4-dq", "fp4", "fp4-dq", "gguf", "none")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Weights per 4-bit scale. 64 is bitsandbytes' default. With double quantization a scale costs 8
# bits instead of 32, so 32-weight blocks cost 4.25 bits per weight, less than nf4's 4.5, and measured
# better than it (SmolLM2-135M perplexity, README): the -dq modes use them.
DEFAULT_BLOCKSIZE = 64
DEFAULT_BLOCKSIZE_DOUBLE_QUANT = 32
# gguf mode keeps ggml's blocks: 32 weights per scale.
GGUF_BLOCKSIZE = GROUP_SIZE
# Elements quantized per step: bounds the transient (about 8 bytes per element for int8, 10 for
# 4-bit) to a few MB whatever the layer's size; a 1 MB float32 chunk stays in a core's L2 cache,
# which measured twice as fast as 4 MB chunks.
CHUNK_ELEMENTS = 1 << 18
# The output head is quantized LLM.int8() in every quantized mode, a tied one as one table shared
# with the embedding. Its int8 rows cost SmolLM2-135M +0.4% perplexity in int8, +0.2% in nf4 (README), and
# on a CPU without AVX-512 bitsandbytes dequantizes a 4-bit weight whole on every call
# (163 ms a token for SmolLM2's 49152 x 576 head on 2 AVX2 cores, against 11 ms for its float32 head).
HEAD_MODE = "int8"
# Whether the head is quantized when the caller does not say (quantize_head=None): on, in every
# quantized mode. Loading and pre-baking both resolve None here, so that a folder baked at defaults
# holds the model a load at defaults builds.
QUANTIZE_HEAD_DEFAULT = True
# Why a gguf QuantConfig reaches no quantizer, pre-baked folder or export.
GGUF_QUANTIZES_NOTHING = ("quant mode 'gguf' quantizes nothing: it packs a GGUF file's Q4_0/Q4_1 weights at load, "
                          "for the kernel of the machine it runs on, so it cannot be pre-baked or exported; load the "
                          ".gguf file with --quant gguf, or choose int8, nf4, nf4-dq, fp4 or fp4-dq")


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or infinite values, which quantizing would turn into garbage silently."""


@dataclass(frozen=True)
class QuantConfig:
    """How linear weights are quantized.

    mode: "int8" (LLM.int8(), `Linear8bitLt`), "nf4" or "fp4" (`Linear4bit`), "gguf" (a GGUF file's
        Q4_0 / Q4_1 block weights as stored, through torch's int4pack kernel: int4pack.py; it
        quantizes nothing itself), or "none".
    double_quant: 4-bit only: quantize the per-block scales too (4.127 instead of 4.5 bits/weight).
    int8_threshold: LLM.int8()'s outlier threshold on activations (0 disables the fp16 outlier path).
    blocksize: 4-bit only: weights per scale.
    quantize_head: quantize the output head as well; a head tied to the embedding becomes one
        quantized table both read.
    head_mode: the head's mode when quantized: HEAD_MODE, or None for the blocks' own mode (what
        pre-baked folders and transformers' folders written without this field hold).
    """

    mode: str = "int8"
    double_quant: bool = False
    int8_threshold: float = 6.0
    blocksize: int = DEFAULT_BLOCKSIZE
    quantize_head: bool = False
    head_mode: str | None = None

    @property
    def name(self) -> str:
        """The --quant spelling of this mode: int8, nf4, nf4-dq, fp4, fp4-dq or none."""
        return self.mode + ("-dq" if self.double_quant else "")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_4bit(self) -> bool:
        """bitsandbytes' 4-bit modes (gguf's 4-bit blocks are torch's int4pack layers, not these)."""
        return self.mode in ("nf4", "fp4")

    def head_config(self) -> QuantConfig:
        """How the output head is quantized (when quantize_head says it is)."""
        if self.head_mode is None or self.head_mode == self.mode:
            return replace(self, quantize_head=False, head_mode=None)
        return QuantConfig(mode=self.head_mode, int8_threshold=self.int8_threshold)

    def layer_config(self, layer: str) -> QuantConfig:
        """The config of the quantized layer at module path layer: the head's, or the blocks'."""
        return self.head_config() if layer == "output" else self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        cfg = cls(**d)
        check_config(cfg)
        return cfg


def parse_quant_mode(mode: str, int8_threshold: float = 6.0, blocksize: int | None = None,
                     quantize_head: bool | None = False) -> QuantConfig:
    """A QuantConfig from a --quant value (`int8`, `nf4-dq`, litgpt's `bnb.nf4`, ...).

    blocksize: 4-bit weights per scale; None takes 64, or 32 for the double-quantized modes and for
    gguf, which keeps ggml's 32-weight blocks and takes no other.
    quantize_head: None, what a user who did not say gets, takes QUANTIZE_HEAD_DEFAULT; the head is
    never quantized in mode none.
    """
    if not isinstance(mode, str) or mode.removeprefix("bnb.") not in QUANT_MODES:
        raise ValueError(f"quant: {mode!r} is not one of {', '.join(QUANT_MODES)} "
                         "(litgpt's bnb.int8, bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq are accepted too)")
    kind, _, dq = mode.removeprefix("bnb.").partition("-")
    if blocksize is None:
        blocksize = (GGUF_BLOCKSIZE if kind == "gguf" else DEFAULT_BLOCKSIZE_DOUBLE_QUANT if dq == "dq"
                     else DEFAULT_BLOCKSIZE)
    head = (QUANTIZE_HEAD_DEFAULT if quantize_head is None else bool(quantize_head)) and kind != "none"
    cfg = QuantConfig(mode=kind, double_quant=dq == "dq", int8_threshold=float(int8_threshold),
                      blocksize=int(blocksize), quantize_head=head, head_mode=HEAD_MODE if head else None)
    check_config(cfg)
    return cfg


def check_config(cfg: QuantConfig) -> None:
    if cfg.mode not in ("int8", "nf4", "fp4", "gguf", "none"):
        raise ValueError(f"quant mode {cfg.mode!r} is not int8, nf4, fp4, gguf or none")
    if cfg.double_quant and not cfg.is_4bit:
        raise ValueError(f"double quantization applies to nf4/fp4, not {cfg.mode}")
    if cfg.blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize {cfg.blocksize} is not one of {BLOCKSIZES_4BIT}")
    if cfg.mode == "gguf" and cfg.blocksize != GGUF_BLOCKSIZE:
        raise ValueError(f"blocksize: quant 'gguf' keeps ggml's {GGUF_BLOCKSIZE}-weight blocks, got {cfg.blocksize}")
    if cfg.head_mode not in (None, HEAD_MODE):
        raise ValueError(f"head_mode {cfg.head_mode!r} is not {HEAD_MODE!r} or None (the blocks' mode)")
    if not cfg.int8_threshold >= 0.0:
        raise ValueError(f"int8_threshold must be >= 0 (0 disables the outlier path), got {cfg.int8_threshold}")


# --- Quantizing one weight on the host ----------------------------------------------------------

def chunk_rows(out_features: int, in_features: int, blocksize: int) -> int:
    """Rows per quantization step: about CHUNK_ELEMENTS, and whole 4-bit blocks, so that the chunked
    result is bit-identical to quantizing the flattened tensor at once."""
    step = blocksize // math.gcd(in_features, blocksize)
    rows = max(step, CHUNK_ELEMENTS // in_features // step * step)
    return min(rows, out_features)


def quantize_weight(weight: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """Quantize a [out_features, in_features] weight on the CPU; returns bitsandbytes' state-dict tensors.

    Reads weight a chunk of rows at a time and never converts it whole, so the transient stays a
    small fraction of it. The result depends only on the weight's values, not on the dtype the model
    will compute in.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D linear weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {weight.dtype}")
    weight = weight.detach()
    if weight.device.type != "cpu":
        raise ValueError(f"quantize_weight works on the host; the weight is on {weight.device}")
    if cfg.mode == "int8":
        return quantize_int8(weight)
    if cfg.is_4bit:
        return quantize_4bit(weight, cfg)
    if cfg.mode == "gguf":
        raise ValueError(GGUF_QUANTIZES_NOTHING)
    raise ValueError(f"quant mode {cfg.name!r} does not quantize")


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """LLM.int8()'s vector-wise quantization: per output row, q = round(w * 127 / max|w|), scale max|w|.

    The formula of bitsandbytes' int8_vectorwise_quant, computed in float32 from the source instead of
    through float16 (which turns weights beyond 65504 into inf); identical for bf16/fp16 sources.
    """
    n, k = weight.shape
    cb = torch.empty(n, k, dtype=torch.int8)
    scb = torch.empty(n, dtype=torch.float32)
    rows = chunk_rows(n, k, 1)
    for start in range(0, n, rows):
        block = weight[start:start + rows].to(torch.float32, copy=True)  # a copy: never in place on weight
        absmax = torch.maximum(block.amax(dim=1), block.amin(dim=1).neg_())  # [rows], no |block| temporary
        scb[start:start + rows] = absmax
        scale = (127.0 / absmax.clamp_min(torch.finfo(torch.float32).tiny)).unsqueeze(1)  # [rows, 1]
        cb[start:start + rows] = block.mul_(scale).round_()
    check_finite_scales(scb, "row")
    return {"weight": cb, "SCB": scb}


def quantize_int8_as_bitsandbytes(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """LLM.int8()'s row-wise quantization as bitsandbytes' Int8Params makes it (what transformers
    saves): the rows cast to float16 first, then its own int8_vectorwise_quant, a chunk of rows at a
    time (the scales are per row, so chunks give the bytes of the whole weight; at threshold 0 it
    leaves its input unchanged, so a float16 source is read in place). From a float32
    source the float16 cast moves some scales (2e-4 relative) and int8 values (by 1) away from
    quantize_int8's; a value beyond float16's range becomes inf, which is refused."""
    n, k = weight.shape
    cb = torch.empty(n, k, dtype=torch.int8)
    scb = torch.empty(n, dtype=torch.float32)
    rows = chunk_rows(n, k, 1)
    for start in range(0, n, rows):
        q, scale, _ = bnbf.int8_vectorwise_quant(weight[start:start + rows].to(torch.float16))
        cb[start:start + rows], scb[start:start + rows] = q, scale
    bad = (~torch.isfinite(scb)).nonzero()
    if len(bad):
        raise NonFiniteWeightError(f"holds NaN, infinite values or values beyond float16's +-65504, through which "
                                   f"bitsandbytes quantizes int8 (in {len(bad)} rows; the first: row {int(bad[0])})")
    return {"weight": cb, "SCB": scb}


def check_finite_scales(absmax: torch.Tensor, unit: str) -> None:
    """Raise NonFiniteWeightError when a scale is NaN or infinite: each scale is the largest |value|
    of its row or block, which NaN or an infinity there makes non-finite, so this checks every value
    of the weight at the cost of one look at the scales."""
    bad = (~torch.isfinite(absmax)).nonzero()
    if len(bad):
        raise NonFiniteWeightError(f"holds NaN or infinite values (in {len(bad)} {unit}s; the first: {unit} "
                                   f"{int(bad[0])})")


def quantize_4bit(weight: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """Blockwise nf4/fp4 through bitsandbytes, a chunk of whole blocks at a time; with double
    quantization the per-block scales are then quantized together, as bitsandbytes does."""
    n, k = weight.shape
    numel, bs = n * k, cfg.blocksize
    packed = torch.empty((numel + 1) // 2, 1, dtype=torch.uint8)
    absmax = torch.empty(-(numel // -bs), dtype=torch.float32)
    rows = chunk_rows(n, k, bs)
    for start in range(0, n, rows):
        block = weight[start:start + rows]
        first = start * k  # a multiple of the blocksize (and even) by the choice of rows
        q, state = bnbf.quantize_4bit(block.contiguous(), blocksize=bs, compress_statistics=False,
                                      quant_type=cfg.mode)
        packed[first // 2:first // 2 + q.shape[0]] = q
        absmax[first // bs:first // bs + state.absmax.numel()] = state.absmax
    check_finite_scales(absmax, "block")
    code = bnbf.get_4bit_type(cfg.mode, device="cpu")
    if cfg.double_quant:
        offset = absmax.mean()
        qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
        state = bnbf.QuantState(absmax=qabsmax, shape=weight.shape, code=code, blocksize=bs, quant_type=cfg.mode,
                                dtype=weight.dtype, offset=offset, state2=state2)
    else:
        state = bnbf.QuantState(absmax=absmax, shape=weight.shape, code=code, blocksize=bs, quant_type=cfg.mode,
                                dtype=weight.dtype)
    return {"weight": packed, **{f"weight.{key}": value for key, value in state.as_dict(packed=True).items()}}


def quantized_layer_names(n_layers: int, quantize_head: bool, n_experts: int = 0) -> list[str]:
    """Module paths of the layers a QuantConfig quantizes, in checkpoint order: every linear of the
    blocks (with n_experts, each expert's; the router stays 16-bit), and the head if asked."""
    names = [f"layers.{i}.{part}" for i in range(n_layers)
             for part in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                          *feed_forward_linear_names(n_experts))]
    return names + (["output"] if quantize_head else [])


def feed_forward_linear_names(n_experts: int) -> list[str]:
    """The quantized linears of a block's feed-forward: its own w1, w2, w3, or each expert's."""
    parts = ("w1", "w2", "w3")
    if not n_experts:
        return [f"feed_forward.{w}" for w in parts]
    return [f"feed_forward.experts.{e}.{w}" for e in range(n_experts) for w in parts]


# --- Describing quantized tensors ---------------------------------------------------------------

def expected_quantized_tensors(out_features: int, in_features: int, cfg: QuantConfig
                               ) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
    """The tensors quantize_weight produces for a weight of this shape: name -> (shape, dtype);
    shape None where it varies (the packed JSON of the 4-bit state)."""
    if cfg.mode == "gguf":
        raise ValueError(GGUF_QUANTIZES_NOTHING)
    numel = out_features * in_features
    if cfg.mode == "int8":
        return {"weight": ((out_features, in_features), torch.int8), "SCB": ((out_features,), torch.float32)}
    blocks = -(numel // -cfg.blocksize)
    out: dict[str, tuple[tuple[int, ...] | None, torch.dtype]] = {"weight": (((numel + 1) // 2, 1), torch.uint8)}
    if cfg.double_quant:
        out["weight.absmax"] = ((blocks,), torch.uint8)
        out["weight.nested_absmax"] = ((-(blocks // -256),), torch.float32)
        out["weight.nested_quant_map"] = ((256,), torch.float32)
    else:
        out["weight.absmax"] = ((blocks,), torch.float32)
    out["weight.quant_map"] = ((16,), torch.float32)
    out[f"weight.quant_state.bitsandbytes__{cfg.mode}"] = (None, torch.uint8)
    return out


def check_packed_quant_state(tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                             cfg: QuantConfig) -> str | None:
    """What is wrong with a 4-bit layer's packed state (its JSON), or None when it matches cfg."""
    packed = tensors.get(f"weight.quant_state.bitsandbytes__{cfg.mode}")
    if packed is None:
        return f"no weight.quant_state.bitsandbytes__{cfg.mode} tensor"
    try:
        state = json.loads(bytes(packed.flatten().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        return f"its packed quant state is not JSON ({e})"
    if not isinstance(state, dict):
        return f"its packed quant state is JSON {type(state).__name__}, not an object"
    want = {"quant_type": cfg.mode, "blocksize": cfg.blocksize, "shape": [out_features, in_features]}
    got = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in state.items() if k in want}
    if got != want:
        return f"its quant state says {got}, expected {want}"
    return None


def quantized_weight_bytes(out_features: int, in_features: int, cfg: QuantConfig,
                           scales: torch.dtype = torch.float32) -> int:
    """Bytes a quantized [out_features, in_features] weight occupies, scales and code books included
    (the few hundred bytes of a 4-bit layer's packed JSON state excepted); scales: the dtype a gguf
    layer's scales take (int4pack.scale_dtype), unused in the other modes."""
    if cfg.mode == "gguf":
        return int4pack_bytes(out_features, in_features, scales)
    return sum(math.prod(shape) * dtype.itemsize
               for shape, dtype in expected_quantized_tensors(out_features, in_features, cfg).values()
               if shape is not None)
