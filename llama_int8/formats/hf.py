"""Hugging Face folders: `config.json` and `model.safetensors` or a sharded index.

Tensors come back under Meta's names with their q/k rows in Meta's interleaved rotary layout, so a
Hugging Face checkpoint computes exactly what transformers computes with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..model import ModelArgs
from .common import (Checkpoint, CheckpointError, NamedTensor, hf_to_meta_name, open_safetensors, read_json,
                     read_safetensors_tensor, unpermute_rotary_rows)

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
    scaling = cfg.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"),
        vocab_size=cfg["vocab_size"],
        head_dim=cfg.get("head_dim"),
        hidden_dim=cfg.get("intermediate_size"),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        sliding_window=cfg.get("sliding_window"),
        max_position_embeddings=cfg.get("max_position_embeddings"),
    )


def hf_safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
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
