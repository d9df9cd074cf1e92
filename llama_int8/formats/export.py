"""What every writer of a Hugging Face-style folder shares (formats hf, hf-bnb, compressed-tensors):
the output folder, config.json, the tensors under Hugging Face's names and rotary layout in
safetensors shards with an index, the tokenizer files and generation_config.json beside them.
Each format's module says only how its layers are quantized and how its config.json says so.

The output folder is formats/writing.py's `new_folder`: a temporary folder beside out_dir, renamed
into place when complete; an existing out_dir is replaced only with force, and only when it is a
folder of the same kind this project wrote; never the source or a folder around or inside it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model import ModelArgs, parameter_shapes
from ..quantize import NonFiniteWeightError
from ..tokenizer import Tokenizer, find_tokenizer_file
from .common import Checkpoint, CheckpointError, NamedTensor, checked_tensors, meta_to_hf_name, to_half_split_layout
from .writing import new_folder

log = logging.getLogger(__name__)

# Tokenizer files transformers, vLLM and TGI read beside the weights (config.json and
# generation_config.json are written, not copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- The folder ------------------------------------------------------------------------------------
# Layer tensors under Hugging Face's module names (a quantized layer's bitsandbytes or
# compressed-tensors state dict, or one weight), q/k rows in its rotary layout.

# Makes a quantized layer's tensors (suffix -> tensor) from its [out, in] weight.
LayerQuantizer = Callable[[torch.Tensor], dict[str, torch.Tensor]]
# The block linears a quantized export quantizes (the head stays 16-bit: transformers and vLLM expect it).
# Mixtral's experts and routers stay 16-bit too, as transformers writes them: it quantizes nn.Linear
# modules only, and holds a block's experts as 3-D parameters (llama_int8 quantizes them at load).
QUANTIZED_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")


def write_hf_folder(checkpoint: Checkpoint, out_dir: str | Path, kind: str, dtype: torch.dtype | None, force: bool,
                    tokenizer_path: str | Path | None, shard_bytes: int, quantize: LayerQuantizer | None = None,
                    quantization_config: Callable[[torch.dtype], dict] | None = None) -> Path:
    """Write checkpoint as a Hugging Face folder out_dir of this kind: the block linears through
    quantize (when given), every other tensor in dtype (None: the source's), config.json (with
    quantization_config(dtype written), when given), tokenizer files and generation_config.json."""
    check_unquantized_source(checkpoint, kind)
    tokenizer = checkpoint.tokenizer(tokenizer_path)
    start = time.perf_counter()
    with new_folder(out_dir, kind, checkpoint.paths(), force) as folder:
        writer = HFShardWriter(folder, shard_bytes)
        written_dtype = write_hf_tensors(checkpoint, dtype, writer, quantize)
        writer.finish()
        quantization = quantization_config(written_dtype) if quantization_config is not None else None
        config = hf_config(checkpoint.args, written_dtype, special_token_ids(tokenizer), quantization)
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        write_tokenizer_files(checkpoint, tokenizer, folder, tokenizer_path)
    log.info("Wrote %s (%s, %s) in %.1f s", out_dir, kind, str(written_dtype).removeprefix("torch."),
             time.perf_counter() - start)
    return Path(out_dir)


def write_hf_tensors(checkpoint: Checkpoint, dtype: torch.dtype | None, writer: HFShardWriter,
                     quantize: LayerQuantizer | None) -> torch.dtype:
    """Stream the checkpoint's tensors into writer under Hugging Face's names, quantizing the block
    linears from their rows in Hugging Face's layout when quantize is given; returns the dtype of
    the 16/32-bit tensors written. Weights are cast to dtype before quantizing, as transformers'
    from_pretrained(dtype=...) casts them."""
    written_dtype = dtype
    for item in hf_ordered_tensors(checkpoint):
        tensor = item.tensor if dtype is None else item.tensor.to(dtype)
        written_dtype = written_dtype or tensor.dtype
        hf_name = meta_to_hf_name(item.name)
        module = hf_name.removesuffix(".weight")
        if quantize is not None and QUANTIZED_LINEAR.fullmatch(module):
            for key, value in quantized_layer(quantize, tensor, item).items():
                writer.add(f"{module}.{key}", value)
        else:
            writer.add(hf_name, tensor)
        del item, tensor
    return written_dtype


def quantized_layer(quantize: LayerQuantizer, tensor: torch.Tensor, item: NamedTensor) -> dict[str, torch.Tensor]:
    """quantize(tensor); a weight the quantizer refuses (NaN, infinities, beyond float16 for
    bitsandbytes' int8) is named with its source."""
    try:
        return quantize(tensor)
    except NonFiniteWeightError as e:
        raise CheckpointError(f"{item.source}: tensor {item.name!r} {e}") from e


HF_SHARD_LIMIT = 5 * 10**9  # the largest shard Hugging Face's tools write by default (5 GB)


HF_ARCHITECTURE_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                         "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM"}  # by model_type


def hf_model_type(args: ModelArgs) -> str:
    """The Hugging Face model_type whose blocks compute what args' do: Mixtral for experts, Qwen3 for
    per-head q/k norms, Qwen2 for q/k/v biases, Mistral for a sliding window without either, else LLaMA."""
    if args.qk_norm and args.qkv_bias:
        raise CheckpointError("a model with both q/k/v biases and q/k norms has no Hugging Face architecture "
                              "to be written as")
    if args.n_experts:
        if args.qk_norm or args.qkv_bias:
            raise CheckpointError("a mixture of experts with q/k/v biases or q/k norms has no Hugging Face "
                                  "architecture to be written as (Mixtral has neither)")
        return "mixtral"
    if args.qk_norm or args.qkv_bias:
        return "qwen3" if args.qk_norm else "qwen2"
    return "mistral" if args.sliding_window is not None else "llama"


def hf_config(args: ModelArgs, dtype: torch.dtype, token_ids: dict, quantization_config: dict | None = None) -> dict:
    """config.json for args (the inverse of hf_model_args): see hf_model_type. rope_theta and
    rope_scaling are spelled at the top level, which transformers 4 and 5, vLLM and
    text-generation-inference all read."""
    model_type = hf_model_type(args)
    config = {
        "architectures": [HF_ARCHITECTURE_NAMES[model_type]],
        "model_type": model_type,
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling or None, "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."), **token_ids,
    }
    if args.max_position_embeddings is not None:
        config["max_position_embeddings"] = args.max_position_embeddings
    if model_type in ("mistral", "mixtral"):
        config["sliding_window"] = args.sliding_window
    if model_type == "mixtral":
        config.update(num_local_experts=args.n_experts, num_experts_per_tok=args.experts_per_token)
    elif model_type in ("qwen2", "qwen3"):  # a window, when there is one, in every layer: from layer 0 on
        config.update(use_sliding_window=args.sliding_window is not None, sliding_window=args.sliding_window,
                      max_window_layers=0)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


def hf_ordered_tensors(checkpoint: Checkpoint) -> Iterator[NamedTensor]:
    """The checkpoint's tensors, checked against its configuration, in Hugging Face's rotary layout
    (under Meta's names still); a tied head is left out, as Hugging Face saves it."""
    args = checkpoint.args
    tied = frozenset({"output.weight"}) if args.tie_word_embeddings else frozenset()
    for item in checked_tensors(checkpoint.tensors(), parameter_shapes(args), ignored=tied):
        yield NamedTensor(item.name, to_half_split_layout(item.name, item.tensor, args), item.source)
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


# --- The source -------------------------------------------------------------------------------------

def check_unquantized_source(checkpoint: Checkpoint, kind: str) -> None:
    """Writers read 16-bit tensors: a checkpoint stored quantized has none for its layers."""
    if checkpoint.quant is not None:
        raise ValueError(f"{checkpoint.location} is stored quantized ({checkpoint.quant.name}); {kind} is written "
                         "from a 16/32-bit checkpoint (Meta, Hugging Face, GGUF or a stack of them)")


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype of the written 16/32-bit tensors: float32, bfloat16 or float16 (None: the source's own)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


# --- Beside the weights -----------------------------------------------------------------------------

def write_tokenizer_files(checkpoint: Checkpoint, tokenizer: Tokenizer, folder: Path,
                          tokenizer_path: str | Path | None) -> None:
    """The source's tokenizer files (a GGUF's vocabulary as tokenizer.json), and a generation_config.json:
    the source's own, else one naming the tokenizer's BOS and stop tokens."""
    if checkpoint.format == "gguf" and tokenizer_path is None:
        tokenizer.save(folder)  # the vocabulary lives inside the file
        source_folder = None
    else:
        found = find_tokenizer_file(checkpoint.folder, tokenizer_path)
        source_folder = found.parent
        shutil.copy2(found, folder / found.name)
        if found.suffix == ".json":
            for name in TOKENIZER_FILES:
                if (source_folder / name).is_file() and not (folder / name).exists():
                    shutil.copy2(source_folder / name, folder / name)
    if source_folder is not None and (source_folder / GENERATION_CONFIG).is_file():
        shutil.copy2(source_folder / GENERATION_CONFIG, folder / GENERATION_CONFIG)
    else:
        (folder / GENERATION_CONFIG).write_text(json.dumps(special_token_ids(tokenizer), indent=1) + "\n")


def special_token_ids(tokenizer: Tokenizer) -> dict:
    """bos_token_id / eos_token_id as config.json and generation_config.json spell them."""
    stops = sorted(tokenizer.stop_ids)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
