"""Checkpoint readers: a folder becomes a ModelArgs and a stream of tensors under Meta's names.

Each reader yields one tensor at a time, so a caller that converts and frees each tensor before asking
for the next never holds more than one weight beyond what it keeps. Meta shards are opened with
mmap, so reading a slice does not copy the whole shard into private memory.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .model import ModelArgs
from .tokenizer import Tokenizer, find_tokenizer_file, load_tokenizer

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match the model it describes."""


@dataclass
class NamedTensor:
    name: str  # Meta's parameter name, e.g. "layers.0.attention.wq.weight"
    tensor: torch.Tensor
    source: str  # the file it came from, for error messages


# --- Meta: params.json + consolidated.NN.pth -------------------------------------------------------

# How Meta's model-parallel shards split each weight: the dimension they are concatenated on, or None
# for weights every shard holds whole. Column-parallel layers split their output rows (dim 0),
# row-parallel layers their input columns (dim 1).
META_SHARD_DIM: dict[str, int | None] = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
    "wo": 1, "w2": 1,
    "tok_embeddings": 1,  # Llama 1/2; Llama 3 splits the vocabulary (dim 0): resolved from the shapes
    "attention_norm": None, "ffn_norm": None, "norm": None,
}

META_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
               "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len",
               "max_batch_size", "sliding_window", "head_dim", "hidden_dim", "rope_scaling",
               "tie_word_embeddings"}
META_IGNORED_KEYS = {"rope.freqs"}  # precomputed rotary table in Llama 1 checkpoints; rebuilt here


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def meta_shard_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: params.json found but no consolidated.*.pth shards")
    return files


def load_meta_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot read this checkpoint shard ({type(e).__name__}: {e})") from e


def meta_model_args(folder: Path) -> ModelArgs:
    params = read_json(folder / "params.json")
    unknown = sorted(set(params) - META_PARAMS)
    if unknown:
        log.warning("%s: ignoring unknown keys %s", folder / "params.json", unknown)
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(f"{folder / 'params.json'}: missing required key {key!r}")
    kwargs = {k: v for k, v in params.items() if k in {f.name for f in fields(ModelArgs)}}
    if params.get("use_scaled_rope"):
        # Llama 3.1/3.2 Meta checkpoints say only this flag; these are the values Meta's code hard-wires.
        kwargs["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kwargs.get("vocab_size", -1) <= 0:
        kwargs["vocab_size"] = meta_vocab_size(meta_shard_files(folder))
    return ModelArgs(**kwargs)


def meta_vocab_size(files: list[Path]) -> int:
    """Vocabulary size from the output head, which every release splits on its rows."""
    total = 0
    for f in files:
        shard = load_meta_shard(f)
        if "output.weight" not in shard:
            raise CheckpointError(f"{f}: params.json has no vocab_size and the shard has no output.weight")
        total += shard["output.weight"].shape[0]
    return total


def merge_meta_shards(name: str, pieces: list[torch.Tensor], args: ModelArgs) -> torch.Tensor:
    if len(pieces) == 1:
        return pieces[0]
    kind = name.split(".")[-2]
    if kind not in META_SHARD_DIM:
        raise CheckpointError(f"{name}: no model-parallel merge rule for this tensor")
    dim = META_SHARD_DIM[kind]
    if kind == "tok_embeddings" and pieces[0].shape[1] == args.dim:
        dim = 0
    if dim is None:
        return pieces[0]
    return torch.cat(pieces, dim=dim)


def read_meta_tensors(folder: Path, args: ModelArgs) -> Iterator[NamedTensor]:
    files = meta_shard_files(folder)
    shards = [load_meta_shard(f) for f in files]  # mmap: nothing is read until a tensor is used
    keys = list(shards[0])
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))
            raise CheckpointError(f"{f}: keys differ from {files[0].name}: {diff[:8]}")
    source = str(files[0]) if len(files) == 1 else f"{folder}/consolidated.*.pth ({len(files)} shards)"
    for key in keys:
        if key in META_IGNORED_KEYS:
            continue
        merged = merge_meta_shards(key, [s[key] for s in shards], args)
        yield NamedTensor(key, merged, source)


# --- Hugging Face: config.json + *.safetensors -----------------------------------------------------

HF_ARCHITECTURES = {"llama", "mistral"}
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "output.weight"}
HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


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


def unpermute_rotary_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Undo the row permutation HF's conversion applies to q/k: half-split rotary pairs -> interleaved."""
    rows, cols = w.shape
    # [heads, 2 halves, head_dim/2, cols] -> [heads, head_dim/2, 2, cols]
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_meta_name(key: str, top_names: dict[str, str], layer_key: re.Pattern, layer_names: dict[str, str]
                 ) -> str | None:
    """Meta's name for a tensor of another naming scheme (None for a name it does not know):
    top_names maps whole names; layer_key matches a block tensor as (layer index, part)."""
    if key in top_names:
        return top_names[key]
    m = layer_key.fullmatch(key)
    if m and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}.weight"
    return None


def hf_to_meta_name(key: str) -> str | None:
    return to_meta_name(key, HF_TOP_NAMES, HF_LAYER_KEY, HF_LAYER_NAMES)


def open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read this safetensors file ({e})") from e


def read_safetensors_tensor(handle, path: Path, key: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from e


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


# --- Detection -------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    folder: Path
    format: str  # "meta" | "hf" | "gguf" (gguf_checkpoint) | "prebaked" (read by prebaked.load_prebaked)
    args: ModelArgs

    @property
    def location(self) -> Path:
        """What to call this checkpoint in messages: its folder (a file for single-file formats)."""
        return self.folder

    def tensors(self) -> Iterator[NamedTensor]:
        reader = {"meta": read_meta_tensors, "hf": read_hf_tensors}[self.format]
        return reader(self.folder, self.args)

    def tokenizer(self, tokenizer_path: str | Path | None = None) -> Tokenizer:
        """The given tokenizer, else the one found with the checkpoint (see find_tokenizer_file)."""
        return load_tokenizer(find_tokenizer_file(self.folder, tokenizer_path))


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Detect the checkpoint format of a folder (or a .gguf file) and read its model configuration."""
    folder = Path(path)
    from .gguf_checkpoint import open_gguf_checkpoint  # imported here: it imports this module

    if folder.is_file() and folder.suffix == ".gguf":
        return open_gguf_checkpoint(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder (or .gguf file) does not exist")
    from .prebaked import is_prebaked_folder, prebaked_model_args  # imported here: it imports this module

    if is_prebaked_folder(folder):
        return Checkpoint(folder, "prebaked", prebaked_model_args(folder))
    if (folder / "params.json").exists():
        return Checkpoint(folder, "meta", meta_model_args(folder))
    if (folder / "config.json").exists():
        return Checkpoint(folder, "hf", hf_model_args(folder))
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return open_gguf_checkpoint(ggufs[0])
    if ggufs:
        raise CheckpointError(f"{folder}: holds {len(ggufs)} GGUF files {[g.name for g in ggufs]}; pass one of them")
    raise CheckpointError(f"{folder}: no params.json (Meta), config.json (Hugging Face) or .gguf file found")
