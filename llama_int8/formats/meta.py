"""Meta's release format: `params.json` and model-parallel shards `consolidated.NN.pth`.

Shards are opened with `torch.load(weights_only=True, mmap=True)`: a checkpoint is untrusted input,
and reading one tensor's slice of every shard does not copy whole shards into private memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import torch

from ..model import ModelArgs
from .common import Checkpoint, CheckpointError, NamedTensor, read_json
from .model_config import boolean, model_args_from

log = logging.getLogger(__name__)

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
META_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")


class MetaCheckpoint(Checkpoint):
    format = "meta"

    def __init__(self, folder: Path):
        self.location = folder
        self.args = meta_model_args(folder)

    def tensors(self) -> Iterator[NamedTensor]:
        return read_meta_tensors(self.location, self.args)


def meta_shard_files(folder: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth, which must be numbered from 00 without gaps."""
    files = numbered_meta_shards(folder)
    if not files:
        raise CheckpointError(f"{folder}: params.json found but no consolidated.*.pth shards")
    return files


def numbered_meta_shards(folder: Path) -> list[Path]:
    """The folder's consolidated.NN.pth shards in order (none if it has none); a gap in the
    numbers is refused naming the missing shard, since merging without it would mis-size tensors."""
    numbered: dict[int, Path] = {}
    for path in folder.glob("consolidated.*.pth"):
        m = META_SHARD_NAME.fullmatch(path.name)
        if m is None:
            raise CheckpointError(f"{path}: not a shard name of the form consolidated.NN.pth")
        if int(m.group(1)) in numbered:
            raise CheckpointError(f"{folder}: {numbered[int(m.group(1))].name} and {path.name} are the same shard")
        numbered[int(m.group(1))] = path
    missing = [i for i in range(len(numbered)) if i not in numbered]
    if missing:
        width = len(next(iter(numbered.values())).name.split(".")[1])
        names = [f"consolidated.{i:0{width}d}.pth" for i in missing]
        raise CheckpointError(f"{folder}: shard {names[0]} is missing (found {len(numbered)} shards numbered "
                              f"{sorted(numbered)}; expected 0 to {len(numbered) - 1})")
    return [numbered[i] for i in range(len(numbered))]


def load_meta_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot read this checkpoint shard ({type(e).__name__}: {e})") from e


def meta_model_args(folder: Path) -> ModelArgs:
    path = folder / "params.json"
    params = read_json(path)
    unknown = sorted(set(params) - META_PARAMS)
    if unknown:
        log.warning("%s: ignoring unknown keys %s", path, unknown)
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(f"{path}: missing required key {key!r}")
    settings = {f.name: (f.name, params[f.name]) for f in fields(ModelArgs) if f.name in params}
    if "use_scaled_rope" in params and boolean(path, "use_scaled_rope", params["use_scaled_rope"]):
        # Llama 3.1/3.2 Meta checkpoints say only this flag; these are the values Meta's code hard-wires.
        settings["rope_scaling"] = ("use_scaled_rope", {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192})
    vocab = params.get("vocab_size", -1)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab <= 0:  # Meta's -1: the tokenizer's
        settings["vocab_size"] = ("vocab_size", meta_vocab_size(meta_shard_files(folder)))
    return model_args_from(path, settings)


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
    """One tensor from its model-parallel pieces, concatenated as META_SHARD_DIM says."""
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
