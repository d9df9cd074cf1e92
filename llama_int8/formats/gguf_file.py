"""GGUF files (llama.cpp's format): LLaMA weights, configuration and tokenizer in one file.

A GGUF is read with the `gguf` package: its metadata becomes a ModelArgs, its tensors are
dequantized one at a time to float32 under Meta's names, and its vocabulary becomes a `tokenizers`
tokenizer. llama.cpp's converter undoes Hugging Face's q/k row permutation for `llama` files, so
their q/k rows are already in Meta's interleaved rotary layout and are used as they are; `qwen2` and
`qwen3` files keep Hugging Face's half-split rows (llama.cpp's NEOX rotary), converted here as a
Hugging Face folder's are. A Mixtral is a `llama` file with `expert_count`: its routers are
`ffn_gate_inp`, and each block's experts are stacked in one tensor per weight (`ffn_gate_exps`, ...),
dequantized one expert at a time.

For quant mode gguf the block linear weights stored Q4_0 or Q4_1 come undequantized, as ggml's
blocks (q4_linear_weights), and tensors() leaves them out; rows of blocks move whole, so a half-split
file's q/k rows are brought to Meta's layout exactly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..int4pack import BLOCK_BYTES
from ..model import ModelArgs, rope_inverse_frequencies
from ..tokenizer import END_OF_TURN_TOKENS, FastTokenizer, Tokenizer, TokenizerError
from .common import (Checkpoint, CheckpointError, NamedTensor, is_block_linear, to_interleaved_layout,
                     to_meta_name)
from .model_config import model_args_from

log = logging.getLogger(__name__)

GGUF_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "output.weight"}
GGUF_LAYER_NAMES = {  # w1/w3/w2 are gate/up/down
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "ffn_gate_inp": "feed_forward.gate",  # Mixtral's router
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm", "attn_q_norm": "attention.q_norm",
    "attn_k_norm": "attention.k_norm",
}
GGUF_LAYER_KEY = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Mixtral's experts, as llama.cpp stacks them: one tensor [experts, out, in] per weight and block.
GGUF_EXPERTS_KEY = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
GGUF_EXPERT_WEIGHTS = {"gate": "w1", "up": "w3", "down": "w2"}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's rope scaling, stored as per-frequency divisors

# llama.cpp token types (tokenizer.ggml.token_type)
CONTROL, USER_DEFINED, BYTE = 3, 4, 6


@dataclass(frozen=True)
class GGUFArchitecture:
    """What a general.architecture adds to LLaMA's blocks, and how its file lays out q/k rows."""

    qkv_bias: bool = False
    qk_norm: bool = False
    half_split_rotary: bool = False  # q/k rows as Hugging Face has them (llama.cpp's NEOX rotary)


GGUF_ARCHITECTURES = {"llama": GGUFArchitecture(), "qwen2": GGUFArchitecture(qkv_bias=True, half_split_rotary=True),
                      "qwen3": GGUFArchitecture(qk_norm=True, half_split_rotary=True)}


class StoredTensor(NamedTuple):
    """One tensor of the file (or one expert of a stack), under Meta's name, as ggml stores it."""

    name: str  # Meta's parameter name
    tensor: Any  # the reader's tensor: its ggml type and name
    data: np.ndarray  # its bytes or values, memory-mapped
    shape: tuple[int, ...]  # in Meta's orientation ([out, in] for a linear weight)


@dataclass
class Q4Weight:
    """A block linear weight stored Q4_0 or Q4_1, not dequantized."""

    name: str  # Meta's parameter name, e.g. "layers.0.attention.wq.weight"
    kind: str  # "Q4_0" or "Q4_1"
    blocks: np.ndarray  # uint8 [out, in / 32 * bytes per block]: each row's 32-weight blocks in turn
    shape: tuple[int, int]  # [out, in]
    source: str


class GGUFCheckpoint(Checkpoint):
    """A GGUF file, parsed once: the reader serves the configuration, the tensors and the tokenizer."""

    format = "gguf"

    def __init__(self, path: Path):
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(path)  # memory-mapped
        except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on bad files
            raise CheckpointError(f"{path}: cannot read this GGUF file ({type(e).__name__}: {e})") from e
        self.location = path
        self.args = gguf_model_args(self.reader, path)
        self.architecture = GGUF_ARCHITECTURES[metadata(self.reader, "general.architecture")]

    def tensors(self, leave_out_q4_linears: bool = False) -> Iterator[NamedTensor]:
        """Every tensor dequantized to float32; with leave_out_q4_linears, all but the block linear
        weights stored Q4_0 or Q4_1 (those q4_linear_weights gives)."""
        tensors = read_gguf_tensors(self.reader, self.location, leave_out_q4_linears)
        if not self.architecture.half_split_rotary:
            return tensors
        return (NamedTensor(t.name, to_interleaved_layout(t.name, t.tensor, self.args), t.source) for t in tensors)

    def q4_linear_names(self) -> list[str]:
        """Meta's names of the block linear weights stored Q4_0 or Q4_1 (what quant 'gguf' packs)."""
        return [stored.name for stored in stored_tensors(self.reader, self.location) if is_q4_linear(stored)]

    def q4_linear_weights(self) -> Iterator[Q4Weight]:
        """The block linear weights stored Q4_0 or Q4_1, as ggml's blocks, one at a time (Mixtral's
        experts one expert at a time); a half-split file's q/k rows moved to Meta's layout."""
        for stored in stored_tensors(self.reader, self.location):
            if not is_q4_linear(stored):
                continue
            blocks = stored.data
            if self.architecture.half_split_rotary:  # a copy: the memory map is read-only
                blocks = to_interleaved_layout(stored.name, torch.from_numpy(blocks.copy()), self.args).numpy()
            yield Q4Weight(stored.name, stored.tensor.tensor_type.name, blocks, stored.shape, str(self.location))

    def tokenizer(self, tokenizer_path: str | Path | None = None) -> Tokenizer:
        """The given tokenizer, else the one rebuilt from the file's own vocabulary."""
        if tokenizer_path is not None:
            return super().tokenizer(tokenizer_path)
        return gguf_tokenizer(self.reader, self.location)


def metadata(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_model_args(reader, path: Path) -> ModelArgs:
    """ModelArgs from the file's `<architecture>.*` metadata (llama, qwen2, qwen3); the head is tied
    when there is no output.weight. llama.cpp keeps no sliding window for these architectures."""
    arch = metadata(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; supported GGUF architectures: "
                              f"{', '.join(GGUF_ARCHITECTURES)}")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = metadata(reader, f"{arch}.{key}", default)
        if required and value is None:
            raise CheckpointError(f"{path}: missing required metadata key '{arch}.{key}'")
        if isinstance(value, list):
            raise CheckpointError(f"{path}: '{arch}.{key}' varies per layer ({value[:4]}...), which is not supported")
        return value

    tensors = {t.name: t for t in reader.tensors}
    n_heads = get("attention.head_count", required=True)
    dim = get("embedding_length", required=True)
    head_dim = get("attention.key_length", get("rope.dimension_count"))
    if head_dim is not None and get("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: rotary embedding on {get('rope.dimension_count')} of {head_dim} "
                              "head dimensions (partial rotary) is not supported")
    head_dim_key = "attention.key_length" if get("attention.key_length") is not None else "rope.dimension_count"
    architecture = GGUF_ARCHITECTURES[arch]
    args = model_args_from(path, {
        "dim": (f"{arch}.embedding_length", dim),
        "n_layers": (f"{arch}.block_count", get("block_count", required=True)),
        "n_heads": (f"{arch}.attention.head_count", n_heads),
        "n_kv_heads": (f"{arch}.attention.head_count_kv", get("attention.head_count_kv")),
        "vocab_size": gguf_vocab_size(reader, arch, tensors, path), "head_dim": (f"{arch}.{head_dim_key}", head_dim),
        "hidden_dim": (f"{arch}.feed_forward_length", get("feed_forward_length")),
        "norm_eps": (f"{arch}.attention.layer_norm_rms_epsilon", get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": (f"{arch}.rope.freq_base", get("rope.freq_base", 10000.0)),
        "rope_scaling": (f"{arch}.rope.scaling", gguf_rope_scaling(arch, get("rope.scaling.type"),
                                                                   get("rope.scaling.factor"), path)),
        "tie_word_embeddings": ("output.weight", "output.weight" not in tensors),
        "max_position_embeddings": (f"{arch}.context_length", get("context_length")),
        "qkv_bias": ("general.architecture", architecture.qkv_bias),
        "qk_norm": ("general.architecture", architecture.qk_norm),
        "n_experts": (f"{arch}.expert_count", get("expert_count")),  # Mixtral: llama with experts
        "experts_per_token": (f"{arch}.expert_used_count", get("expert_used_count")),
    })
    if ROPE_FREQS in tensors:
        args = with_llama3_rope(args, torch.from_numpy(np.array(tensors[ROPE_FREQS].data, dtype=np.float32)), path)
    return args


def gguf_vocab_size(reader, arch: str, tensors: dict, path: Path) -> tuple[str, Any]:
    """The vocabulary size and where it comes from: <arch>.vocab_size, the token list or the embedding."""
    size = metadata(reader, f"{arch}.vocab_size")
    if size is not None:
        return f"{arch}.vocab_size", size
    if "tokenizer.ggml.tokens" in reader.fields:
        return "len(tokenizer.ggml.tokens)", len(reader.fields["tokenizer.ggml.tokens"].data)
    if "token_embd.weight" in tensors:
        return "token_embd.weight's columns", int(tensors["token_embd.weight"].shape[1])  # ggml order: [dim, vocab]
    raise CheckpointError(f"{path}: no {arch}.vocab_size, token list or token_embd.weight to size the vocabulary")


def gguf_rope_scaling(arch: str, kind: str | None, factor: float | None, path: Path) -> dict:
    if kind in (None, "none"):
        return {}
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": factor}
    raise CheckpointError(f"{path}: {arch}.rope.scaling.type {kind!r} is not supported (only linear)")


def with_llama3_rope(args: ModelArgs, divisors: torch.Tensor, path: Path) -> ModelArgs:
    """Llama 3.1 GGUFs store the rope scaling as divisors of each frequency; recognize Meta's rule in them."""
    scaled = replace(args, rope_scaling={"rope_type": "llama3", "factor": float(divisors.max()),
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192})
    implied = rope_inverse_frequencies(replace(args, rope_scaling={})) / rope_inverse_frequencies(scaled)
    if implied.shape != divisors.shape or not torch.allclose(implied, divisors, rtol=1e-3):
        raise CheckpointError(f"{path}: {ROPE_FREQS} does not follow Llama 3.1's rope scaling rule; "
                              "this rope scaling is not supported")
    return scaled


def gguf_to_meta_name(name: str) -> str | None:
    return to_meta_name(name, GGUF_TOP_NAMES, GGUF_LAYER_KEY, GGUF_LAYER_NAMES)


def read_gguf_tensors(reader, path: Path, leave_out_q4_linears: bool = False) -> Iterator[NamedTensor]:
    """Each tensor dequantized to float32, in Meta's [out, in] orientation, one at a time; a stack of
    Mixtral experts one expert at a time; with leave_out_q4_linears, all but the block linear weights
    stored Q4_0 or Q4_1."""
    for stored in stored_tensors(reader, path):
        if not (leave_out_q4_linears and is_q4_linear(stored)):
            yield NamedTensor(stored.name, dequantized(stored.tensor, stored.data, stored.shape, path), str(path))


def is_q4_linear(stored: StoredTensor) -> bool:
    """Whether stored is a block linear weight (what quant mode gguf packs) stored Q4_0 or Q4_1."""
    return stored.tensor.tensor_type.name in BLOCK_BYTES and is_block_linear(stored.name)


def stored_tensors(reader, path: Path) -> Iterator[StoredTensor]:
    """Each tensor under Meta's name, as stored; a stack of Mixtral experts one expert at a time."""
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # folded into ModelArgs.rope_scaling
        # ggml lists dimensions innermost first ([in, out]); numpy and torch want them outermost first.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        experts = GGUF_EXPERTS_KEY.fullmatch(t.name)
        if experts:
            layer, weight = experts.group(1), GGUF_EXPERT_WEIGHTS[experts.group(2)]
            for e in range(shape[0]):  # [experts, out, in]
                yield StoredTensor(f"layers.{layer}.feed_forward.experts.{e}.{weight}.weight", t, t.data[e], shape[1:])
            continue
        name = gguf_to_meta_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} (not part of a LLaMA model)")
        yield StoredTensor(name, t, t.data, shape)


def dequantized(t, data: np.ndarray, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    """data (t's values, or one expert's of them) dequantized to a float32 tensor of shape."""
    from gguf.quants import dequantize

    try:
        values = dequantize(data, t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"{path}: tensor {t.name!r} is {t.tensor_type.name}, which gguf cannot "
                              f"dequantize ({e})") from e
    if not values.flags.writeable:
        values = values.copy()  # F32 comes back as a view of the read-only memory map
    return torch.from_numpy(values.reshape(shape))


# --- Tokenizer -------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer regexes (tokenizer.ggml.pre) where they differ from GPT-2's.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
# Splits that take the place of GPT-2's own (the others run before it).
WHOLE_SPLITS = (LLAMA3_SPLIT, QWEN2_SPLIT)
PRE_SPLITS = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT,
              "smaug-bpe": LLAMA3_SPLIT, "dbrx": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT,
              # digits one by one, then GPT-2's split
              "smollm": r"\p{N}", "starcoder": r"\p{N}", "refact": r"\p{N}"}
GPT2_PRE = {"default", "gpt2", "gpt-2"}


class GGUFTokenizer(FastTokenizer):
    """The tokenizer a GGUF describes, rebuilt with `tokenizers`."""

    def __init__(self, tok, tokens: list[str], token_types: list[int], bos_id: int | None, eos_id: int | None,
                 add_bos: bool, chat_template: str | None):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        control = {t for t, kind in zip(tokens, token_types) if kind == CONTROL}
        self.stop_ids = frozenset({eos_id} - {None} | {tok.token_to_id(t) for t in END_OF_TURN_TOKENS if t in control})

    def save(self, folder: Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that HFTokenizer reads to the same ids."""
        self.tok.save(str(folder / "tokenizer.json"))
        config = {"bos_token": self.piece(self.bos_id), "eos_token": self.piece(self.eos_id),
                  "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    def piece(self, i: int | None) -> str | None:
        return None if i is None else self.tok.id_to_token(i)


def gguf_tokenizer(reader, path: Path) -> GGUFTokenizer:
    """The tokenizer of a GGUF file: byte-level BPE ('gpt2') or SentencePiece-style ('llama')."""
    kind = metadata(reader, "tokenizer.ggml.model")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"{path}: no tokenizer.ggml.tokens; pass --tokenizer_path")
    types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = byte_level_bpe(tokens, metadata(reader, "tokenizer.ggml.merges") or [],
                             metadata(reader, "tokenizer.ggml.pre", "default"), path)
    elif kind == "llama":
        scores = metadata(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = sentencepiece_bpe(tokens, scores, types, metadata(reader, "tokenizer.ggml.add_space_prefix", True))
    else:
        raise TokenizerError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (gpt2, llama); "
                             "pass --tokenizer_path")
    add_special_tokens(tok, tokens, types)
    default_bos = kind == "llama"  # llama.cpp adds BOS to SentencePiece vocabularies that do not say
    return GGUFTokenizer(tok, tokens, types, metadata(reader, "tokenizer.ggml.bos_token_id"),
                         metadata(reader, "tokenizer.ggml.eos_token_id"),
                         metadata(reader, "tokenizer.ggml.add_bos_token", default_bos),
                         metadata(reader, "tokenizer.chat_template"))


def byte_level_bpe(tokens: list[str], merges: list[str], pre: str, path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    split = PRE_SPLITS.get(pre)
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges],
                               ignore_merges=split == LLAMA3_SPLIT))  # llama 3 keeps a word whole when it is a token
    if pre not in PRE_SPLITS and pre not in GPT2_PRE:
        log.warning("%s: tokenizer.ggml.pre %r is not known here; splitting text as GPT-2 does, which may "
                    "differ from llama.cpp", path, pre)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split not in WHOLE_SPLITS)
    tok.pre_tokenizer = (byte_level if split is None else
                         pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level]))
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool):
    """A SentencePiece BPE vocabulary as a `tokenizers` BPE: merges ranked by the merged piece's score."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, i in vocab.items():
        if types[i] in (CONTROL, BYTE):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = next((t for t, kind in zip(tokens, types) if kind == 2), None)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=BYTE in types))
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    decode_steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decode_steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def add_special_tokens(tok, tokens: list[str], types: list[int]) -> None:
    """Control tokens (<|im_start|>, <s>...) become special and user-defined ones added tokens, so
    both are matched whole in text instead of being split into pieces."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED])
