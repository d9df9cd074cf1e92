"""Checkpoint stacks: a base checkpoint with overlays merged into it, tensor by tensor, before quantizing.

    Llama.build(ckpt_dir=["llama-2-7b", "my-finetune"])            # later folders replace tensors
    Llama.build(ckpt_dir=["llama-7b"], delta=["vicuna-7b-delta"])  # base + delta, Vicuna-style
    Llama.build(ckpt_dir=["llama-2-7b", "my-lora-adapter"])        # PEFT LoRA merged: W + scale * B @ A
    python example.py --ckpt_dir '[llama-2-7b,my-finetune]'        # or llama-2-7b,my-finetune
    python example.py --ckpt_dir llama-7b --delta vicuna-7b-delta
    python quantize_offline.py --ckpt_dir '[llama-2-7b,my-lora]' --out_dir merged-int8

The first folder is the base: a complete Meta or Hugging Face checkpoint. Every later folder is an
overlay applied in order, then the delta= folders in order. What an overlay does to each tensor it holds:

- override (the default): replaces the current tensor, as LLaMA2-Accessory's stacked checkpoints do.
- delta: is added to the current tensor (base + delta). Only when stated: the folder is passed in
  delta=, or it holds an `overlay.json` of {"kind": "delta"}; never guessed from the values.
  (`overlay.json` {"kind": "override"} states the default, and conflicts with delta=.)
- lora: a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors or .bin) merges
  W + scale * B @ A into each layer it targets, scale = lora_alpha / r, or lora_alpha / sqrt(r) with
  use_rslora, with rank_pattern/alpha_pattern honoured per module. Full tensors the adapter saved
  (modules_to_save) override. DoRA, LoRA biases, embedding LoRA and the like are refused. An adapter
  is merged as an adapter wherever it is listed, ckpt_dir or delta=.

An overlay may hold only some tensors, without a config: consolidated.*.pth shards (Meta names) or
*.safetensors (Hugging Face or Meta names); a folder without params.json/config.json takes the base's
configuration, and the last folder that has one sets rope and norm settings (its shapes must match).
Prefixes that training tools add (`base_model.model.`, `module.`, `_orig_mod.`, `llma.`, `model.`
before Meta names) are stripped; Hugging Face q/k rows (and LoRA deltas of q/k) are brought to Meta's
interleaved rotary layout. Pre-baked folders hold quantized layers and cannot be stacked.

Memory stays bounded: the base is streamed as the loader reads it, each overlay's names are indexed up
front from mmap'd shards or safetensors headers, and an overlay tensor is read only when its base
tensor passes; additions are computed in float32 and cast back to the base tensor's dtype. The loader
then quantizes the merged tensor, one layer at a time.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..model import ModelArgs, parameter_shapes
from .common import (Checkpoint, CheckpointError, NamedTensor, hf_to_meta_name, indexed_safetensors_files,
                     open_safetensors, read_json, read_safetensors_tensor, to_interleaved_layout)
from .detect import open_single_checkpoint
from .hf import hf_model_args
from .meta import load_meta_shard, merge_meta_shards, meta_model_args, numbered_meta_shards
from .prebaked import is_prebaked_folder
from .writing import refuse_unfinished_write

log = logging.getLogger(__name__)

MANIFEST_NAME = "overlay.json"
OVERLAY_KINDS = ("override", "delta")
ADAPTER_CONFIG = "adapter_config.json"
# Added by PEFT (base_model.model.), DDP/FSDP wrappers (module.), torch.compile (_orig_mod.),
# LLaMA2-Accessory (llma.) and wrappers that keep Meta's names under model.
STRIPPED_PREFIXES = ("base_model.model.", "module.", "_orig_mod.", "llma.", "model.")
DERIVED_SUFFIXES = ("rotary_emb.inv_freq", "rope.freqs")  # rotary tables some exports save; rebuilt here
# The fields that decide tensor shapes and the q/k layout: every folder of a stack must agree on them.
STRUCTURAL_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "hidden_dim",
                     "tie_word_embeddings", "n_experts", "experts_per_token")
# LoRA target module names, in Hugging Face's and Meta's terms.
LINEAR_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
                  "wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"}
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<half>[AB])(?:\.[^.]+)?\.weight")
# Adapter settings whose effect a merge W + scale * B @ A cannot express: (key, value meaning "unused").
UNMERGEABLE_LORA_SETTINGS = (("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False),
                             ("use_qalora", False), ("layer_replication", None), ("target_parameters", None),
                             ("alora_invocation_tokens", None), ("trainable_token_indices", None),
                             ("bias", "none"))


@dataclass(frozen=True)
class OverlayEntry:
    """One tensor an overlay changes: how to read it (already in Meta's layout) and what to do with it."""
    op: str  # "replace" | "add"
    read: Callable[[], torch.Tensor]
    source: str  # the file(s) it comes from, for error messages


@dataclass
class Overlay:
    folder: Path
    kind: str  # "override" | "delta" | "lora"
    entries: dict[str, OverlayEntry]  # by Meta parameter name

    def record(self) -> dict:
        return {"path": str(self.folder.resolve()), "kind": self.kind}


class CheckpointStack(Checkpoint):
    """A base checkpoint and the overlays merged into its tensors as they stream past; its
    configuration is the base's, or the last overlay's that has one."""

    def __init__(self, base: Checkpoint, overlays: list[Overlay], args: ModelArgs):
        self.base, self.overlays, self.args = base, overlays, args
        self.format, self.location = base.format, base.location

    def tensors(self) -> Iterator[NamedTensor]:
        changes: dict[str, list[OverlayEntry]] = {}
        for overlay in self.overlays:
            for name, entry in overlay.entries.items():
                changes.setdefault(name, []).append(entry)
        for item in self.base.tensors():
            entries = changes.get(item.name)
            yield merge_tensor(item, entries) if entries else item
            del item  # a replaced or merged base tensor is freed before the next one is read

    def record(self) -> dict:
        """The base, and every folder of the stack in the order they are applied."""
        base = {**self.base.record(), "kind": "base"}
        return {**self.base.record(), "stack": [base] + [o.record() for o in self.overlays]}

    def paths(self) -> list[Path]:
        return [*self.base.paths(), *(o.folder for o in self.overlays)]


def merge_tensor(item: NamedTensor, entries: list[OverlayEntry]) -> NamedTensor:
    """Apply entries in order to item: a replacement takes its place, additions accumulate in float32
    and the sum is cast back to the dtype of the tensor they were added to."""
    tensor, dtype, sources = item.tensor, item.tensor.dtype, [item.source]
    accumulating = False  # whether tensor is our own float32 sum, safe to add into in place
    for entry in entries:
        value = entry.read()
        if value.shape != tensor.shape:
            raise CheckpointError(f"{item.name}: {entry.source} gives shape {tuple(value.shape)}, but "
                                  f"{' + '.join(sources)} has shape {tuple(tensor.shape)}")
        if entry.op == "replace":
            tensor, dtype, sources, accumulating = value, value.dtype, [entry.source], False
        elif accumulating:
            tensor.add_(value)
            sources.append(entry.source)
        else:
            tensor = tensor.float() + value.float()  # a new tensor: never in place on a (mmap'd) source
            sources.append(entry.source)
            accumulating = True
    return NamedTensor(item.name, tensor.to(dtype), " + ".join(sources))


# --- Opening a stack -------------------------------------------------------------------------------

def as_folder_list(value: str | Path | Sequence[str | Path] | None, argument: str) -> list[Path]:
    """Folders from a path, a sequence of paths, or a string "a,b" / "[a,b]" naming no existing path
    (as a command line passes --ckpt_dir '[dir/a,dir/b]')."""
    if value is None:
        return []
    if isinstance(value, str) and not Path(value).exists() and "," in value:
        return [Path(v.strip()) for v in value.strip().removeprefix("[").removesuffix("]").split(",") if v.strip()]
    if isinstance(value, (str, Path)):
        return [Path(value)]
    if not all(isinstance(v, (str, Path)) for v in value):
        raise ValueError(f"{argument}: expected folder paths, got {list(value)!r}")
    return [Path(v) for v in value]


def open_checkpoint(ckpt_dir: str | Path | Sequence[str | Path],
                    delta: str | Path | Sequence[str | Path] | None = None, verify: bool = True) -> Checkpoint:
    """The checkpoint at ckpt_dir: one folder or .gguf file of any format, or a stack (several paths,
    or "a,b" / "[a,b]"): the first folder with the later folders and then the delta folders merged
    into it in order. verify: check a pre-baked folder's shard checksums (which reads it once).

    Raises CheckpointError naming the folder, file or key when something cannot be read or stacked.
    """
    folders, deltas = as_folder_list(ckpt_dir, "ckpt_dir"), as_folder_list(delta, "delta")
    if not folders:
        raise CheckpointError(f"delta {[str(d) for d in deltas]} given without a base checkpoint: pass the "
                              "base folder first in ckpt_dir" if deltas else "ckpt_dir: no checkpoint folder given")
    base_folder, overlay_folders = folders[0], folders[1:]
    check_base_folder(base_folder)
    if not overlay_folders and not deltas:
        return open_single_checkpoint(base_folder, verify)
    base = open_single_checkpoint(base_folder, verify)
    if base.format not in ("meta", "hf"):
        raise CheckpointError(f"{base_folder}: a {base.format} checkpoint holds quantized layers and cannot be the "
                              "base of a stack; stack the 16-bit Meta or Hugging Face checkpoints (and quantize the "
                              "result with quantize_offline.py)")
    args, params = base.args, parameter_shapes(base.args)
    overlays = []
    for folder, forced_delta in [(f, False) for f in overlay_folders] + [(f, True) for f in deltas]:
        overlay, folder_args = open_overlay(folder, base.args, params, forced_delta)
        if folder_args is not None:
            args = settings_from(folder_args, args, folder)
        overlays.append(overlay)
        log.info("Stacking %s onto %s: %s, %d tensors", folder, base_folder, overlay.kind, len(overlay.entries))
    return CheckpointStack(base, overlays, args)


def check_base_folder(folder: Path) -> None:
    """A delta or an adapter cannot come first: there would be nothing to add it to."""
    if (folder / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"{folder}: a LoRA adapter needs a base checkpoint before it in ckpt_dir")
    if folder.is_dir() and overlay_manifest_kind(folder) == "delta":
        raise CheckpointError(f"{folder}: {MANIFEST_NAME} marks this folder a delta, which needs a base checkpoint "
                              "before it in ckpt_dir")


def settings_from(folder_args: ModelArgs, args: ModelArgs, folder: Path) -> ModelArgs:
    """folder_args, which must have args' shapes: a later folder's own config wins, as its tensors do."""
    clash = [f"{k}={getattr(folder_args, k)!r} (base: {getattr(args, k)!r})" for k in STRUCTURAL_FIELDS
             if getattr(folder_args, k) != getattr(args, k)]
    if clash:
        raise CheckpointError(f"{folder}: its configuration does not match the base checkpoint's: {', '.join(clash)}")
    changed = [f.name for f in fields(ModelArgs) if getattr(folder_args, f.name) != getattr(args, f.name)]
    if changed:
        log.warning("%s: its configuration changes %s; the stack uses it", folder, changed)
    return folder_args


# --- Overlay folders -------------------------------------------------------------------------------

def overlay_manifest_kind(folder: Path) -> str | None:
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    data = read_json(path)
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in OVERLAY_KINDS:
        raise CheckpointError(f"{path}: expected {{\"kind\": \"override\"}} or {{\"kind\": \"delta\"}}, got {data!r}")
    return kind


def open_overlay(folder: Path, base: ModelArgs, params: dict[str, tuple[int, ...]], forced_delta: bool
                 ) -> tuple[Overlay, ModelArgs | None]:
    """Index an overlay folder's tensors by Meta name; also returns its own config, when it has one."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: overlay folder does not exist" + (
            "; GGUF files hold quantized layers and cannot be stacked" if folder.suffix == ".gguf" else ""))
    refuse_unfinished_write(folder, CheckpointError)
    if is_prebaked_folder(folder):
        raise CheckpointError(f"{folder}: a pre-baked folder holds quantized layers and cannot be stacked; "
                              "stack the 16-bit checkpoints and quantize the result with quantize_offline.py")
    if (folder / ADAPTER_CONFIG).exists():
        return Overlay(folder, "lora", lora_entries(folder, base, params)), None
    kind = overlay_manifest_kind(folder)
    if forced_delta and kind == "override":
        raise CheckpointError(f"{folder}: passed as a delta, but its {MANIFEST_NAME} says \"override\"")
    kind = "delta" if forced_delta else kind or "override"
    op = "add" if kind == "delta" else "replace"
    return Overlay(folder, kind, tensor_entries(folder, base, params, op)), folder_model_args(folder)


def folder_model_args(folder: Path) -> ModelArgs | None:
    if (folder / "params.json").exists():
        return meta_model_args(folder)
    if (folder / "config.json").exists():
        return hf_model_args(folder)
    return None


@dataclass(frozen=True)
class TensorFile:
    """A file's tensors, read on demand: a mmap'd torch.load dict, or an open safetensors handle."""
    path: Path
    keys: list[str]
    read: Callable[[str], torch.Tensor]


def open_tensor_file(path: Path) -> TensorFile:
    if path.suffix == ".safetensors":
        handle = open_safetensors(path)  # kept open by the closure below until the stack is dropped
        return TensorFile(path, list(handle.keys()), lambda key: read_safetensors_tensor(handle, path, key))
    state = load_meta_shard(path)  # mmap: nothing is read until a tensor is used
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors (a state dict)")
    return TensorFile(path, list(state), state.__getitem__)


def overlay_tensor_files(folder: Path) -> list[Path]:
    pth = numbered_meta_shards(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        safetensors = indexed_safetensors_files(index)
    else:
        safetensors = sorted(folder.glob("*.safetensors"))
    if pth and safetensors:
        raise CheckpointError(f"{folder}: holds both consolidated.*.pth and *.safetensors; keep one format per "
                              "overlay folder")
    if not pth and not safetensors:
        raise CheckpointError(f"{folder}: no consolidated.*.pth, *.safetensors or {ADAPTER_CONFIG} to overlay")
    return pth or safetensors


def resolve_name(key: str, params: dict[str, tuple[int, ...]]) -> tuple[str, bool] | None:
    """The Meta parameter name key stands for, and whether its q/k rows are in Hugging Face's layout;
    None when it names no parameter of the model, with or without the training tools' prefixes."""
    while True:
        hf_name = hf_to_meta_name(key)
        if hf_name in params:
            return hf_name, True
        if key in params:
            return key, False
        prefix = next((p for p in STRIPPED_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            return None
        key = key.removeprefix(prefix)


def to_meta_layout(name: str, t: torch.Tensor, hf_layout: bool, args: ModelArgs) -> torch.Tensor:
    """Rows of a q/k weight or bias, or a q/k norm (or a delta of one), from Hugging Face's half-split
    rotary layout to Meta's."""
    return to_interleaved_layout(name, t, args) if hf_layout else t


def tensor_entries(folder: Path, args: ModelArgs, params: dict[str, tuple[int, ...]], op: str
                   ) -> dict[str, OverlayEntry]:
    """Entries for a folder of Meta shards (merged as model parallelism split them) or safetensors files."""
    files = [open_tensor_file(p) for p in overlay_tensor_files(folder)]
    if files[0].path.suffix == ".pth":
        check_same_keys(files)
        groups = [files]  # every shard holds a piece of every tensor
    else:
        groups = [[f] for f in files]
    entries: dict[str, OverlayEntry] = {}
    unmatched: list[str] = []
    for group in groups:
        source = str(group[0].path) if len(group) == 1 else f"{folder}/consolidated.*.pth ({len(group)} shards)"
        for key in group[0].keys:
            if key.endswith(DERIVED_SUFFIXES):
                continue
            resolved = resolve_name(key, params)
            if resolved is None:
                unmatched.append(key)
                continue
            name, hf_layout = resolved
            if name in entries:
                raise CheckpointError(f"{source}: {key!r} gives {name!r}, which {entries[name].source} gives too")
            entries[name] = OverlayEntry(op, shard_reader(group, key, name, hf_layout, args), source)
    if unmatched:
        raise CheckpointError(f"{folder}: {len(unmatched)} tensors match no parameter of the base model: "
                              f"{unmatched[:8]}" + (" ..." if len(unmatched) > 8 else ""))
    return entries


def check_same_keys(files: list[TensorFile]) -> None:
    for f in files[1:]:
        if set(f.keys) != set(files[0].keys):
            raise CheckpointError(f"{f.path}: keys differ from {files[0].path.name}: "
                                  f"{sorted(set(f.keys) ^ set(files[0].keys))[:8]}")


def shard_reader(group: list[TensorFile], key: str, name: str, hf_layout: bool, args: ModelArgs
                 ) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        merged = merge_meta_shards(name, [f.read(key) for f in group], args)
        return to_meta_layout(name, merged, hf_layout, args)

    return read


# --- PEFT LoRA adapters ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def scale(self, module: str, rank: int, path: Path) -> float:
        """lora_alpha / r (or / sqrt(r) with rsLoRA), with the per-module patterns PEFT applies."""
        want = self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)
        if rank != want:
            raise CheckpointError(f"{path}: {module} has rank {rank}, but {ADAPTER_CONFIG} says r={want}")
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def pattern_key(patterns: dict, module: str) -> str:
    """The first pattern that matches module's name or a dotted suffix of it, as PEFT matches them."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), module)


def read_lora_config(folder: Path) -> LoraConfig:
    path = folder / ADAPTER_CONFIG
    cfg = read_json(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters can be merged")
    for key, unused in UNMERGEABLE_LORA_SETTINGS:
        if cfg.get(key) not in (None, False, [], {}, unused):
            raise CheckpointError(f"{path}: {key}={cfg[key]!r} cannot be merged as W + scale * B @ A "
                                  f"(supported: {key}={unused!r})")
    check_target_modules(cfg.get("target_modules"), path)
    return LoraConfig(lora_rank(required_setting(cfg, "r", path), f"{path}: r"),
                      lora_alpha(required_setting(cfg, "lora_alpha", path), f"{path}: lora_alpha"),
                      flag_setting(cfg, "use_rslora", path),
                      pattern_setting(cfg, "rank_pattern", path, lora_rank),
                      pattern_setting(cfg, "alpha_pattern", path, lora_alpha))


def check_target_modules(targets: Any, path: Path) -> None:
    """A list of module names must name linear layers; a string is a regular expression, which the
    adapter's tensors are checked against instead."""
    if not isinstance(targets, list):
        return
    if not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{path}: target_modules must list module names (strings), got {targets!r}")
    unknown = sorted(t for t in targets if t.split(".")[-1] not in LINEAR_MODULES)
    if unknown:
        raise CheckpointError(f"{path}: target_modules {unknown} are not linear layers of a LLaMA model "
                              f"(known: {sorted(LINEAR_MODULES)})")


def required_setting(cfg: dict, key: str, path: Path) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{path}: missing required key {key!r}")
    return cfg[key]


def lora_rank(value: Any, where: str) -> int:
    """A LoRA rank: an integer >= 1 (the scale divides by it; a bool or float is no rank PEFT writes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where} must be an integer >= 1, got {value!r}")
    return value


def lora_alpha(value: Any, where: str) -> float:
    """A LoRA alpha: a finite number (Python's JSON reads NaN and Infinity, which would spread
    through every merged weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def flag_setting(cfg: dict, key: str, path: Path) -> bool:
    """A true/false setting, False when absent (a string such as "false" would read as true)."""
    value = cfg.get(key, False)
    if not isinstance(value, bool):
        raise CheckpointError(f"{path}: {key} must be true or false, got {value!r}")
    return value


def pattern_setting(cfg: dict, key: str, path: Path, check: Callable[[Any, str], Any]) -> dict[str, Any]:
    """rank_pattern or alpha_pattern: an object of module-name regular expressions (as PEFT matches
    them, see pattern_key) to values that check accepts; {} when absent."""
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{path}: {key} must be an object of module pattern -> value, "
                              f"got {type(patterns).__name__}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise CheckpointError(f"{path}: {key} key {pattern!r} is not a regular expression ({e})") from e
    return {pattern: check(value, f"{path}: {key}[{pattern!r}]") for pattern, value in patterns.items()}


def adapter_weights_file(folder: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} but neither adapter_model.safetensors nor adapter_model.bin")


def lora_entries(folder: Path, args: ModelArgs, params: dict[str, tuple[int, ...]]) -> dict[str, OverlayEntry]:
    """An "add" entry of scale * B @ A per targeted layer, and a "replace" entry per full tensor saved."""
    config = read_lora_config(folder)
    file = open_tensor_file(adapter_weights_file(folder))
    halves: dict[str, dict[str, str]] = {}  # module name (without PEFT's prefix) -> {"A": key, "B": key}
    entries: dict[str, OverlayEntry] = {}
    unmatched: list[str] = []
    for key in file.keys:
        m = LORA_KEY.fullmatch(key)
        if m:
            module = m.group("module").removeprefix("base_model.model.")
            halves.setdefault(module, {})[m.group("half")] = key
        elif "lora_" in key:
            raise CheckpointError(f"{file.path}: {key!r} is not a LoRA A/B weight of a linear layer "
                                  "(embedding LoRA, DoRA or LoRA biases cannot be merged here)")
        elif (resolved := resolve_name(key, params)) is not None:  # modules_to_save: whole tensors
            name, hf_layout = resolved
            entries[name] = OverlayEntry("replace", shard_reader([file], key, name, hf_layout, args), str(file.path))
        elif not key.endswith(DERIVED_SUFFIXES):
            unmatched.append(key)
    for module, pair in halves.items():
        resolved = resolve_name(f"{module}.weight", params)
        if resolved is None:
            unmatched.append(module)
            continue
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{file.path}: {module} has lora_{''.join(pair)} but not its other half")
        name, hf_layout = resolved
        if name in entries:
            raise CheckpointError(f"{file.path}: {module} is both saved whole and adapted by LoRA")
        scale = config.scale(module, file_tensor_rank(file, pair), file.path)
        entries[name] = OverlayEntry("add", lora_reader(file, pair, name, hf_layout, scale, args), str(file.path))
    if unmatched:
        raise CheckpointError(f"{file.path}: the adapter targets modules that do not exist in the base model: "
                              f"{unmatched[:8]}" + (" ..." if len(unmatched) > 8 else ""))
    return entries


def file_tensor_rank(file: TensorFile, pair: dict[str, str]) -> int:
    a, b = file.read(pair["A"]), file.read(pair["B"])  # small: r x in and out x r
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise CheckpointError(f"{file.path}: {pair['A']} {tuple(a.shape)} and {pair['B']} {tuple(b.shape)} "
                              "are not the two factors of a LoRA update")
    return a.shape[0]


def lora_reader(file: TensorFile, pair: dict[str, str], name: str, hf_layout: bool, scale: float, args: ModelArgs
                ) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        a, b = file.read(pair["A"]).float(), file.read(pair["B"]).float()  # [r, in], [out, r]
        # Permuting the rows of B permutes the rows of B @ A: cheaper than permuting the product.
        return (to_meta_layout(name, b, hf_layout, args) @ a).mul_(scale)  # [out, in]

    return read
