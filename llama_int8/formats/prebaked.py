"""Pre-baked folders: a checkpoint quantized once, offline, and later loaded without re-quantizing.

A folder holds:
    manifest.json                format name and version, quant settings, model config, source
                                 checkpoint, tool versions, every shard with its size and SHA-256, and
                                 every tensor with its shard, dtype, shape
    quantized-00001.safetensors  quantized linear layers under bitsandbytes' state-dict names
    ...                          (layers.0.attention.wq.weight, layers.0.attention.wq.SCB, ...), and the
                                 embedding, norms and head (unless quantized) in the source's dtype
    tokenizer files              copied from the source checkpoint
    written_by_llama_int8.json   the marker every folder this project writes holds (formats/writing.py)

The folder is written through formats/writing.py: into a temporary folder renamed into place only
when complete, never over a folder this project did not write. The reader checks the manifest
against the model configuration, the shards' headers and (unless told not to) their checksums,
which refuse a shard changed or swapped after writing, even for one of the same shapes; it returns each
quantized layer's saved tensors; the loader builds layers from them with the function that builds
layers quantized at load time, so both give bit-identical outputs and no 16-bit copy of a quantized
layer is ever made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model import ModelArgs, parameter_shapes
from ..quantize import (BITSANDBYTES_VERSION, NonFiniteWeightError, QuantConfig, check_packed_quant_state,
                        expected_quantized_tensors, quantize_weight, quantized_layer_names)
from ..tokenizer import find_tokenizer_file
from ..version import __version__
from .common import (Checkpoint, CheckpointError, NamedTensor, QuantizedLayer, check_finite, checked_tensors,
                     file_inside, open_safetensors, read_json, read_safetensors_tensor)
from .model_config import model_args_from
from .writing import new_folder

log = logging.getLogger(__name__)

FORMAT = "llama_int8-prebaked"
FORMAT_VERSION = 2  # 2: a size and SHA-256 per shard
MANIFEST_NAME = "manifest.json"
KIND = "prebaked"  # the kind named in the folder's writing marker
SHARD_PREFIX = "quantized-"
SHARD_BYTES = 2 * 1024**3
HASH_CHUNK = 1 << 22  # bytes read per step while checksumming a shard
# Files that travel with a tokenizer (Hugging Face's read BOS/EOS and stop ids from the configs).
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                        "chat_template.jinja", "config.json")


@dataclass(frozen=True)
class TensorEntry:
    shard: str
    dtype: str  # torch's name without the prefix: "int8", "bfloat16", ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardRecord:
    bytes: int
    sha256: str


@dataclass
class Manifest:
    folder: Path
    quant: QuantConfig
    args: ModelArgs
    tensors: dict[str, TensorEntry]
    shard_records: dict[str, ShardRecord]
    source: dict
    tool: dict

    @property
    def shards(self) -> list[str]:
        return sorted({e.shard for e in self.tensors.values()})

    def quantized_layers(self) -> list[str]:
        return quantized_layer_names(self.args.n_layers, self.quant.quantize_head, self.args.n_experts)


def is_prebaked_folder(folder: Path) -> bool:
    """A manifest, or shards named like ours (a folder whose manifest went missing)."""
    return (folder / MANIFEST_NAME).exists() or any(folder.glob(f"{SHARD_PREFIX}*.safetensors"))


def is_prebaked_manifest_folder(folder: Path) -> bool:
    """Whether folder's manifest says it is pre-baked, whatever its version: what folders written
    before writing markers existed (version 1) are recognised by."""
    try:
        return json.loads((folder / MANIFEST_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class PrebakedCheckpoint(Checkpoint):
    """A pre-baked folder: its quantized layers as bitsandbytes' tensors, then its 16-bit tensors.
    verify: check every shard's checksum against the manifest (reads each shard once)."""

    format = "prebaked"

    def __init__(self, folder: Path, verify: bool = True):
        self.manifest = read_manifest(folder, verify)
        self.location, self.args, self.quant = folder, self.manifest.args, self.manifest.quant

    def quantized_layers(self) -> Iterator[QuantizedLayer]:
        m = self.manifest
        shapes = layer_shapes(m.args)
        by_layer = tensors_by_layer(m)
        with self.open_shards() as read:
            for layer in m.quantized_layers():
                shard = m.folder / m.tensors[f"{layer}.weight"].shard
                tensors = {name.removeprefix(f"{layer}."): read(name).tensor for name in by_layer[layer]}
                cfg = m.quant.layer_config(layer)
                if cfg.is_4bit:
                    # The packed state is JSON the manifest can only list, not describe: check it here,
                    # where a mismatch would otherwise dequantize to wrong weights without an error.
                    problem = check_packed_quant_state(tensors, *shapes[f"{layer}.weight"], cfg)
                    if problem:
                        raise CheckpointError(f"{shard}: layer {layer}: {problem}")
                yield QuantizedLayer(layer, tensors, str(shard))

    def tensors(self) -> Iterator[NamedTensor]:
        with self.open_shards() as read:
            for name in tensors_by_layer(self.manifest).get(None, []):
                yield read(name)

    @contextmanager
    def open_shards(self) -> Iterator[Callable[[str], NamedTensor]]:
        """A reader of the manifest's tensors by name, its shards open until the block ends."""
        m = self.manifest
        with ExitStack() as stack:
            handles = {s: stack.enter_context(open_safetensors(m.folder / s)) for s in m.shards}

            def read(name: str) -> NamedTensor:
                file = m.folder / m.tensors[name].shard
                return NamedTensor(name, read_safetensors_tensor(handles[file.name], file, name), str(file))

            yield read


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- Writing ---------------------------------------------------------------------------------------

class ShardWriter:
    """Collects tensors and writes them as safetensors shards of about shard_bytes each."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.table: dict[str, TensorEntry] = {}
        self.records: dict[str, ShardRecord] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        shard = f"{SHARD_PREFIX}{len(self.records) + 1:05d}.safetensors"
        save_file(self.pending, self.folder / shard, metadata={"format": "pt"})
        self.records[shard] = shard_record(self.folder / shard)
        for name, t in self.pending.items():
            self.table[name] = TensorEntry(shard, dtype_name(t.dtype), tuple(t.shape))
        self.pending, self.pending_bytes = {}, 0


def shard_record(path: Path) -> ShardRecord:
    """The file's size and SHA-256, read a few MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return ShardRecord(path.stat().st_size, digest.hexdigest())


def write_prebaked(checkpoint: Checkpoint, out_dir: str | Path, cfg: QuantConfig, force: bool = False,
                   tokenizer_path: str | Path | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Quantize checkpoint tensor by tensor into a new pre-baked folder out_dir; returns its path.

    Written through formats/writing.new_folder: an existing out_dir is refused (FileExistsError)
    unless force and it is a folder this project wrote, which is then replaced only after success;
    an out_dir that is, contains or lies inside the source is refused (ValueError).
    """
    out = Path(out_dir)
    if checkpoint.quant is not None:
        raise ValueError(f"{checkpoint.location} is already pre-baked or quantized ({checkpoint.quant.name})")
    if not cfg.enabled:
        raise ValueError("quant 'none' leaves nothing to pre-bake; choose int8, nf4, nf4-dq, fp4 or fp4-dq")
    from_gguf = checkpoint.format == "gguf" and tokenizer_path is None  # the tokenizer is inside the file
    tokenizer = checkpoint.location if from_gguf else find_tokenizer_file(checkpoint.folder, tokenizer_path)
    start = time.perf_counter()
    with new_folder(out, KIND, [*checkpoint.paths(), tokenizer], force, also_ours=is_prebaked_manifest_folder) as tmp:
        writer = write_quantized_shards(checkpoint, cfg, tmp, shard_bytes)
        if from_gguf:
            checkpoint.tokenizer().save(tmp)  # tokenizer.json + tokenizer_config.json for HFTokenizer
        else:
            copy_tokenizer(tokenizer, tmp)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "quant": cfg.to_dict(),
            "model": asdict(checkpoint.args),
            "source": {**checkpoint.record(), "tokenizer": str(tokenizer.resolve())},
            "tool": {"name": "llama_int8", "version": __version__, "bitsandbytes": BITSANDBYTES_VERSION,
                     "torch": torch.__version__},
            "shards": {name: asdict(r) for name, r in writer.records.items()},
            "tensors": {name: {"shard": e.shard, "dtype": e.dtype, "shape": list(e.shape)}
                        for name, e in writer.table.items()},
        }
        (tmp / MANIFEST_NAME).write_text(manifest_json(manifest))
    log.info("Wrote %s (%s) in %.1f s", out, cfg.name, time.perf_counter() - start)
    return out


def write_quantized_shards(checkpoint: Checkpoint, cfg: QuantConfig, folder: Path, shard_bytes: int) -> ShardWriter:
    """Stream the checkpoint through the loader's checks, quantizing the layers cfg names; a weight
    holding NaN or infinite values is refused by name (the quantizer's scales show it, the other
    tensors are summed)."""
    args = checkpoint.args
    layers = {f"{path}.weight": path
              for path in quantized_layer_names(args.n_layers, cfg.quantize_head, args.n_experts)}
    writer = ShardWriter(folder, shard_bytes)
    tied = frozenset({"output.weight"}) if checkpoint.args.tie_word_embeddings else frozenset()
    if tied and cfg.quantize_head:  # one table: the embedding's weight is stored once, as the quantized head
        layers["tok_embeddings.weight"] = layers.pop("output.weight")
    for item in checked_tensors(checkpoint.tensors(), parameter_shapes(checkpoint.args), ignored=tied):
        if item.name in layers:
            module_path = layers[item.name]
            try:
                tensors = quantize_weight(item.tensor, cfg.layer_config(module_path))
            except NonFiniteWeightError as e:
                raise CheckpointError(f"{item.source}: tensor {item.name!r} {e}") from e
            for key, value in tensors.items():
                writer.add(f"{module_path}.{key}", value)
        else:
            check_finite(item.tensor, item.name, item.source)
            writer.add(item.name, item.tensor)
        del item
    writer.flush()
    return writer


def manifest_json(manifest: dict) -> str:
    """The manifest as JSON, indented, with one line per tensor."""
    head = json.dumps({k: v for k, v in manifest.items() if k != "tensors"}, indent=1)
    rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in manifest["tensors"].items())
    return head.removesuffix("\n}") + ',\n "tensors": {\n' + rows + "\n }\n}\n"


def copy_tokenizer(tokenizer: Path, folder: Path) -> None:
    shutil.copy2(tokenizer, folder / tokenizer.name)
    if tokenizer.suffix == ".json":
        for name in TOKENIZER_COMPANIONS:
            if (tokenizer.parent / name).is_file():
                shutil.copy2(tokenizer.parent / name, folder / name)


# --- Reading ---------------------------------------------------------------------------------------

def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """The manifest of a pre-baked folder, checked against itself, against the shards' headers and,
    with verify, against the shards' checksums.

    Raises CheckpointError when the manifest is missing, of another format or version, names a file
    outside the folder, or disagrees with the shards.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.exists():
        raise CheckpointError(f"{folder}: pre-baked shards without {MANIFEST_NAME}: the folder is incomplete; "
                              "quantize it again with quantize_offline.py")
    data = read_json(path)
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a llama_int8 pre-baked manifest (format {data.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {data.get('format_version')!r}, but this llama_int8 "
                              f"reads version {FORMAT_VERSION}; quantize the source again with quantize_offline.py")
    try:
        quant = QuantConfig.from_dict(data["quant"])
        unknown = sorted(set(data["model"]) - {f.name for f in fields(ModelArgs)})
        if unknown:
            raise ValueError(f"unknown model keys {unknown}")
        tensors = {name: TensorEntry(e["shard"], e["dtype"], tuple(e["shape"])) for name, e in data["tensors"].items()}
        records = {name: ShardRecord(int(r["bytes"]), str(r["sha256"])) for name, r in data["shards"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e
    if not quant.enabled:
        raise CheckpointError(f"{path}: quant mode 'none' in a pre-baked manifest")
    args = model_args_from(path, {name: (f"model.{name}", value) for name, value in data["model"].items()})
    manifest = Manifest(folder, quant, args, tensors, records, data.get("source", {}), data.get("tool", {}))
    check_manifest_against_config(manifest, path)
    check_shard_list(manifest, path)
    check_shards_against_manifest(manifest, path)
    if verify:
        verify_shard_checksums(manifest, path)
    return manifest


def check_shard_list(manifest: Manifest, path: Path) -> None:
    """The shards the tensors name are the shards with a checksum, each a file inside the folder."""
    for shard in manifest.shard_records:
        file_inside(manifest.folder, shard, path)
    unrecorded = sorted(set(manifest.shards) ^ set(manifest.shard_records))
    if unrecorded:
        raise CheckpointError(f"{path}: shards {unrecorded} are not both in \"shards\" (with a checksum) and "
                              "named by a tensor")


def verify_shard_checksums(manifest: Manifest, path: Path) -> None:
    """Each shard's size and SHA-256 are the ones recorded when it was written."""
    for shard, want in manifest.shard_records.items():
        file = manifest.folder / shard
        got = shard_record(file) if file.stat().st_size == want.bytes else ShardRecord(file.stat().st_size, "")
        if got != want:
            what = (f"is {got.bytes} bytes, {path.name} recorded {want.bytes}" if got.bytes != want.bytes else
                    f"has SHA-256 {got.sha256[:16]}..., {path.name} recorded {want.sha256[:16]}...")
            raise CheckpointError(f"{file}: {what}: the shard was changed or replaced since the folder was written "
                                  "(by a shard of another bake?); quantize the source again with quantize_offline.py")


def check_manifest_against_config(manifest: Manifest, path: Path) -> None:
    """Every quantized layer the config implies is listed with the tensors and shapes its mode makes,
    and every other tensor is a parameter of the model with the configuration's shape."""
    shapes = layer_shapes(manifest.args)
    by_layer = tensors_by_layer(manifest)
    for layer in manifest.quantized_layers():
        out_features, in_features = shapes[f"{layer}.weight"]
        want = expected_quantized_tensors(out_features, in_features, manifest.quant.layer_config(layer))
        listed = {k.removeprefix(f"{layer}."): manifest.tensors[k] for k in by_layer.get(layer, [])}
        if set(listed) != set(want):
            raise CheckpointError(f"{path}: {layer} should have tensors {sorted(want)} for {manifest.quant.name}, "
                                  f"the manifest lists {sorted(listed)}")
        for key, (shape, dtype) in want.items():
            entry = listed[key]
            if entry.dtype != dtype_name(dtype) or (shape is not None and entry.shape != shape):
                raise CheckpointError(f"{path}: {layer}.{key} is {entry.dtype} {list(entry.shape)}, expected "
                                      f"{dtype_name(dtype)} {list(shape) if shape else '[...]'} for a "
                                      f"{out_features}x{in_features} {manifest.quant.name} layer")
    for name in by_layer.get(None, []):
        entry = manifest.tensors[name]
        if name not in shapes:
            raise CheckpointError(f"{path}: lists {name!r}, which is not a 16-bit parameter of this model "
                                  f"with {manifest.quant.name} layers")
        if entry.shape != shapes[name]:
            raise CheckpointError(f"{path}: {name!r} has shape {list(entry.shape)}, expected "
                                  f"{list(shapes[name])} from the model configuration")


def layer_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The model's parameter shapes, a tied head's included: a quantized tied head is stored as the head."""
    return {**parameter_shapes(args), "output.weight": (args.vocab_size, args.dim)}


def tensors_by_layer(manifest: Manifest) -> dict[str | None, list[str]]:
    """The manifest's tensor names grouped by the quantized layer they belong to (None: 16-bit ones)."""
    layers = set(manifest.quantized_layers())
    groups: dict[str | None, list[str]] = {}
    for name in manifest.tensors:
        parts = name.split(".")
        # A bias is no part of a quantized layer's state: it stays 16-bit, and the loader gives it to the layer.
        owner = None if name.endswith(".bias") else next(
            (p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if p in layers), None)
        groups.setdefault(owner, []).append(name)
    return groups


def check_shards_against_manifest(manifest: Manifest, path: Path) -> None:
    """The shards exist, are whole, and hold exactly the manifest's tensors with its dtypes and shapes."""
    for shard in manifest.shards:
        file = manifest.folder / shard
        if not file.is_file():
            raise CheckpointError(f"{path}: lists shard {shard}, which does not exist")
        listed = {name: e for name, e in manifest.tensors.items() if e.shard == shard}
        with open_safetensors(file) as handle:
            held = set(handle.keys())
            if held != set(listed):
                diff = sorted(held ^ set(listed))
                raise CheckpointError(f"{file}: its tensors differ from the manifest's list: {diff[:8]}")
            for name, entry in listed.items():
                meta = handle.get_slice(name)
                dtype = safetensors_dtype_name(meta.get_dtype())
                if dtype != entry.dtype or tuple(meta.get_shape()) != entry.shape:
                    raise CheckpointError(f"{file}: tensor {name!r} is {dtype} {meta.get_shape()}, the manifest "
                                          f"says {entry.dtype} {list(entry.shape)}")
    extra = sorted(p.name for p in manifest.folder.glob(f"{SHARD_PREFIX}*.safetensors")
                   if p.name not in set(manifest.shards))
    if extra:
        raise CheckpointError(f"{path}: shards {extra} are not in the manifest")


SAFETENSORS_DTYPES = {"I8": "int8", "U8": "uint8", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I32": "int32", "I64": "int64", "F64": "float64", "BOOL": "bool"}


def safetensors_dtype_name(code: str) -> str:
    return SAFETENSORS_DTYPES.get(code, code)
