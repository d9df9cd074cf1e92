"""The vocabulary every checkpoint format shares: the `Checkpoint` interface, named tensors, errors,
the checks every tensor passes, Hugging Face <-> Meta tensor names, the rotary row permutation, safe
JSON and safetensors reads, and file names from a checkpoint's metadata kept inside its folder.

Imports no other format: each format module builds on this one, and only `formats.detect` and
`formats.stack` know about more than one format.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..checkpoint_error import CheckpointError, read_json
from ..model import ModelArgs
from ..tokenizer import Tokenizer, find_tokenizer_file, load_tokenizer

if TYPE_CHECKING:
    from ..quantize import QuantConfig


@dataclass
class NamedTensor:
    name: str  # Meta's parameter name, e.g. "layers.0.attention.wq.weight"
    tensor: torch.Tensor
    source: str  # the file it came from, for error messages


@dataclass
class QuantizedLayer:
    """One linear layer stored already quantized: bitsandbytes' state-dict tensors of the layer."""
    name: str  # Meta's module path, e.g. "layers.0.attention.wq"
    tensors: dict[str, torch.Tensor]  # "weight", "SCB" / "weight.absmax", ...
    source: str


class Checkpoint(ABC):
    """A checkpoint on disk as the loader sees it: a configuration, then its tensors one at a time.

    format: "meta", "hf", "hf-bnb", "gguf" or "prebaked" (a stack reports its base's).
    location: what messages call it: its folder, or its file for single-file formats.
    quant: the mode its layers were quantized in, or None for 16/32-bit weights.
    """

    format: str
    location: Path
    args: ModelArgs
    quant: QuantConfig | None = None

    @property
    def folder(self) -> Path:
        """The folder that holds the checkpoint (where its tokenizer is looked for)."""
        return self.location if self.location.is_dir() else self.location.parent

    @abstractmethod
    def tensors(self) -> Iterator[NamedTensor]:
        """The floating-point tensors under Meta's names, one at a time (for a pre-quantized
        checkpoint, those that are not part of a quantized layer)."""

    def quantized_layers(self) -> Iterator[QuantizedLayer]:
        """The layers stored quantized (none unless `quant` is set)."""
        return iter(())

    def tokenizer(self, tokenizer_path: str | Path | None = None) -> Tokenizer:
        """The given tokenizer, else the one found with the checkpoint (see find_tokenizer_file)."""
        return load_tokenizer(find_tokenizer_file(self.folder, tokenizer_path))

    def record(self) -> dict:
        """Where the weights come from, for a pre-baked manifest."""
        return {"path": str(self.location.resolve()), "format": self.format}

    def paths(self) -> list[Path]:
        """Every folder or file the checkpoint reads from (what a writer must never overwrite)."""
        return [self.location]


def checked_tensors(tensors: Iterable[NamedTensor], expected: dict[str, tuple[int, ...]],
                    ignored: frozenset[str] = frozenset(), total: int | None = None) -> Iterator[NamedTensor]:
    """The tensors, each checked as it passes against the shapes expected by name; names in ignored
    (a tied head some exports save) are dropped.

    Raises CheckpointError naming the file and key for an unknown name, a wrong shape or a tensor given
    twice, and after the last tensor for expected names never provided.
    """
    seen: set[str] = set()
    for item in tqdm(tensors, total=total, desc="Loading weights", unit="tensor", leave=False):
        name, source = item.name, item.source
        if name in ignored:
            continue
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r}")
        if name in seen:
            raise CheckpointError(f"{source}: tensor {name!r} appears twice")
        if not item.tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} is {str(item.tensor.dtype).removeprefix('torch.')}, "
                                  "expected a floating-point weight")
        if tuple(item.tensor.shape) != expected[name]:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(item.tensor.shape)}, "
                                  f"expected {expected[name]} from the model configuration")
        seen.add(name)
        yield item
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model needs: {missing[:8]}"
                              + (" ..." if len(missing) > 8 else ""))


def check_finite(tensor: torch.Tensor, name: str, source: str) -> None:
    """Refuse a weight holding NaN or infinite values, naming it and its file.

    One summing pass: NaN or an infinity makes the sum non-finite. Only then is every value looked
    at, since finite values can overflow a half-precision sum too.
    """
    values = tensor if tensor.element_size() > 1 else tensor.float()  # torch cannot sum float8
    if torch.isfinite(values.sum()) or bool(torch.isfinite(values).all()):
        return
    bad = int((~torch.isfinite(values)).sum())
    as_dtype = f" as {str(tensor.dtype).removeprefix('torch.')}" if tensor.dtype != torch.float32 else ""
    raise CheckpointError(f"{source}: tensor {name!r} holds {bad} NaN or infinite values{as_dtype}")


# --- Names -----------------------------------------------------------------------------------------

HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",
    "block_sparse_moe.gate": "feed_forward.gate",  # Mixtral's router
}
HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "output.weight"}
# A block's tensor: (layer index, module, weight or bias).
HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
META_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")


def to_meta_name(key: str, top_names: dict[str, str], layer_key: re.Pattern, layer_names: dict[str, str]
                 ) -> str | None:
    """Meta's name for a tensor of another naming scheme (None for a name it does not know):
    top_names maps whole names; layer_key matches a block tensor as (layer index, module, weight or bias)."""
    if key in top_names:
        return top_names[key]
    m = layer_key.fullmatch(key)
    if m and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    return None


# Mixtral's experts, numbered within their block: (layer index, expert index, w1 | w2 | w3), named
# as Mistral names them (w1/w3/w2: gate/up/down) on both sides.
HF_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
META_EXPERT_KEY = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight")


def is_block_linear(name: str) -> bool:
    """Whether name (Meta's) is the weight of a block's linear layer, a Mixtral expert's included (not
    its bias, which stays 16-bit, nor a router's, which is not quantized)."""
    return (name.startswith("layers.") and name.endswith(".weight")
            and (".attention.w" in name or ".feed_forward.w" in name or ".feed_forward.experts." in name))


def hf_to_meta_name(key: str) -> str | None:
    expert = HF_EXPERT_KEY.fullmatch(key)
    if expert:
        return "layers.{}.feed_forward.experts.{}.{}.weight".format(*expert.groups())
    return to_meta_name(key, HF_TOP_NAMES, HF_LAYER_KEY, HF_LAYER_NAMES)


def meta_to_hf_name(name: str) -> str:
    """Hugging Face's name for a Meta parameter name (the inverse of hf_to_meta_name)."""
    top = {meta: hf for hf, meta in HF_TOP_NAMES.items()}
    layer = {meta: hf for hf, meta in HF_LAYER_NAMES.items()}
    if name in top:
        return top[name]
    expert = META_EXPERT_KEY.fullmatch(name)
    if expert:
        return "model.layers.{}.block_sparse_moe.experts.{}.{}.weight".format(*expert.groups())
    m = META_LAYER_KEY.fullmatch(name)
    if m is None or m.group(2) not in layer:
        raise KeyError(f"{name!r} is not a parameter name of a LLaMA model")
    return f"model.layers.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"


# --- Rotary layout ---------------------------------------------------------------------------------
# Meta rotates interleaved pairs of each head's dimensions (2i, 2i+1); Hugging Face's conversion
# permutes the q/k rows so that its rotary can pair dimension i with i + head_dim/2 instead.

def unpermute_rotary_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """q/k rows from Hugging Face's half-split rotary layout to Meta's interleaved one."""
    rows, cols = w.shape
    # [heads, 2 halves, head_dim/2, cols] -> [heads, head_dim/2, 2, cols]
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rotary_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """q/k rows from Meta's interleaved rotary layout to Hugging Face's half-split one."""
    rows, cols = w.shape
    # [heads, head_dim/2, 2, cols] -> [heads, 2 halves, head_dim/2, cols]
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_heads(name: str, args: ModelArgs) -> int | None:
    """How many heads of rotated dimensions a parameter lays out along its first axis: the q and k
    projections' (weight rows and biases), one for the per-head q/k norms; None for the others."""
    return {"wq": args.n_heads, "wk": args.n_kv_heads, "q_norm": 1, "k_norm": 1}.get(name.split(".")[-2])


def to_interleaved_layout(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """A parameter from Hugging Face's half-split rotary layout to Meta's interleaved one (a bias or a
    norm weight moves as rows of one column); a parameter rotary_heads does not name, or one of
    another size, as it is (the loader's shape check refuses the latter by name)."""
    heads = rotary_heads(name, args)
    if heads is None or t.dim() == 0 or t.shape[0] != heads * args.head_dim:
        return t
    return unpermute_rotary_rows(t.reshape(t.shape[0], -1), heads, args.head_dim).reshape(t.shape)


def to_half_split_layout(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The inverse of to_interleaved_layout."""
    heads = rotary_heads(name, args)
    if heads is None or t.dim() == 0 or t.shape[0] != heads * args.head_dim:
        return t
    return permute_rotary_rows(t.reshape(t.shape[0], -1), heads, args.head_dim).reshape(t.shape)


# --- Safe reads ------------------------------------------------------------------------------------

def file_inside(folder: Path, entry: Any, listed_in: Path) -> Path:
    """folder/entry, for a file name read from the checkpoint's own metadata (listed_in): refused
    unless it stays in folder, as an absolute path, `..` or a symbolic link out of it would not.

    One exception: the Hugging Face hub's cache keeps a snapshot's files as links into the blobs
    folder of the same repository, so links from .../snapshots/<revision> into .../blobs pass.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise CheckpointError(f"{listed_in}: {entry!r} is not a file name")
    relative = Path(entry)
    if relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(f"{listed_in}: file {entry!r} lies outside {folder}; a checkpoint may only name "
                              "files inside its folder")
    path = folder / relative
    resolved, roots = path.resolve(), allowed_roots(folder.resolve())
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise CheckpointError(f"{listed_in}: file {entry!r} is a symbolic link to {resolved}, outside {folder}; "
                              "a checkpoint may only name files inside its folder")
    return path


def indexed_safetensors_files(index: Path) -> list[Path]:
    """The shards a Hugging Face model.safetensors.index.json names, in order, each kept inside its folder."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map (expected an object of tensor name -> shard file)")
    return [file_inside(index.parent, name, index) for name in dict.fromkeys(weight_map.values())]


def allowed_roots(folder: Path) -> list[Path]:
    """folder, and for a snapshot of the Hugging Face hub's cache its repository's blobs folder."""
    parts = folder.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--")):
            return [folder, Path(*parts[:i]) / "blobs"]
    return [folder]


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
