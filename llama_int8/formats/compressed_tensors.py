"""The writer of `quantize_offline.py --format compressed-tensors`: an int8 model in the layout of the
`compressed-tensors` library, which vLLM serves with tensor parallelism (and transformers loads).

LLM.int8()'s weights are symmetric per-row int8: row r holds round(w * 127 / absmax_r) and the
scale SCB_r = absmax_r. That is exactly compressed-tensors' 8-bit, per-channel, symmetric weight
scheme with 16-bit activations (W8A16), with scale SCB / 127: the int8 bytes cross over as they
are, no calibration. Its "pack-quantized" format stores, per linear layer,

    <layer>.weight_packed  int32 [out, in / 4]: each int8 value plus 128, four to a word, the first
                           in the lowest byte (the library's pack_to_int32 with num_bits=8)
    <layer>.weight_scale   [out, 1]: SCB / 127, kept float32 (one number per row: a 16-bit scale
                           would round every dequantized weight of its row)
    <layer>.weight_shape   int64 [2]: out, in

and config.json's quantization_config describes the scheme. The q/k rows are permuted to Hugging
Face's layout before quantizing (per-row quantization commutes with the permutation, so these are
the same bytes an int8 model of ours holds, reordered).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..quantize import CHUNK_ELEMENTS, QuantConfig, quantize_weight
from .common import Checkpoint
from .export import resolve_dtype, write_hf_folder
from .prebaked import SHARD_BYTES

FORMAT = "pack-quantized"
INT8_OFFSET = 128  # pack-quantized stores value + 2**(bits - 1): unsigned bytes


def compressed_tensors_config() -> dict:
    """config.json's quantization_config: every Linear but the head holds 8-bit symmetric per-channel
    weights with unquantized (16-bit) activations."""
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
               "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": FORMAT}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}


def pack_int8(cb: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] -> int32 [out, ceil(in / 4)]: value + 128 in byte j of word j // 4 (zeros pad the
    last word), computed a block of rows at a time."""
    out_features, in_features = cb.shape
    words = -(in_features // -4)
    packed = torch.empty(out_features, words, dtype=torch.int32)
    rows = max(1, CHUNK_ELEMENTS // in_features)
    for start in range(0, out_features, rows):
        block = cb[start:start + rows].to(torch.int32).add_(INT8_OFFSET)  # [rows, in], 1..255
        block = torch.nn.functional.pad(block, (0, words * 4 - in_features)).view(-1, words, 4)  # [rows, words, 4]
        word = block[..., 0].clone()
        for byte in (1, 2, 3):
            word |= block[..., byte] << (8 * byte)  # int32 arithmetic wraps: the top byte sets the sign
        packed[start:start + rows] = word
    return packed


def compressed_int8_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of a [out, in] weight, from LLM.int8()'s quantization of it."""
    q = quantize_weight(weight, QuantConfig(mode="int8"))
    return {"weight_packed": pack_int8(q["weight"]), "weight_scale": (q["SCB"] / 127.0).unsqueeze(1),
            "weight_shape": torch.tensor(tuple(weight.shape), dtype=torch.int64)}


def write_compressed_tensors(checkpoint: Checkpoint, out_dir: str | Path, cfg: QuantConfig,
                             dtype: str | torch.dtype | None = None, force: bool = False,
                             tokenizer_path: str | Path | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Quantize checkpoint (a 16/32-bit source) to int8 and write it as a compressed-tensors folder
    out_dir; returns its path. dtype: of the embedding, norms and head, and of the weights before
    they are quantized (None: as the source holds them)."""
    if cfg.mode != "int8" or cfg.quantize_head:
        raise ValueError(f"compressed-tensors is written from int8 without a quantized head (got {cfg.name}"
                         f"{', quantize_head' if cfg.quantize_head else ''}): LLM.int8()'s weights are its W8A16 scheme")
    return write_hf_folder(checkpoint, out_dir, "compressed-tensors", resolve_dtype(dtype), force, tokenizer_path,
                           shard_bytes, quantize=compressed_int8_tensors,
                           quantization_config=lambda written: compressed_tensors_config())
