"""Real LLaMA-family shapes (and a Mixtral scaled down to 1 B parameters), and checkpoints of random
weights in them, so that loading and memory can be measured without downloading anything.

`write_meta_checkpoint` cuts each tensor into model-parallel shards the way Meta's releases do;
`write_hf_checkpoint` converts a Meta folder to Hugging Face's layout (q/k rows permuted back), so that
both hold the same weights; `write_word_tokenizer` gives either folder a tokenizer.json.
`write_random_hf_checkpoint` writes any shape, Mixtral's included (which has no Meta format here),
straight to a Hugging Face folder with the package's own writer:

    python -m benchmarks.synthetic Mixtral-1B /tmp/mixtral-1b-hf    # then --ckpt_dir it in benchmarks.speed
"""

from __future__ import annotations

import json
import math
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import fire
import torch
from safetensors.torch import save_file

from llama_int8.formats.common import HF_LAYER_NAMES, HF_TOP_NAMES, Checkpoint, NamedTensor
from llama_int8.formats.hf import write_hf
from llama_int8.formats.meta import META_SHARD_DIM, read_meta_tensors
from llama_int8.model import ModelArgs, empty_model, parameter_shapes

SHAPES: dict[str, ModelArgs] = {
    "SmolLM2-135M": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                              rope_theta=100000.0, tie_word_embeddings=True),
    "TinyLlama-1.1B": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632),
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, hidden_dim=13824),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, hidden_dim=28672),
    "Llama-3-8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                            rope_theta=500000.0),
    "Mistral-7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000, hidden_dim=14336,
                            rope_theta=1000000.0),
    "Mixtral-8x7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000, hidden_dim=14336,
                              rope_theta=1000000.0, n_experts=8, experts_per_token=2),
    # Not a released model: Mixtral-8x7B's layout (8 experts, 2 per token, 4 query heads per key/value
    # head) narrowed and shortened to 1.00 B parameters, for load and speed runs on a small machine.
    "Mixtral-1B": ModelArgs(dim=1024, n_layers=12, n_heads=16, n_kv_heads=4, vocab_size=32000, hidden_dim=3072,
                            rope_theta=1000000.0, n_experts=8, experts_per_token=2),
}


def shape(name: str, **overrides) -> ModelArgs:
    """A copy of a named shape, with fields overridden (e.g. n_layers=2 for a quick run); head_dim is
    derived again from an overridden dim or n_heads unless given."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    if {"dim", "n_heads"} & overrides.keys():
        overrides.setdefault("head_dim", None)  # the copy would keep the shape's own, set at its construction
    return replace(SHAPES[name], **overrides)


def parameter_count(args: ModelArgs) -> int:
    """Parameters a checkpoint of args holds (a tied head counted once)."""
    return sum(math.prod(s) for s in parameter_shapes(args).values())


def random_piece(name: str, piece: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Deterministic random values for one piece of one tensor: N(0, 0.02), or ones for norms."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + zlib.crc32(f"{name}/{piece}".encode()))
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)


def meta_params(args: ModelArgs) -> dict:
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "vocab_size": args.vocab_size, "hidden_dim": args.ffn_hidden_dim, "norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "tie_word_embeddings": args.tie_word_embeddings}


def write_meta_checkpoint(folder: str | Path, args: ModelArgs, shards: int = 1, dtype: torch.dtype = torch.bfloat16,
                          seed: int = 0) -> Path:
    """params.json and consolidated.NN.pth holding random weights, each tensor split across shards on
    its model-parallel axis; one shard is built in memory at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(meta_params(args), indent=1))
    params = dict(empty_model(args).named_parameters())
    if args.tie_word_embeddings:
        params.pop("output.weight")
    for i in range(shards):
        shard = {}
        for name, p in params.items():
            dim = META_SHARD_DIM[name.split(".")[-2]]
            piece_shape = list(p.shape)
            if dim is not None:
                if piece_shape[dim] % shards:
                    raise ValueError(f"{name}: {piece_shape[dim]} does not split into {shards} shards")
                piece_shape[dim] //= shards
            shard[name] = random_piece(name, 0 if dim is None else i, tuple(piece_shape), dtype, seed)
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
        del shard
    return folder


def permute_rotary_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> Hugging Face's half-split layout (what HF's conversion does)."""
    rows, cols = w.shape
    # [heads, head_dim/2, 2, cols] -> [heads, 2, head_dim/2, cols]
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
            "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "max_position_embeddings": 4096, "tie_word_embeddings": args.tie_word_embeddings,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "dtype": str(dtype).removeprefix("torch.")}


def write_hf_checkpoint(meta_folder: str | Path, folder: str | Path, args: ModelArgs,
                        dtype: torch.dtype = torch.bfloat16) -> Path:
    """The weights of a Meta folder as config.json + model.safetensors in Hugging Face's names and layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    to_hf = {v: k for k, v in HF_TOP_NAMES.items()}
    layer_to_hf = {v: k for k, v in HF_LAYER_NAMES.items()}
    tensors = {}
    for item in read_meta_tensors(Path(meta_folder), args):
        name, t = item.name, item.tensor
        if name in to_hf:
            hf_name = to_hf[name]
        else:
            _, index, *rest = name.split(".")
            hf_name = f"model.layers.{index}.{layer_to_hf['.'.join(rest[:-1])]}.weight"
        if name.endswith("attention.wq.weight"):
            t = permute_rotary_rows(t, args.n_heads, args.head_dim)
        elif name.endswith("attention.wk.weight"):
            t = permute_rotary_rows(t, args.n_kv_heads, args.head_dim)
        tensors[hf_name] = t.to(dtype).contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=1))
    return folder


def write_word_tokenizer(folder: str | Path, words: int = 256) -> Path:
    """A small word-level tokenizer.json (<unk>, <s>, </s>, then w3, w4, ...), enough to build a Llama."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, words)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = Path(folder) / "tokenizer.json"
    tokenizer.save(str(path))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


class RandomCheckpoint(Checkpoint):
    """Random weights in args' shapes (random_piece's, under Meta's names), as a checkpoint the package's
    writers take; its tokenizer is the one in folder."""

    format = "random"

    def __init__(self, folder: Path, args: ModelArgs, dtype: torch.dtype, seed: int):
        self.location, self.args, self.dtype, self.seed = folder, args, dtype, seed

    def tensors(self) -> Iterator[NamedTensor]:
        for name, piece_shape in parameter_shapes(self.args).items():
            yield NamedTensor(name, random_piece(name, 0, piece_shape, self.dtype, self.seed), "random")


def write_random_hf_checkpoint(folder: str | Path, args: ModelArgs, dtype: torch.dtype = torch.bfloat16,
                               seed: int = 0, shard_bytes: int = 1024**3) -> Path:
    """A Hugging Face folder (config.json of args' model type, e.g. mixtral; safetensors shards of about
    shard_bytes with their index; a word-level tokenizer) of random weights, one shard in memory at a
    time. Its weights are not write_meta_checkpoint's (q/k rows are drawn in Hugging Face's layout)."""
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        write_word_tokenizer(tokenizer_folder)
        return write_hf(RandomCheckpoint(Path(tokenizer_folder), args, dtype, seed), folder, shard_bytes=shard_bytes)


def main(shape_name: str, out_dir: str, dtype: str = "bfloat16", seed: int = 0) -> None:
    """Write random weights in a named shape as a Hugging Face folder out_dir."""
    args = shape(shape_name)
    write_random_hf_checkpoint(out_dir, args, getattr(torch, dtype), seed)
    print(f"{out_dir}: {shape_name}, {parameter_count(args) / 1e9:.3f} B parameters, random {dtype}")


if __name__ == "__main__":
    fire.Fire(main)
