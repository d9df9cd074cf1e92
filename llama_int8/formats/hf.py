"""Hugging Face folders: `config.json` and `model.safetensors` or a sharded index; the reader, and
the writer of `quantize_offline.py --format hf`.

Tensors come back under Meta's names with their q/k rows in Meta's interleaved rotary layout, so a
Hugging Face checkpoint computes exactly what transformers computes with it; the writer permutes
them back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..model import ModelArgs
from .common import (Checkpoint, CheckpointError, NamedTensor, hf_to_meta_name, indexed_safetensors_files,
                     open_safetensors, read_json, read_safetensors_tensor, unpermute_rotary_rows)
from .export import resolve_dtype, write_hf_folder
from .model_config import model_args_from

HF_ARCHITECTURES = {"llama", "mistral"}


class HFCheckpoint(Checkpoint):
    format = "hf"

    def __init__(self, folder: Path):
        self.location = folder
        self.args = hf_model_args(folder)

    def tensors(self) -> Iterator[NamedTensor]:
        return read_hf_tensors(self.location, self.args)


def hf_model_args(folder: Path) -> ModelArgs:
    path = folder / "config.json"
    cfg = read_json(path)
    if cfg.get("model_type") not in HF_ARCHITECTURES:
        raise CheckpointError(f"{path}: model_type {cfg.get('model_type')!r} is not one of "
                              f"{sorted(HF_ARCHITECTURES)}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise CheckpointError(f"{path}: missing required key {key!r}")
    rope = cfg.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: rope_parameters={rope!r}: expected an object")
    scaling = ("rope_scaling", cfg["rope_scaling"]) if cfg.get("rope_scaling") else (
        "rope_parameters", {k: v for k, v in rope.items() if k != "rope_theta"})
    theta = ("rope_theta", cfg["rope_theta"]) if "rope_theta" in cfg else (
        "rope_parameters.rope_theta", rope.get("rope_theta", 10000.0))
    return model_args_from(path, {
        "dim": ("hidden_size", cfg["hidden_size"]),
        "n_layers": ("num_hidden_layers", cfg["num_hidden_layers"]),
        "n_heads": ("num_attention_heads", cfg["num_attention_heads"]),
        "n_kv_heads": ("num_key_value_heads", cfg.get("num_key_value_heads")),
        "vocab_size": ("vocab_size", cfg["vocab_size"]),
        "head_dim": ("head_dim", cfg.get("head_dim")),
        "hidden_dim": ("intermediate_size", cfg.get("intermediate_size")),
        "norm_eps": ("rms_norm_eps", cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": ("tie_word_embeddings", cfg.get("tie_word_embeddings", False)),
        "sliding_window": ("sliding_window", cfg.get("sliding_window")),
        "max_position_embeddings": ("max_position_embeddings", cfg.get("max_position_embeddings")),
    })


def hf_safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = indexed_safetensors_files(index)
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that do not exist: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{folder}: config.json found but neither model.safetensors nor "
                          "model.safetensors.index.json")


def read_hf_tensors(folder: Path, args: ModelArgs) -> Iterator[NamedTensor]:
    for path in hf_safetensors_files(folder):
        with open_safetensors(path) as handle:
            for key in handle.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # a derived buffer some old exports saved
                name = hf_to_meta_name(key)
                if name is None:
                    raise CheckpointError(f"{path}: unexpected tensor {key!r} (not part of a LLaMA model)")
                t = read_safetensors_tensor(handle, path, key)
                if name.endswith("attention.wq.weight"):
                    t = unpermute_rotary_rows(t, args.n_heads, args.head_dim)
                elif name.endswith("attention.wk.weight"):
                    t = unpermute_rotary_rows(t, args.n_kv_heads, args.head_dim)
                yield NamedTensor(name, t, str(path))


# --- Writing ---------------------------------------------------------------------------------------
# The universal hand-off: every engine reads a plain Hugging Face folder, and shards or quantizes it
# itself. hf_bnb.py and compressed_tensors.py write the same folder with quantized layers in it.

def write_hf(checkpoint: Checkpoint, out_dir: str | Path, dtype: str | torch.dtype | None = None, force: bool = False,
             tokenizer_path: str | Path | None = None, shard_bytes: int = 2 * 1024**3) -> Path:
    """Write checkpoint (any 16/32-bit source: Meta, Hugging Face, GGUF, a stack) as a plain Hugging Face
    folder out_dir, its tensors in dtype (None: as the source holds them); returns its path.
    Tensor by tensor: at most one shard's tensors are held at a time."""
    return write_hf_folder(checkpoint, out_dir, "hf", resolve_dtype(dtype), force, tokenizer_path, shard_bytes)
