"""The LLaMA family as plain PyTorch modules: config, norm, rotary, cache, attention, MLP, blocks.

Parameter names follow Meta's checkpoints (`tok_embeddings`, `layers.N.attention.wq`, ...), and the
rotary embedding uses Meta's interleaved layout (dimension pairs 2i, 2i+1); Hugging Face weights are
converted to it when read, except layers stored quantized, whose rows cannot be reordered exactly:
those models rotate in Hugging Face's layout instead (`rope_layout="halves"`). No I/O and no
quantization here: the loader fills the parameters and the quantizer swaps `Linear` modules from
outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "flash", "math")
# How q/k rows pair the dimensions they rotate: Meta's interleaved pairs (2i, 2i+1), or Hugging
# Face's halves (i, i + head_dim/2) of checkpoints whose quantized rows are used as stored.
ROPE_LAYOUTS = ("interleaved", "halves")
# What the KV cache holds: keys and values in the model's dtype, or int8 with one scale per position
# and key/value head (Int8KVCache): half the bytes of a 16-bit cache, plus the scales.
KV_CACHES = ("model", "int8")
# Positions of an int8 cache that attention dequantizes at a time: see attend_int8.
KV_CHUNK = 1024
# oneDNN's inner product, the kernel torch.compile gives float32 linears on the CPU: see Linear.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    head_dim: int | None = None  # None: dim // n_heads
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit feed-forward size; overrides Meta's rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3" | "linear", ...}
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int | None = None
    rope_layout: str = "interleaved"  # one of ROPE_LAYOUTS
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # each head's q and k RMS-normalized over head_dim before the rotation (Qwen3)
    n_experts: int = 0  # feed-forward experts per block (Mixtral); 0: one dense feed-forward
    experts_per_token: int = 0  # experts each token is routed to, when n_experts > 0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout={self.rope_layout!r} is not one of {ROPE_LAYOUTS}")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be from 1 to n_experts={self.n_experts}")

    @property
    def ffn_hidden_dim(self) -> int:
        """Feed-forward width: explicit, or Meta's rule (2/3 of 4*dim, scaled, rounded up)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel, no copies
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # The kernel sums the squares of 16-bit inputs in float32 and rounds once; the weight multiplies
        # the rounded result, in x's dtype, as Hugging Face's LLaMA does.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class Linear(nn.Linear):
    """nn.Linear whose float32 inference on the CPU calls oneDNN's inner product directly.

    With one row per sequence (decode) ATen sends a float32 linear to MKL's gemv, which reads the
    weight at about half the rate oneDNN does here (12 against 19-27 GB/s for a 576 -> 1536 layer and
    the 49152-row head on 2 cores): decode reads every weight once per token, so that is its speed.
    bfloat16 already goes to oneDNN; training and other devices take nn.Linear's own path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for float32 inference on the CPU (see Linear)."""
    if (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class LinearProduct:
    """Plain Linear layers that read the same input as one matmul: one [sum of outs, in] weight
    holding their rows, each layer's weight a view of its rows (no byte held twice); inputs
    [rows, in] -> [rows, sum of outs]. The views share the fused weight's memory: changes made in
    place reach both, but a layer given a new weight afterwards is no longer seen here."""

    def __init__(self, layers: Sequence[Linear]):
        if len(layers) == 1:
            self.weight = layers[0].weight.detach()
        else:
            self.weight = torch.cat([layer.weight.detach() for layer in layers])
            for layer, rows in zip(layers, member_rows(layers)):
                layer.weight = nn.Parameter(self.weight[rows], requires_grad=layer.weight.requires_grad)
        self.bias = fused_bias(layers)

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return linear(a, self.weight, self.bias)


def member_rows(layers: Sequence[nn.Module]) -> list[slice]:
    """The rows (output columns) each of layers takes in a product of them all, in order."""
    rows, start = [], 0
    for layer in layers:
        rows.append(slice(start, start + layer.out_features))
        start += layer.out_features
    return rows


def fused_bias(layers: Sequence[nn.Module]) -> torch.Tensor | None:
    """The layers' biases end to end (a small copy), or None when they have none."""
    if layers[0].bias is None:
        return None
    return torch.cat([layer.bias.detach() for layer in layers])


Product = Callable[[torch.Tensor], torch.Tensor]  # inputs [rows, in] -> outputs [rows, out], no gradients
Fuse = Callable[[Sequence[nn.Module]], Product | None]  # layers sharing an input -> their product, or None


def fuse_linear(layers: Sequence[nn.Module]) -> LinearProduct | None:
    """The LinearProduct of plain Linear layers on one device and dtype, all with a bias or none;
    None, touching nothing, for any other kind of layer (quantized ones have their own products)."""
    if not all(type(layer) is Linear for layer in layers) or len({layer.bias is None for layer in layers}) != 1:
        return None
    weights = [layer.weight for layer in layers]
    if len({(w.device, w.dtype, w.shape[1]) for w in weights}) != 1 or weights[0].device.type == "meta":
        return None
    return LinearProduct(layers)


def rope_inverse_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotary frequencies [head_dim // 2], with Llama 3.1 or linear scaling applied."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    kind = args.rope_scaling.get("rope_type", args.rope_scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    factor = float(args.rope_scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float()
    if kind == "llama3":
        low = float(args.rope_scaling.get("low_freq_factor", 1.0))
        high = float(args.rope_scaling.get("high_freq_factor", 4.0))
        old_len = float(args.rope_scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, blended)
        return torch.where(wavelen < old_len / high, inv_freq, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


def rope_tables(args: ModelArgs, seq_len: int, device: torch.device | str) -> torch.Tensor:
    """The rotation of every position and pair, cos + i sin of its angle: complex64 [seq_len, head_dim // 2]."""
    inv_freq = rope_inverse_frequencies(args).to(device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [b, s, h, d] by rotation [s, 1, d/2], or [b, s, 1, d/2] for rows
    at different positions (complex, from rope_tables, broadcast over the heads).

    Each pair (x0, x1) is the complex number x0 + i x1 multiplied by cos + i sin: one kernel on
    views of x, where separate real products and a stack cost several kernels and copies.
    """
    if x.dtype == torch.float32 and not torch.is_grad_enabled():
        return rotate_in_place(x.clone(), rotation)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [b, s, h, d/2] complex
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)  # [b, s, h, d]


def rotate_in_place(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """apply_rotary on x [b, s, h, d] float32 itself (a view of a product the caller owns, whose last
    axis is contiguous): the same products, written where they are read, without a copy."""
    torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rotation)
    return x


def apply_rotary_halves(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """apply_rotary for Hugging Face's layout: dimension i of a head pairs with i + d/2."""
    first, second = x.float().chunk(2, dim=-1)  # [b, s, h, d/2] each
    rotated = torch.complex(first, second) * rotation  # [(b,) s, 1, d/2] broadcast over heads
    return torch.cat((rotated.real, rotated.imag), dim=-1).to(x.dtype)  # [b, s, h, d]


ROTARY = {"interleaved": apply_rotary, "halves": apply_rotary_halves}


# Sliding-window convention, as Mistral and Hugging Face transformers define it (masking_utils:
# sliding_window_overlay keeps kv_idx > q_idx - sliding_window, on top of the causal kv_idx <= q_idx):
# the query at position p sees the keys at positions p - window < k <= p, i.e. itself and the
# window - 1 positions before it. flash-attn spells the same thing window_size=(window - 1, 0).
#
# Key layout every cache returns, and every attention backend assumes: the s queries of a block
# align bottom-right with the t keys, query i standing at key index t - s + i, and no key a query
# may see is missing. With one query (decode) the keys may come in any order when the query sees
# them all, which is what lets the rolling cache return its ring buffer as it is.


class KVCache(nn.Module):
    """Keys and values of every position so far, preallocated as [batch, kv_heads, max_seq_len, head_dim]."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int,
               first_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, kv_heads, s, d] at start_pos in cache rows first_row..first_row+b-1; return
        those rows' keys and values of positions 0..start_pos+s-1 (views, no copy)."""
        rows = slice(first_row, first_row + k.shape[0])
        end = start_pos + k.shape[2]
        self.k[rows, :, start_pos:end] = k
        self.v[rows, :, start_pos:end] = v
        return self.k[rows, :, :end], self.v[rows, :, :end]

    def update_rows(self, k: torch.Tensor, v: torch.Tensor,
                    rows: DecodeRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store one token per row, k, v [b, kv_heads, 1, d], each at its own row and position; return
        the rows' keys and values up to the furthest position [b, kv_heads, t, d] and which of those
        each row's query sees [b, t]: its own positions (a model with a window shorter than the cache
        has a RollingKVCache instead, so no window bites here)."""
        cache_rows, positions = rows.rows, rows.positions
        self.k[cache_rows, :, positions] = k[:, :, 0]
        self.v[cache_rows, :, positions] = v[:, :, 0]
        t = rows.span(self.k.shape[2])
        visible = torch.arange(t, device=k.device) <= positions[:, None]
        return rows.select(self.k, t), rows.select(self.v, t), visible

    def copy_prefix(self, source: int, row: int, n: int) -> None:
        """Row takes source's keys and values of positions 0..n-1."""
        self.k[row, :, :n] = self.k[source, :, :n]
        self.v[row, :, :n] = self.v[source, :, :n]


class RollingKVCache(nn.Module):
    """The last `window` keys and values only, in a ring buffer [batch, kv_heads, window, head_dim]:
    position p lives in slot p % window, so the cache's size depends on the window, not on how long
    the text grows.

    Like KVCache, update() assumes the positions before start_pos were written by earlier calls.
    """

    def __init__(self, batch: int, n_kv_heads: int, window: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.window = window
        shape = (batch, n_kv_heads, window, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int,
               first_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, kv_heads, s, d] at start_pos in cache rows first_row..first_row+b-1; return
        the keys and values the block's queries see.

        One query: the whole filled ring (it sees every slot, in whatever order). A block: the window - 1
        positions before it, gathered in order, followed by the block itself; the block's last `window`
        entries then replace the oldest slots.
        """
        rows = slice(first_row, first_row + k.shape[0])
        s, w = k.shape[2], self.window
        if s == 1:
            slot = start_pos % w
            self.k[rows, :, slot] = k[:, :, 0]
            self.v[rows, :, slot] = v[:, :, 0]
            filled = min(start_pos + 1, w)
            return self.k[rows, :, :filled], self.v[rows, :, :filled]
        past = torch.arange(max(0, start_pos - (w - 1)), start_pos, device=k.device) % w
        keys = torch.cat((self.k[rows, :, past], k), dim=2)  # [b, kv_h, past + s, d]
        values = torch.cat((self.v[rows, :, past], v), dim=2)
        kept = min(s, w)  # a block longer than the window keeps only its last `window` entries
        slots = torch.arange(start_pos + s - kept, start_pos + s, device=k.device) % w
        self.k[rows].index_copy_(2, slots, k[:, :, s - kept:])
        self.v[rows].index_copy_(2, slots, v[:, :, s - kept:])
        return keys, values

    def update_rows(self, k: torch.Tensor, v: torch.Tensor,
                    rows: DecodeRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """KVCache.update_rows for the ring: each row's query sees the slots it has filled, all of
        them once it is a window long (in ring order, which one query may take as it is)."""
        cache_rows, positions = rows.rows, rows.positions
        w = self.window
        self.k[cache_rows, :, positions % w] = k[:, :, 0]
        self.v[cache_rows, :, positions % w] = v[:, :, 0]
        t = rows.span(w)
        visible = torch.arange(t, device=k.device) < (positions[:, None] + 1).clamp(max=w)
        return rows.select(self.k, t), rows.select(self.v, t), visible

    def copy_prefix(self, source: int, row: int, n: int) -> None:
        """Row takes source's ring, which holds positions 0..n-1 where holds_prefix says so: the slots
        of later positions are written again before anything reads them."""
        self.k[row] = self.k[source]
        self.v[row] = self.v[source]


def quantize_int8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of each vector along x's last axis: codes [..., d] int8 and scales [..., 1] in
    dtype, x ~ codes * scales. The scale (absmax / 127) is rounded to dtype before x is divided by
    it, so that the codes fit the scale actually stored; a vector of zeros gets the smallest scale."""
    x = x.float()
    absmax = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True)  # max |x| in one kernel
    scales = (absmax / 127).clamp_(min=torch.finfo(dtype).tiny).to(dtype)
    codes = (x / scales).round_().clamp_(-127, 127)  # a scale rounded down can give 127.5
    return codes.to(torch.int8), scales


@dataclass(frozen=True)
class Int8KV:
    """Keys or values as an Int8KVCache returns them: codes [b, kv_h, t, d] int8 and scales
    [b, kv_h, t, 1] in the model's dtype, the vector at each position being codes * scales."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def __getitem__(self, index: tuple[slice, ...]) -> Int8KV:
        """The same rows, heads and positions of codes and scales (an index of the first three axes)."""
        return Int8KV(self.codes[index], self.scales[index])

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.codes * self.scales.to(dtype)  # [b, kv_h, t, d] in dtype, converted within the product


class Int8KVCache(nn.Module):
    """Keys and values as int8 with one scale per position and key/value head (quantize_int8),
    quantized as they are written: half the bytes of a 16-bit cache, plus the scales.

    Two caches of the kind a float cache would be (KVCache, or RollingKVCache for a window) hold
    them, one the codes and the other the scales as vectors of one value, so every write and read
    places both alike; reads return them as Int8KV, which attention dequantizes (attend_int8).
    Each position is quantized alone, so a row's numbers do not depend on the rows beside it.
    """

    def __init__(self, layout: type[KVCache | RollingKVCache], batch: int, n_kv_heads: int, slots: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.dtype = dtype
        self.codes = layout(batch, n_kv_heads, slots, head_dim, torch.int8, device)
        self.scales = layout(batch, n_kv_heads, slots, 1, dtype, device)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, first_row: int = 0) -> tuple[Int8KV, Int8KV]:
        """KVCache.update (or RollingKVCache.update), with k and v quantized on the way in."""
        (k_codes, v_codes), (k_scales, v_scales) = self.quantize(k, v)
        keys, values = self.codes.update(k_codes, v_codes, start_pos, first_row)
        key_scales, value_scales = self.scales.update(k_scales, v_scales, start_pos, first_row)
        return Int8KV(keys, key_scales), Int8KV(values, value_scales)

    def update_rows(self, k: torch.Tensor, v: torch.Tensor,
                    rows: DecodeRows) -> tuple[Int8KV, Int8KV, torch.Tensor]:
        """KVCache.update_rows (or RollingKVCache.update_rows), with k and v quantized on the way in."""
        (k_codes, v_codes), (k_scales, v_scales) = self.quantize(k, v)
        keys, values, visible = self.codes.update_rows(k_codes, v_codes, rows)
        key_scales, value_scales, _ = self.scales.update_rows(k_scales, v_scales, rows)
        return Int8KV(keys, key_scales), Int8KV(values, value_scales), visible

    def quantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """quantize_int8 of k and v [b, kv_h, s, d] together, [2, b, kv_h, s, d] codes and [2, b, kv_h, s, 1]
        scales: one set of kernels for both, at every layer of every decode step."""
        return quantize_int8(torch.stack((k, v)), self.dtype)


def check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache={kv_cache!r} is not one of {KV_CACHES}")


def cache_slots(max_seq_len: int, window: int | None) -> int:
    """Positions each layer's cache holds: all of them, or the last `window` with a sliding window."""
    return max_seq_len if window is None else min(window, max_seq_len)


def kv_cache_bytes(args: ModelArgs, batch: int, max_seq_len: int, dtype: torch.dtype,
                   window: int | None = None, kv_cache: str = "model") -> int:
    """Bytes the KV cache of all layers takes for batch x max_seq_len tokens, with or without a
    window, its keys and values in dtype or (kv_cache "int8") one byte each plus a dtype scale per
    position and head."""
    check_kv_cache(kv_cache)
    vector = args.head_dim * dtype.itemsize if kv_cache == "model" else args.head_dim + dtype.itemsize
    return args.n_layers * 2 * batch * args.n_kv_heads * cache_slots(max_seq_len, window) * vector


def attention_mask(s: int, t: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [s, t], True where query i (at key index t - s + i) may see key j: causal, and within
    the sliding window when there is one (see the convention above)."""
    return visible_keys(torch.arange(t - s, t, device=device), torch.arange(t, device=device), window)


def visible_keys(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [len(queries), len(keys)] of key indices: True where the query at key index
    queries[i] may see key keys[j], causal and within the window (see the convention above)."""
    q_idx, k_idx = queries[:, None], keys[None, :]
    visible = k_idx <= q_idx
    if window is not None:
        visible &= k_idx > q_idx - window
    return visible


# SDPA broadcasts key/value heads itself from torch 2.5 on (enable_gqa), but only its unmasked
# kernels do so efficiently: a mask with enable_gqa falls back to the math kernel. See sdpa_attend.
SDPA_HAS_GQA = torch.__version__ >= (2, 5)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, backend: str) -> torch.Tensor:
    """Causal (sliding-window) attention of q [b, s, h, d] over k, v [b, kv_h, t, d] laid out as the
    caches return them (queries bottom-right); returns [b, s, h, d]."""
    s, t = q.shape[1], k.shape[2]
    if window is not None and t > window - 1 + s:  # keys older than the first query's window
        k, v = k[:, :, t - (window - 1 + s):], v[:, :, t - (window - 1 + s):]
    if isinstance(k, Int8KV):
        return attend_int8(q, k, v, window, backend)
    if backend == "flash":
        return flash_attend(q, k, v, window)
    if s == 1 and backend == "sdpa":  # a decode step: sdpa_attend's own folding, without the transposes
        b, _, h, d = q.shape
        folded = q.reshape(b, k.shape[1], h // k.shape[1], d)  # query head j = kv head j // groups
        return F.scaled_dot_product_attention(folded, k, v).view(b, 1, h, d)
    q = q.transpose(1, 2)  # [b, h, s, d]
    groups = q.shape[1] // k.shape[1]
    if backend == "math":
        return math_attend(q, k, v, window, groups).transpose(1, 2)
    return sdpa_attend(q, k, v, window).transpose(1, 2)  # [b, s, h, d]


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """PyTorch's SDPA: q [b, h, s, d] over k, v [b, kv_h, t, d] -> [b, h, s, d].

    A block that starts the sequence is plain top-left causal, which SDPA's is_causal gets right
    only when s == t. Otherwise (one query, or a block after cached keys) the mask is explicit and
    the query heads that share a key/value head are folded into its query rows, q viewed as
    [b, kv_h, groups * s, d] with the mask repeated to match: the cached keys and values are read
    as they are, never copied out to every head.
    """
    b, h, s, d = q.shape
    kv_h, t = k.shape[1], k.shape[2]
    groups = h // kv_h
    if s == t and s > 1 and (window is None or t <= window):
        if groups > 1 and not SDPA_HAS_GQA:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [b, h, t, d]
        extra = {"enable_gqa": True} if groups > 1 and SDPA_HAS_GQA else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
    # One query sees every key left (the window trimmed the rest): no mask at all.
    mask = None if s == 1 else attention_mask(s, t, window, q.device).repeat(groups, 1)  # [groups * s, t]
    folded = q.reshape(b, kv_h, groups * s, d)  # query head j = kv head j // groups: rows (group, query)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)  # [b, kv_h, groups * s, d]
    return out.reshape(b, h, s, d)  # [b, kv_h, groups * s, d] -> [b, h, s, d]


def math_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                groups: int) -> torch.Tensor:
    """The reference: explicit float32 scores and mask. q [b, h, s, d], k, v [b, kv_h, t, d] -> [b, h, s, d]."""
    k = k.repeat_interleave(groups, dim=1)  # [b, h, t, d]
    v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [b, h, s, t]
    mask = attention_mask(q.shape[2], k.shape[2], window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def flash_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """flash-attn (CUDA, 16-bit): q [b, s, h, d], k, v [b, kv_h, t, d] -> [b, s, h, d]. Its causal mask
    aligns bottom-right (flash-attn >= 2.1) and it takes key/value heads as they are."""
    from flash_attn import flash_attn_func  # imported lazily: optional, CUDA-only

    window_size = (-1, -1) if window is None else (window - 1, 0)
    return flash_attn_func(q, k.transpose(1, 2), v.transpose(1, 2), causal=True,  # [b, t, kv_h, d] views
                           window_size=window_size)


def attend_rows(q: torch.Tensor, k: torch.Tensor | Int8KV, v: torch.Tensor | Int8KV, visible: torch.Tensor,
                backend: str) -> torch.Tensor:
    """One query per row, q [b, 1, h, d], over its row of k, v [b, kv_h, t, d] where visible [b, t]:
    one call for the whole batch; returns [b, 1, h, d]. The query heads that share a key/value head
    are folded into its query rows, as in sdpa_attend; flash-attn takes no mask, so SDPA runs there.
    int8 keys and values are dequantized KV_CHUNK positions at a time, as in attend_int8."""
    b, _, h, d = q.shape
    kv_h, t = k.shape[1], k.shape[2]
    if isinstance(k, Int8KV) and t <= KV_CHUNK:
        k, v = k.dequantize(q.dtype), v.dequantize(q.dtype)
    elif isinstance(k, Int8KV):
        spans = [(start, min(start + KV_CHUNK, t)) for start in range(0, t, KV_CHUNK)]
        out = attend_in_chunks(q.view(b, kv_h, h // kv_h, 1, d), k, v, spans,
                               lambda start, end: visible[:, None, None, None, start:end])  # [b, kv_h, groups, 1, d]
        return out.reshape(b, 1, h, d)
    folded = q.reshape(b, kv_h, h // kv_h, d)  # query head j = kv head j // groups
    mask = visible[:, None, None, :]  # [b, 1, 1, t]: the same keys for every head of a row
    if backend == "math":
        scores = (folded.float() @ k.float().transpose(-2, -1)) / math.sqrt(d)  # [b, kv_h, groups, t]
        out = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)  # [b, kv_h, groups, d]
    return out.reshape(b, 1, h, d)


def attend_int8(q: torch.Tensor, k: Int8KV, v: Int8KV, window: int | None, backend: str) -> torch.Tensor:
    """attend over int8 keys and values (Int8KVCache), dequantized KV_CHUNK positions at a time.

    Dequantizing all of a layer's keys and values at every call would build, at each layer of each
    step, a 16-bit copy of them as large as the context: a transient that grows with the cache the
    int8 cache was chosen to shrink (512 MiB per layer for 8 rows of 4096 tokens of LLaMA 7B). A
    block of s queries already holds its own s keys and values in 16 bits, and larger activations:
    up to s + KV_CHUNK positions are dequantized whole and attended as a 16-bit cache's are (the
    same kernels, flash-attn's included), which adds no more than that. Beyond, queries and keys go
    in tiles of KV_CHUNK, the keys of a tile of queries merged by attend_in_chunks, so that a decode
    step never dequantizes more than KV_CHUNK positions at once.
    """
    s, t = q.shape[1], k.shape[2]
    if t <= s + KV_CHUNK:
        return attend(q, k.dequantize(q.dtype), v.dequantize(q.dtype), window, backend)
    b, _, h, d = q.shape
    kv_h = k.shape[1]
    tiles = []
    for first in range(0, s, KV_CHUNK):
        n = min(KV_CHUNK, s - first)
        low, high = t - s + first, t - s + first + n  # the key indices of the tile's queries: low..high-1
        start = 0 if window is None else max(0, low - window + 1)  # the first key any of them sees
        spans = [(j, min(j + KV_CHUNK, high)) for j in range(start, high, KV_CHUNK)]
        tile = q[:, first:first + n].transpose(1, 2).reshape(b, kv_h, h // kv_h, n, d)  # head j = kv head j // groups
        out = attend_in_chunks(tile, k, v, spans, tile_mask(low, high, window, q.device))  # [b, kv_h, groups, n, d]
        tiles.append(out.reshape(b, h, n, d).transpose(1, 2))  # [b, n, h, d]
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=1)


def tile_mask(low: int, high: int, window: int | None,
              device: torch.device) -> Callable[[int, int], torch.Tensor | None]:
    """attend_in_chunks' mask for the queries at key indices low..high-1: which of them see keys
    start..end-1 [high - low, end - start], or None where all of them see all of those."""
    queries = torch.arange(low, high, device=device)

    def mask(start: int, end: int) -> torch.Tensor | None:
        if end - 1 <= low and (window is None or start > high - 1 - window):
            return None
        return visible_keys(queries, torch.arange(start, end, device=device), window)

    return mask


def attend_in_chunks(q: torch.Tensor, k: Int8KV, v: Int8KV, spans: Sequence[tuple[int, int]],
                     mask: Callable[[int, int], torch.Tensor | None]) -> torch.Tensor:
    """Softmax attention of q [b, kv_h, groups, n, d] (the query heads of each key/value head) over
    int8 keys and values [b, kv_h, t, d], span by span (start, end) of positions, in float32: each
    span is merged into a running maximum, sum and output, as flash attention does, so that one
    span's keys, values and scores exist at a time. The scales multiply the scores and the weights
    rather than the codes: products over the span's positions, not over its positions x head_dim.
    mask(start, end): which queries see those keys, broadcastable to [b, kv_h, groups, n, end - start],
    or None for all of them; every query must see at least one key. Returns [b, kv_h, groups, n, d]
    in q's dtype."""
    b, kv_h, groups, n, d = q.shape
    rows = q.reshape(b, kv_h, groups * n, d).float() / math.sqrt(d)  # rows (group, query)
    best = rows.new_full((b, kv_h, groups * n, 1), -math.inf)  # the largest score so far
    total = rows.new_zeros((b, kv_h, groups * n, 1))  # sum of exp(score - best)
    out = rows.new_zeros((b, kv_h, groups * n, d))  # sum of exp(score - best) * value
    for start, end in spans:
        keys, values = k[:, :, start:end], v[:, :, start:end]
        scores = rows @ keys.codes.float().transpose(-2, -1)  # [b, kv_h, groups * n, c]
        scores.mul_(keys.scales.float().transpose(-2, -1))  # [b, kv_h, 1, c]: each key's scale
        visible = mask(start, end)
        if visible is not None:
            scores.view(b, kv_h, groups, n, -1).masked_fill_(~visible, -math.inf)
        new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
        # A query that has seen no key yet still has -inf: subtract the lowest float instead, so that
        # its weights come out 0 rather than exp(-inf + inf) = NaN.
        shift = new_best.clamp(min=torch.finfo(torch.float32).min)
        weights = scores.sub_(shift).exp_()
        decay = best.sub_(shift).exp_()
        total.mul_(decay).add_(weights.sum(-1, keepdim=True))
        weights.mul_(values.scales.float().transpose(-2, -1))  # each value's scale
        out.mul_(decay).add_(weights @ values.codes.float())  # [b, kv_h, groups * n, d]
        best = new_best
    return (out / total).view(b, kv_h, groups, n, d).to(q.dtype)


@dataclass(frozen=True)
class RowPlaces:
    """Where each row of a batch stands when the rows are not one block at one position, as a
    continuous-batching scheduler runs them: the cache row each reads and writes, and the position
    of its first token."""

    cache_rows: tuple[int, ...]
    starts: tuple[int, ...]

    def advanced(self, n: int) -> RowPlaces:
        return RowPlaces(self.cache_rows, tuple(p + n for p in self.starts))


@dataclass(frozen=True)
class DecodeRows:
    """Rows of one token each, each at its own place, whose attention runs as one masked call over
    all of them: what a decode step of a model that is not batch-invariant anyway takes (see
    Transformer.batch_invariant). cache_rows and starts as in RowPlaces, and the same as tensors
    on the model's device (rows, positions [b])."""

    cache_rows: tuple[int, ...]
    starts: tuple[int, ...]
    rows: torch.Tensor
    positions: torch.Tensor
    # Attend over every position a cache holds, masked, instead of up to the furthest row's: shapes
    # that never change from step to step, and no position read on the host (see decode_hidden).
    whole_cache: bool = False

    def span(self, length: int) -> int:
        """How many of a cache's length positions the step attends over."""
        return length if self.whole_cache else min(max(self.starts) + 1, length)

    def select(self, buffer: torch.Tensor, t: int) -> torch.Tensor:
        """These rows' first t positions of a cache buffer [batch, kv_heads, positions, d]: a view when
        the rows are consecutive, as they are when every slot decodes; else a copy of just those."""
        first, b = self.cache_rows[0], len(self.cache_rows)
        if self.cache_rows == tuple(range(first, first + b)):
            return buffer[first:first + b, :, :t]
        return buffer[:, :, :t].index_select(0, self.rows)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, backend: str):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.backend = backend
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # One weight of head_dim each, shared by all heads of q (of k); in the checkpoint's q/k row layout.
        self.q_norm = RMSNorm(args.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.rotate = ROTARY[args.rope_layout]  # chosen once: the checkpoint's q/k row layout
        self.cache: KVCache | RollingKVCache | Int8KVCache | None = None
        # Products of wq/wk/wv together and of wo (see fuse_projections); None: the layers are called.
        self.qkv_product: Product | None = None
        self.out_product: Product | None = None

    def fuse_projections(self, fuse: Fuse) -> None:
        """Take the products fuse makes of wq, wk and wv together and of wo, where it can."""
        self.qkv_product = fuse((self.wq, self.wk, self.wv))
        self.out_product = fuse((self.wo,))

    def forward(self, x: torch.Tensor, place: int | RowPlaces | DecodeRows, rotation: torch.Tensor) -> torch.Tensor:
        """x [b, s, dim] at one start position for rows 0..b-1 of the cache, or each row at its own
        place; rotation [(b,) s, 1, d/2] (see apply_rotary)."""
        b, s, _ = x.shape
        inference = not torch.is_grad_enabled()  # the products' outputs carry no gradients to the layers
        if self.qkv_product is not None and inference:
            q, k, v = self.fused_qkv(x, rotation)
        else:
            q, k, v = self.separate_qkv(x, rotation)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [b, kv_h, s, d]
        if isinstance(place, int):
            keys, values = self.cache.update(k, v, place)  # [b, kv_h, t, d]
            out = attend(q, keys, values, self.window, self.backend)  # [b, s, h, d]
        elif isinstance(place, DecodeRows):
            keys, values, visible = self.cache.update_rows(k, v, place)  # [b, kv_h, t, d], [b, t]
            out = attend_rows(q, keys, values, visible, self.backend)  # [b, 1, h, d]
        else:
            # Each row attends over exactly its own keys, alone: padding rows to one length, or
            # running rows of equal length as one SDPA batch, changes how the sums round (measured
            # on the CPU), and a request must get the same tokens whatever runs beside it.
            rows = [attend(q[i:i + 1], *self.cache.update(k[i:i + 1], v[i:i + 1], start, row),
                           self.window, self.backend)
                    for i, (row, start) in enumerate(zip(place.cache_rows, place.starts))]
            out = rows[0] if b == 1 else torch.cat(rows)  # [b, s, h, d]
        if self.out_product is not None and inference:
            return self.out_product(out.reshape(b * s, -1)).view(b, s, -1)
        return self.wo(out.reshape(b, s, -1))

    def fused_qkv(self, x: torch.Tensor, rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, s, h, d], k and v [b, s, kv_h, d] from one product, q and k rotated: views of it."""
        b, s, _ = x.shape
        h, kv_h, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_product(x.reshape(b * s, -1)).view(b, s, h + 2 * kv_h, d)
        qk = qkv[:, :, :h + kv_h]
        if self.q_norm is not None:  # before the rotation, as Qwen3 normalizes them
            qk = torch.cat((self.q_norm(qk[:, :, :h]), self.k_norm(qk[:, :, h:])), dim=2)  # [b, s, h + kv_h, d]
        if self.rotate is apply_rotary and qk.dtype == torch.float32:
            rotate_in_place(qk, rotation)  # q's and k's heads in one rotation, inside the product
        elif self.rotate is apply_rotary:
            qk.copy_(rotate_in_place(qk.float(), rotation))  # rotated in float32, written back into it
        else:
            qk = self.rotate(qk, rotation)
        return qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + kv_h:]

    def separate_qkv(self, x: torch.Tensor, rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fused_qkv through the layers themselves, one call each."""
        b, s, _ = x.shape
        h, kv_h, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k = self.wq(x).view(b, s, h, d), self.wk(x).view(b, s, kv_h, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rotate(q, rotation), self.rotate(k, rotation), self.wv(x).view(b, s, kv_h, d)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1, w3, w2 are Hugging Face's gate, up and down projections."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)
        # Products of w1/w3 together and of w2 (see fuse_projections); None: the layers are called.
        self.gate_up_product: Product | None = None
        self.down_product: Product | None = None

    def fuse_projections(self, fuse: Fuse) -> None:
        """Take the products fuse makes of w1 and w3 together and of w2, where it can."""
        self.gate_up_product = fuse((self.w1, self.w3))
        self.down_product = fuse((self.w2,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_product is not None and self.down_product is not None and not torch.is_grad_enabled():
            gate, up = self.gate_up_product(x.reshape(-1, x.shape[-1])).chunk(2, dim=-1)
            return self.down_product(F.silu(gate).mul_(up)).view(x.shape)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEFeedForward(nn.Module):
    """Mixtral's sparse feed-forward: a router (`gate`) scores n_experts SwiGLU experts for each token,
    the token runs through its experts_per_token best, and their outputs are summed weighted by the
    router's softmax renormalised over the chosen ones. Parameter names are Mistral's
    (`feed_forward.gate`, `feed_forward.experts.N.w1/w2/w3`).

    Tokens are grouped per expert, so each expert runs once per call over all the tokens that chose
    it, whatever rows of the batch they come from. The quantizer swaps the experts' linears like a
    dense block's and leaves the router as it is: its weight is a sliver of the block (8 x 4096 of
    Mixtral's 176 M), and rounding it would move top-k choices, which change a token's output by a
    whole expert rather than by a rounding.

    How many tokens an expert gets depends on the other rows of the batch, and the CPU's matrix
    kernels round one row differently from several (gemv against gemm; see engine.py): where the
    model must be batch-invariant (Transformer.batch_invariant, which sets pair_lone_tokens), an
    expert chosen by one token of several runs it as a pair, as the engine runs a lone row.
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, experts_per_token: int):
        super().__init__()
        self.gate = Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden_dim) for _ in range(n_experts))
        self.experts_per_token = experts_per_token
        self.pair_lone_tokens = True

    def fuse_projections(self, fuse: Fuse) -> None:
        """Each expert's products (see FeedForward.fuse_projections)."""
        for expert in self.experts:
            expert.fuse_projections(fuse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # [n, dim]
        weights, chosen = route(self.gate(tokens), self.experts_per_token)  # [n, k] float32, [n, k]
        out = torch.zeros_like(tokens)
        # Experts in ascending order, as transformers adds them up: each token's sum has one order,
        # whatever other tokens run beside it.
        pair = self.pair_lone_tokens and len(tokens) > 1
        for expert, rows, places in tokens_per_expert(chosen, len(self.experts)):
            if pair and len(rows) == 1:
                y = self.experts[expert](tokens[rows.repeat(2)])[:1]  # [1, dim]: the first of the pair
            else:
                y = self.experts[expert](tokens[rows])  # [m, dim]
            out.index_add_(0, rows, (y * weights[rows, places, None]).to(out.dtype))  # weights in float32
        return out.view(x.shape)


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's routing of router logits [n, n_experts]: the softmax in float32, the k most probable
    experts of each token [n, k], and their probabilities renormalised to sum to 1 [n, k] (float32)."""
    top, chosen = logits.float().softmax(dim=-1).topk(k, dim=-1)
    return top / top.sum(dim=-1, keepdim=True), chosen


def tokens_per_expert(chosen: torch.Tensor, n_experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """For each expert at least one token chose, in ascending order: (the expert, the tokens that
    chose it [m] in ascending order, where it stands among each one's choices [m]); chosen [n, k].
    One read of the counts to the host per call, instead of one per expert."""
    k = chosen.shape[1]
    flat = chosen.flatten()  # [n * k]: token t's choices at t*k .. t*k + k - 1
    picks = flat.argsort(stable=True)  # grouped by expert; within one, tokens ascending
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    return [(expert, group // k, group % k) for expert, group in enumerate(picks.split(counts)) if len(group)]


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, backend: str):
        super().__init__()
        self.attention = Attention(args, backend)
        self.feed_forward = (MoEFeedForward(args.dim, args.ffn_hidden_dim, args.n_experts, args.experts_per_token)
                             if args.n_experts else FeedForward(args.dim, args.ffn_hidden_dim))
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, place: int | RowPlaces | DecodeRows, rotation: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), place, rotation)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, attention_backend: str = "sdpa"):
        super().__init__()
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {attention_backend!r} is not one of {ATTENTION_BACKENDS}")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, attention_backend) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.prefill_chunk: int | None = None
        # Whether a row's numbers must not depend on the rows beside it; set by setup_caches.
        self.batch_invariant = True
        self.kv_cache = "model"  # one of KV_CACHES; set by setup_caches
        self.head_product: Product | None = None  # see fuse_projections
        # A replayed decode step (cuda_graphs.DecodeGraphs): given the model, hidden states for tokens
        # [b, 1] at one position, or None where it has no graph for them and forward runs the blocks.
        self.decode_graph: Callable[[Transformer, torch.Tensor, int], torch.Tensor | None] | None = None

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype,
                     device: torch.device | str, prefill_chunk: int | None = None, kv_cache: str = "model") -> None:
        """Allocate the KV cache and rotary tables for up to max_batch_size sequences of max_seq_len tokens.

        With a sliding window each layer keeps only the last `window` positions (RollingKVCache).
        prefill_chunk: blocks longer than this are run in chunks of it, bounding the activations;
        with a window a chunk never exceeds the window. kv_cache: one of KV_CACHES, keys and values
        in dtype ("model") or in int8 with a dtype scale per position and head (Int8KVCache).

        Call it once the weights are in place: it also sets batch_invariant, whether rows at their
        own places attend one by one (RowPlaces) so that a row's numbers do not depend on the rows
        beside it. That holds where every linear layer is the model's own; a quantized layer's rows
        depend on the batch anyway (LLM.int8() picks its outlier columns over all rows), and there
        a decode step attends all its rows in one call (DecodeRows), which costs a fraction.
        """
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        check_kv_cache(kv_cache)
        self.max_batch_size, self.max_seq_len, self.kv_cache = max_batch_size, max_seq_len, kv_cache
        a = self.args
        window = a.sliding_window
        self.prefill_chunk = prefill_chunk if window is None else min(prefill_chunk or window, window)
        slots = cache_slots(max_seq_len, window)
        # Below max_seq_len positions the window never bites: a plain cache is the same thing.
        layout = RollingKVCache if slots < max_seq_len else KVCache
        self.cache_window = slots if layout is RollingKVCache else None  # positions a ring keeps
        sizes = (max_batch_size, a.n_kv_heads, slots, a.head_dim, dtype, device)
        for layer in self.layers:
            layer.attention.cache = Int8KVCache(layout, *sizes) if kv_cache == "int8" else layout(*sizes)
        self.register_buffer("rope", rope_tables(a, max_seq_len, device), persistent=False)
        self.batch_invariant = all(isinstance(m, Linear) for m in self.modules() if isinstance(m, nn.Linear))
        for m in self.modules():
            if isinstance(m, MoEFeedForward):
                m.pair_lone_tokens = self.batch_invariant

    @property
    def device(self) -> torch.device:
        """Where the caches (and so the activations) live; set by setup_caches."""
        return self.rope.device

    def holds_prefix(self, held: int, n: int) -> bool:
        """Whether a cache row that has been written up to position held - 1 still has what a text
        resumed at position n <= held attends to. A plain cache keeps every position; a ring has
        overwritten the positions before held - window, which such a text needs unless it resumes
        within a step of where the row stopped."""
        window = self.cache_window
        return window is None or held <= window or n >= held - 1

    def copy_cache_prefix(self, source: int, row: int, n: int) -> None:
        """Cache row takes source's keys and values of positions 0..n-1, in every layer."""
        for m in self.modules():
            if isinstance(m, (KVCache, RollingKVCache)):
                m.copy_prefix(source, row, n)

    def fuse_projections(self, fuse: Fuse = fuse_linear) -> None:
        """Give each block, and the head, the products fuse makes (fuse_linear for plain Linear layers;
        quantized_layers.fused_product for the quantized ones too): one call for each block's q/k/v,
        one for its gate/up projections, one for each other layer, wherever the layers allow it;
        inference then calls them instead of the layers. Call once the weights are loaded; a fuse
        that returns None for everything takes them away."""
        for layer in self.layers:
            layer.attention.fuse_projections(fuse)
            layer.feed_forward.fuse_projections(fuse)
        self.head_product = fuse((self.output,))

    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for layer in self.layers for b in layer.attention.cache.buffers())

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, last_only: bool = False,
                cache_rows: Sequence[int] | None = None) -> torch.Tensor:
        """Logits (float32) for tokens [b, s] placed at positions start_pos..start_pos+s-1.

        start_pos: one position for every row, or a tensor [b] of each row's own (rows of sequences
        that stand at different places, as a continuous-batching scheduler runs them); each row
        then sees exactly its own keys. cache_rows: the cache row each batch row reads and writes
        (default 0..b-1). Returns [b, s, vocab], or [b, 1, vocab] for the last position when
        last_only is set. Blocks longer than the prefill chunk run chunk by chunk, through the cache.
        """
        b, s = tokens.shape
        place = self.place_rows(b, s, start_pos, cache_rows)
        if self.decode_graph is not None and s == 1 and isinstance(place, int) and not torch.is_grad_enabled():
            h = self.decode_graph(self, tokens, place)
            if h is not None:
                return self.logits(h)
        chunk = self.prefill_chunk or s
        hidden: list[torch.Tensor] = []
        for i in range(0, s, chunk):
            h = self.run_blocks(tokens[:, i:i + chunk], place if i == 0 else advanced(place, i))
            if last_only:  # the earlier chunks only fill the cache: keep nothing of theirs
                hidden = [h[:, -1:]]
            else:
                hidden.append(h)
        return self.logits(self.norm(hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=1)))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head's float32 logits [..., vocab] of normalized hidden states h [..., dim]."""
        if self.head_product is not None and not torch.is_grad_enabled():
            logits = self.head_product(h.view(-1, h.shape[-1])).view(*h.shape[:-1], -1)
        else:
            logits = self.output(h)
        return logits if logits.dtype == torch.float32 else logits.float()

    def place_rows(self, b: int, s: int, start_pos: int | torch.Tensor,
                   cache_rows: Sequence[int] | None) -> int | RowPlaces | DecodeRows:
        """start_pos itself for the plain case (rows 0..b-1 at one position), else each row's
        RowPlaces, or DecodeRows for a decode step of several rows where the model is not
        batch_invariant; refuses what the cache does not hold."""
        if not isinstance(start_pos, torch.Tensor) and cache_rows is None:
            if b > self.max_batch_size or start_pos + s > self.max_seq_len:
                raise ValueError(f"{b} sequences up to position {start_pos + s} exceed the cache "
                                 f"({self.max_batch_size} x {self.max_seq_len}); call setup_caches with more")
            return start_pos
        starts = start_pos.tolist() if isinstance(start_pos, torch.Tensor) else [start_pos] * b
        rows = list(range(b)) if cache_rows is None else list(cache_rows)
        if len(starts) != b or len(rows) != b:
            raise ValueError(f"start_pos has {len(starts)} and cache_rows {len(rows)} entries for {b} rows; "
                             "expected one per row")
        if min(starts) < 0 or max(starts) + s > self.max_seq_len:
            raise ValueError(f"rows at positions {starts} with {s} tokens each exceed the cache's "
                             f"{self.max_seq_len} positions; call setup_caches with more")
        if min(rows) < 0 or max(rows) >= self.max_batch_size:
            raise ValueError(f"cache_rows {rows} exceed the cache's {self.max_batch_size} rows")
        if s == 1 and b > 1 and not self.batch_invariant:
            device = self.rope.device
            return DecodeRows(tuple(rows), tuple(starts), torch.tensor(rows, device=device),
                              torch.tensor(starts, device=device))
        return RowPlaces(tuple(rows), tuple(starts))

    def decode_hidden(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The normalized hidden state [b, 1, dim] of one decode step of cache rows 0..b-1, tokens
        [b, 1] each at its own position (positions [b], on the model's device): the head's input.

        Every shape is fixed by the cache, whatever the positions (attention runs over all the
        positions a cache holds, the ones beyond each row's masked), and nothing is read back to the
        host: the step a CUDA graph can capture once and replay at every position (cuda_graphs.py).
        The numbers are forward's up to the order of attention's sums."""
        b = tokens.shape[0]
        place = DecodeRows(tuple(range(b)), (), torch.arange(b, device=tokens.device), positions, whole_cache=True)
        return self.norm(self.run_blocks(tokens, place))

    def run_blocks(self, tokens: torch.Tensor, place: int | RowPlaces | DecodeRows) -> torch.Tensor:
        """Hidden states [b, s, dim] after the last block, for tokens [b, s] at place onwards."""
        s = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        # Each position's rotation with an axis for the heads it broadcasts over (see apply_rotary).
        if isinstance(place, int):
            rotation = self.rope[place:place + s, None]  # [s, 1, d/2]
        elif isinstance(place, DecodeRows):
            rotation = self.rope[place.positions, None, None]  # [b, 1, 1, d/2]
        else:
            starts = torch.tensor(place.starts, device=tokens.device)
            rotation = self.rope[starts[:, None] + torch.arange(s, device=tokens.device), None]  # [b, s, 1, d/2]
        for layer in self.layers:
            h = layer(h, place, rotation)
        return h


def advanced(place: int | RowPlaces, n: int) -> int | RowPlaces:
    """place, n tokens further on (the next prefill chunk)."""
    return place + n if isinstance(place, int) else place.advanced(n)


def empty_model(args: ModelArgs, attention_backend: str = "sdpa") -> Transformer:
    """A Transformer on the meta device: every parameter has its name and shape, and takes no memory
    until a loader assigns it."""
    with torch.device("meta"):
        return Transformer(args, attention_backend)


def parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter a checkpoint provides for args (a tied head is the embedding's)."""
    shapes = {name: tuple(p.shape) for name, p in empty_model(args).named_parameters()}
    if args.tie_word_embeddings:
        shapes.pop("output.weight", None)
    return shapes
