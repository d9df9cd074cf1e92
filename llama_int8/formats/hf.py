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

from ..model import ModelArgs, parameter_shapes
from .common import (Checkpoint, CheckpointError, NamedTensor, hf_to_meta_name, indexed_safetensors_files,
                     open_safetensors, read_json, read_safetensors_tensor, to_interleaved_layout)
from .export import resolve_dtype, write_hf_folder
from .model_config import MAX_LAYERS, Setting, integer, model_args_from

HF_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "mixtral"}
# Mixtral's expert counts when its config.json leaves them out: transformers' MixtralConfig defaults.
MIXTRAL_DEFAULT_EXPERTS, MIXTRAL_DEFAULT_EXPERTS_PER_TOKEN = 8, 2
# Qwen's configs carry a window that applies only when use_sliding_window says so, and then only to
# the layers their layer_types (or max_window_layers) mark; Mistral's applies to every layer.
QWEN_ARCHITECTURES = {"qwen2", "qwen3"}


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
    if cfg["model_type"] == "qwen3" and cfg.get("attention_bias", False):
        raise CheckpointError(f"{path}: attention_bias=true (biases on q, k, v and the output projection) is not "
                              "supported for qwen3, whose released models have none")
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
        "sliding_window": ("sliding_window", hf_sliding_window(path, cfg)),
        "max_position_embeddings": ("max_position_embeddings", cfg.get("max_position_embeddings")),
        "qkv_bias": ("model_type", cfg["model_type"] == "qwen2"),  # Qwen2's q/k/v projections always have one
        "qk_norm": ("model_type", cfg["model_type"] == "qwen3"),
        **hf_expert_settings(cfg),
    })


def hf_expert_settings(cfg: dict) -> dict[str, Setting]:
    """A Mixtral config's expert counts, as model_args_from takes them (none for a dense model)."""
    if cfg["model_type"] != "mixtral":
        return {}
    return {"n_experts": ("num_local_experts", cfg.get("num_local_experts", MIXTRAL_DEFAULT_EXPERTS)),
            "experts_per_token": ("num_experts_per_tok",
                                  cfg.get("num_experts_per_tok", MIXTRAL_DEFAULT_EXPERTS_PER_TOKEN))}


def hf_sliding_window(path: Path, cfg: dict) -> int | None:
    """The window every layer attends within, or None for none.

    A Qwen config's sliding_window applies only with use_sliding_window set, and then to the layers
    layer_types marks "sliding_attention" (transformers derives it, when absent, as the layers from
    max_window_layers on). The model holds one window for all layers, so a config that windows some
    layers and not others is refused.
    """
    window = cfg.get("sliding_window")
    if cfg["model_type"] not in QWEN_ARCHITECTURES:
        return window
    if not cfg.get("use_sliding_window", False) or window is None:
        return None
    n_layers = integer(1, MAX_LAYERS)(path, "num_hidden_layers", cfg["num_hidden_layers"])
    kinds = cfg.get("layer_types")
    if kinds is None:
        first = integer(0, MAX_LAYERS)(path, "max_window_layers", cfg.get("max_window_layers", 28))
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if not isinstance(kinds, list) or len(kinds) != n_layers:
        raise CheckpointError(f"{path}: layer_types={kinds!r}: expected a list of {n_layers} layer kinds")
    windowed = {kind == "sliding_attention" for kind in kinds}
    if windowed == {True, False}:
        given_by = "layer_types" if "layer_types" in cfg else f"max_window_layers={cfg.get('max_window_layers', 28)}"
        raise CheckpointError(
            f"{path}: use_sliding_window=true with {given_by} windows {kinds.count('sliding_attention')} of "
            f"{n_layers} layers; llama_int8 attends within one window in every layer or in none")
    return window if windowed == {True} else None


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
    known = {*parameter_shapes(args), "output.weight"}  # a tied head some exports save too
    for path in hf_safetensors_files(folder):
        with open_safetensors(path) as handle:
            for key in handle.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # a derived buffer some old exports saved
                name = hf_to_meta_name(key)
                if name not in known:  # named here as the file names it
                    raise CheckpointError(f"{path}: unexpected tensor {key!r} (not a parameter of this model)")
                t = to_interleaved_layout(name, read_safetensors_tensor(handle, path, key), args)
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
