"""Hugging Face folders: `config.json` and `model.safetensors` or a sharded index; the reader, and
the writer of `quantize_offline.py --format hf`.

Tensors come back under Meta's names with their q/k rows in Meta's interleaved rotary layout, so a
Hugging Face checkpoint computes exactly what transformers computes with it; the writer permutes
them back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model import ModelArgs, parameter_shapes
from .common import (Checkpoint, CheckpointError, NamedTensor, checked_tensors, hf_to_meta_name,
                     indexed_safetensors_files, meta_to_hf_name, open_safetensors, permute_rotary_rows, read_json,
                     read_safetensors_tensor, unpermute_rotary_rows)
from .export import (check_unquantized_source, checkpoint_sources, new_folder, resolve_dtype, special_token_ids,
                     write_tokenizer_files)
from .model_config import model_args_from

log = logging.getLogger(__name__)

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
# itself. The quantized formats (hf_bnb.py, compressed_tensors.py) write the same folder with other
# tensors in it.

HF_SHARD_LIMIT = 5 * 10**9  # the largest shard Hugging Face's tools write by default (5 GB)


def hf_config(args: ModelArgs, dtype: torch.dtype, token_ids: dict, quantization_config: dict | None = None) -> dict:
    """config.json for args (the inverse of hf_model_args): a LlamaForCausalLM, or a MistralForCausalLM
    when it has a sliding window. rope_theta and rope_scaling are spelled at the top level, which
    transformers 4 and 5, vLLM and text-generation-inference all read."""
    mistral = args.sliding_window is not None
    config = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling or None, "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."), **token_ids,
    }
    if args.max_position_embeddings is not None:
        config["max_position_embeddings"] = args.max_position_embeddings
    if mistral:
        config["sliding_window"] = args.sliding_window
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


def to_hf_layout(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """q/k rows from Meta's interleaved rotary layout to Hugging Face's half-split one (other tensors as they are)."""
    if name.endswith("attention.wq.weight"):
        return permute_rotary_rows(t, args.n_heads, args.head_dim)
    if name.endswith("attention.wk.weight"):
        return permute_rotary_rows(t, args.n_kv_heads, args.head_dim)
    return t


def hf_ordered_tensors(checkpoint: Checkpoint) -> Iterator[NamedTensor]:
    """The checkpoint's tensors, checked against its configuration, in Hugging Face's rotary layout
    (under Meta's names still); a tied head is left out, as Hugging Face saves it."""
    args = checkpoint.args
    tied = frozenset({"output.weight"}) if args.tie_word_embeddings else frozenset()
    for item in checked_tensors(checkpoint.tensors(), parameter_shapes(args), ignored=tied):
        yield NamedTensor(item.name, to_hf_layout(item.name, item.tensor, args), item.source)
        del item


class HFShardWriter:
    """Writes tensors as Hugging Face does: `model.safetensors`, or shards
    `model-0000i-of-0000n.safetensors` of about shard_bytes each with `model.safetensors.index.json`;
    every file with the {"format": "pt"} metadata transformers requires."""

    def __init__(self, folder: Path, shard_bytes: int):
        if not 0 < shard_bytes <= HF_SHARD_LIMIT:
            raise ValueError(f"shard size {shard_bytes} bytes: Hugging Face shards hold at most {HF_SHARD_LIMIT} bytes")
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []  # each shard's temporary file and its tensors
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.written) + 1:05d}.partial"  # named once the count is known
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Write what is pending and give the shards their final names (and the index, if several)."""
        self.flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.written, start=1):
            final = f"model-{i:05d}-of-{len(self.written):05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def write_hf(checkpoint: Checkpoint, out_dir: str | Path, dtype: str | torch.dtype | None = None, force: bool = False,
             tokenizer_path: str | Path | None = None, shard_bytes: int = 2 * 1024**3) -> Path:
    """Write checkpoint (any 16/32-bit source: Meta, Hugging Face, GGUF, a stack) as a plain Hugging Face
    folder out_dir, its tensors in dtype (None: as the source holds them); returns its path.

    Tensor by tensor: at most one shard's tensors are held at a time.
    """
    check_unquantized_source(checkpoint, "hf")
    dtype = resolve_dtype(dtype)
    tokenizer = checkpoint.tokenizer(tokenizer_path)
    start = time.perf_counter()
    with new_folder(out_dir, "hf", checkpoint_sources(checkpoint), force) as folder:
        writer = HFShardWriter(folder, shard_bytes)
        written_dtype = dtype
        for item in hf_ordered_tensors(checkpoint):
            tensor = item.tensor if dtype is None else item.tensor.to(dtype)
            written_dtype = written_dtype or tensor.dtype
            writer.add(meta_to_hf_name(item.name), tensor)
            del item, tensor
        writer.finish()
        config = hf_config(checkpoint.args, written_dtype, special_token_ids(tokenizer))
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        write_tokenizer_files(checkpoint, tokenizer, folder, tokenizer_path)
    log.info("Wrote %s (Hugging Face, %s) in %.1f s", out_dir, str(written_dtype).removeprefix("torch."),
             time.perf_counter() - start)
    return Path(out_dir)
