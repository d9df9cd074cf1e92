"""Hugging Face folders quantized by bitsandbytes (`quantization_config.quant_method: "bitsandbytes"`):
the reader, and the writer of `quantize_offline.py --format hf-bnb`.

What transformers' `save_pretrained` writes for a model loaded with a BitsAndBytesConfig, and
what transformers and vLLM load without quantizing again: config.json with its quantization_config,
safetensors shards ({"format": "pt"}) holding each quantized layer under Hugging Face's name with
bitsandbytes' state-dict tensors,

    int8:   <layer>.weight (int8 [out, in]), <layer>.SCB (float32 [out]), <layer>.weight_format (uint8 0)
    4-bit:  <layer>.weight (uint8 [out*in/2, 1]), <layer>.weight.absmax, <layer>.weight.quant_map,
            with double quantization <layer>.weight.nested_absmax and .nested_quant_map, and
            <layer>.weight.quant_state.bitsandbytes__nf4 (or __fp4): its settings as JSON bytes

and every other tensor (embedding, norms, head, the biases of quantized layers) in 16 or 32 bits.

The q/k rows of such a folder are in Hugging Face's rotary layout, and they stay so: permuting the
rows of a double-quantized 4-bit layer would regroup the block scales that share one nested scale,
which changes the weights. So the reader gives the model `rope_layout="halves"` and the layers
exactly the file's bytes. The writer casts the weights to the dtype transformers would be given
(`from_pretrained(dtype=...)`; none: the source's, as transformers' default "auto" keeps it),
permutes the rows to Hugging Face's layout and quantizes them as bitsandbytes does when transformers
loads them (int8 through float16), which makes the bytes transformers saves from the same source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from ..model import parameter_shapes
from ..quantize import (QuantConfig, check_packed_quant_state, expected_quantized_tensors,
                        quantize_int8_as_bitsandbytes, quantize_weight)
from .common import (Checkpoint, CheckpointError, NamedTensor, QuantizedLayer, hf_to_meta_name, open_safetensors,
                     read_json, read_safetensors_tensor)
from .export import QUANTIZED_LINEAR, resolve_dtype, write_hf_folder
from .hf import hf_model_args, hf_safetensors_files
from .prebaked import SHARD_BYTES

QUANT_METHOD = "bitsandbytes"
# A tensor of a Hugging Face checkpoint: its module and what of the module it is.
MODULE_TENSOR = re.compile(r"(?P<module>.+?)\.(?P<part>weight(?:\..+)?|SCB|weight_format|bias)")
ROW_MAJOR = 0  # bitsandbytes' weight_format of an int8 weight stored row by row, the only one saved
TRANSFORMERS_BLOCKSIZE = 64  # weights per 4-bit scale when transformers quantizes (its config has no setting)
# What a folder may hold quantized: the block linears, Mixtral's experts (transformers 5 keeps them 16-bit,
# and the loader quantizes them then; a writer that quantizes them stores them as any linear), the head.
QUANTIZED_MODULES = re.compile(
    rf"{QUANTIZED_LINEAR.pattern}|model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]|lm_head")


def open_quantized_hf_folder(folder: Path) -> Checkpoint | None:
    """The Hugging Face folder's checkpoint when its config.json says it is quantized (bitsandbytes is
    read; other methods are refused by name), None for a 16/32-bit one."""
    path = folder / "config.json"
    qc = read_json(path).get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        raise CheckpointError(f"{path}: quantization_config.quant_method is {method!r}; llama_int8 reads "
                              f"{QUANT_METHOD!r} folders and 16/32-bit ones")
    return HFBnbCheckpoint(folder)


class HFBnbCheckpoint(Checkpoint):
    """A bitsandbytes-quantized Hugging Face folder: its quantized layers as the file holds them
    (q/k rows in Hugging Face's layout, hence args.rope_layout "halves"), then its other tensors."""

    format = "hf-bnb"

    def __init__(self, folder: Path):
        self.location = folder
        self.args = replace(hf_model_args(folder), rope_layout="halves")
        self.files = hf_safetensors_files(folder)
        self.modules = index_modules(self.files)  # HF module -> {part: file}
        self.check_quantized_modules()
        self.quant = bnb_quant_config(read_json(folder / "config.json")["quantization_config"], folder / "config.json",
                                      self.quantized_module_names(), self.packed_blocksize)

    def quantized_module_names(self) -> list[str]:
        return [m for m, parts in self.modules.items() if set(parts) - {"bias"} != {"weight"}]

    def packed_blocksize(self, module: str, kind: str) -> int:
        """The blocksize a 4-bit layer's packed quant state records (config.json does not say it)."""
        part = f"weight.quant_state.bitsandbytes__{kind}"
        path = self.modules[module].get(part)
        if path is None:
            raise CheckpointError(f"{self.modules[module]['weight']}: {module} has no {part}, which a {kind} layer holds")
        with open_safetensors(path) as handle:
            packed = read_safetensors_tensor(handle, path, f"{module}.{part}")
        try:
            return int(json.loads(bytes(packed.flatten().tolist()))["blocksize"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: {module}.{part} is not a bitsandbytes quant state ({e})") from e

    def check_quantized_modules(self) -> None:
        for module in self.quantized_module_names():
            if not QUANTIZED_MODULES.fullmatch(module):
                source = next(iter(self.modules[module].values()))
                raise CheckpointError(f"{source}: {module} holds quantized tensors "
                                      f"{sorted(self.modules[module])}, but it is not a linear layer of a LLaMA model")

    def quantized_layers(self) -> Iterator[QuantizedLayer]:
        shapes = parameter_shapes(self.args)
        with self.open_files() as read:
            for module in self.quantized_module_names():
                meta = hf_to_meta_name(f"{module}.weight")
                parts = self.modules[module]
                source = parts["weight"]
                tensors = {part: read(path, f"{module}.{part}") for part, path in parts.items() if part != "bias"}
                yield QuantizedLayer(meta.removesuffix(".weight"),
                                     checked_layer_tensors(tensors, module, shapes[meta], self.quant, source),
                                     str(source))

    def tensors(self) -> Iterator[NamedTensor]:
        """The 16/32-bit tensors: whole modules, and the biases of quantized ones (the loader gives
        each its layer), as saved: in the halves layout."""
        quantized = set(self.quantized_module_names())
        with self.open_files() as read:
            for module, parts in self.modules.items():
                for part in ("bias",) if module in quantized else ("weight", "bias"):
                    if part not in parts:
                        continue
                    key = f"{module}.{part}"
                    name = hf_to_meta_name(key)
                    if name is None:
                        raise CheckpointError(f"{parts[part]}: unexpected tensor {key!r} (not part of a LLaMA model)")
                    yield NamedTensor(name, read(parts[part], key), str(parts[part]))

    @contextmanager
    def open_files(self) -> Iterator[Callable[[Path, str], torch.Tensor]]:
        """A reader of tensors by file and key, the files open until the block ends."""
        with ExitStack() as stack:
            handles = {path: stack.enter_context(open_safetensors(path)) for path in self.files}
            yield lambda path, key: read_safetensors_tensor(handles[path], path, key)


def index_modules(files: list[Path]) -> dict[str, dict[str, Path]]:
    """Each module's tensors (part -> the file holding it) from the files' headers, in file order."""
    modules: dict[str, dict[str, Path]] = {}
    for path in files:
        with open_safetensors(path) as handle:
            for key in handle.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # a derived buffer some old exports saved
                m = MODULE_TENSOR.fullmatch(key)
                if m is None:
                    raise CheckpointError(f"{path}: unexpected tensor {key!r} (not part of a LLaMA model)")
                parts = modules.setdefault(m.group("module"), {})
                if m.group("part") in parts:
                    raise CheckpointError(f"{path}: tensor {key!r} appears twice (also in {parts[m.group('part')]})")
                parts[m.group("part")] = path
    for module, parts in modules.items():
        if "weight" not in parts:
            raise CheckpointError(f"{next(iter(parts.values()))}: {module} has {sorted(parts)} but no weight")
    return modules


def bnb_quant_config(qc: dict, path: Path, quantized_modules: list[str],
                     packed_blocksize: Callable[[str, str], int]) -> QuantConfig:
    """Our QuantConfig for a quantization_config; the 4-bit blocksize is the first layer's
    packed_blocksize(module, quant type), and every layer is checked against it when read."""
    if qc.get("llm_int8_has_fp16_weight"):
        raise CheckpointError(f"{path}: llm_int8_has_fp16_weight is true: the layers are stored in 16 bits, "
                              "not quantized (load the folder without its quantization_config)")
    if not quantized_modules:
        raise CheckpointError(f"{path}: a bitsandbytes quantization_config, but no layer holds quantized tensors")
    quantize_head = "lm_head" in quantized_modules
    threshold = float(qc.get("llm_int8_threshold", 6.0))
    if qc.get("load_in_8bit") and not qc.get("load_in_4bit"):
        return QuantConfig(mode="int8", int8_threshold=threshold, quantize_head=quantize_head)
    if not qc.get("load_in_4bit"):
        raise CheckpointError(f"{path}: quantization_config has neither load_in_8bit nor load_in_4bit set")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise CheckpointError(f"{path}: bnb_4bit_quant_storage is {storage!r}; 4-bit layers are read from uint8 storage")
    kind = qc.get("bnb_4bit_quant_type", "fp4")  # transformers' default when the key is absent
    if kind not in ("nf4", "fp4"):
        raise CheckpointError(f"{path}: bnb_4bit_quant_type is {kind!r}, expected 'nf4' or 'fp4'")
    return QuantConfig(mode=kind, double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
                       int8_threshold=threshold, blocksize=packed_blocksize(quantized_modules[0], kind),
                       quantize_head=quantize_head)


def checked_layer_tensors(tensors: dict[str, torch.Tensor], module: str, shape: tuple[int, ...], cfg: QuantConfig,
                          source: Path) -> dict[str, torch.Tensor]:
    """A layer's tensors as the loader builds layers from them, checked against the mode and the
    layer's shape (names, dtypes, shapes; the packed 4-bit state's settings)."""
    out_features, in_features = shape
    tensors = dict(tensors)
    if cfg.mode == "int8" and "weight_format" in tensors:
        layout = tensors.pop("weight_format")
        if layout.numel() != 1 or int(layout.item()) != ROW_MAJOR:
            raise CheckpointError(f"{source}: {module}.weight_format is {layout.tolist()}, expected {ROW_MAJOR} "
                                  "(row-major int8, as bitsandbytes saves it)")
    want = expected_quantized_tensors(out_features, in_features, cfg)
    if set(tensors) != set(want):
        raise CheckpointError(f"{source}: {module} has tensors {sorted(tensors)}, expected {sorted(want)} for a "
                              f"{out_features}x{in_features} {cfg.name} layer")
    for part, (want_shape, dtype) in want.items():
        t = tensors[part]
        if t.dtype != dtype or (want_shape is not None and tuple(t.shape) != want_shape):
            raise CheckpointError(f"{source}: {module}.{part} is {t.dtype} {list(t.shape)}, expected {dtype} "
                                  f"{list(want_shape) if want_shape else '[...]'} for a {out_features}x{in_features} "
                                  f"{cfg.name} layer")
    if cfg.is_4bit:
        problem = check_packed_quant_state(tensors, out_features, in_features, cfg)
        if problem:
            raise CheckpointError(f"{source}: {module}: {problem}")
    return tensors


# --- Writing ---------------------------------------------------------------------------------------

def bnb_quantization_config(cfg: QuantConfig, compute_dtype: torch.dtype) -> dict:
    """config.json's quantization_config for cfg, as transformers' BitsAndBytesConfig spells it."""
    dtype = str(compute_dtype).removeprefix("torch.")
    return {"quant_method": QUANT_METHOD, "load_in_8bit": cfg.mode == "int8", "load_in_4bit": cfg.is_4bit,
            "llm_int8_threshold": cfg.int8_threshold, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False,
            "bnb_4bit_quant_type": cfg.mode if cfg.is_4bit else "nf4",
            "bnb_4bit_use_double_quant": cfg.double_quant, "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_quant_storage": "uint8"}


def write_hf_bnb(checkpoint: Checkpoint, out_dir: str | Path, cfg: QuantConfig, dtype: str | torch.dtype | None = None,
                 force: bool = False, tokenizer_path: str | Path | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Quantize checkpoint (a 16/32-bit source) into a bitsandbytes Hugging Face folder out_dir; returns its path.

    dtype: of the embedding, norms and head, and of the weights before they are quantized, as
    transformers' `from_pretrained(dtype=...)` casts them (None: as the source holds them, which is
    what transformers' default dtype "auto" loads).
    The head stays 16-bit, as transformers and vLLM expect.
    """
    if not cfg.enabled:
        raise ValueError("quant 'none' quantizes nothing; choose int8, nf4, nf4-dq, fp4 or fp4-dq (or --format hf)")
    if cfg.quantize_head:
        raise ValueError("hf-bnb keeps the output head 16-bit, as transformers and vLLM load it; drop --quantize_head")
    return write_hf_folder(checkpoint, out_dir, "hf-bnb", resolve_dtype(dtype), force, tokenizer_path, shard_bytes,
                           quantize=lambda weight: bnb_layer_tensors(weight, cfg),
                           quantization_config=lambda written: bnb_quantization_config(cfg, written))


def bnb_layer_tensors(weight: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """A layer's tensors as transformers saves a bitsandbytes layer: int8 through float16 as
    bitsandbytes' Int8Params quantizes, plus weight_format; 4-bit as quantize_weight makes it, which
    is bitsandbytes' quantize_4bit of the weight in its own dtype, as Params4bit quantizes."""
    if cfg.mode == "int8":
        return {**quantize_int8_as_bitsandbytes(weight), "weight_format": torch.tensor(ROW_MAJOR, dtype=torch.uint8)}
    return quantize_weight(weight, cfg)
