"""What every writer of a Hugging Face-style folder shares (formats hf, hf-bnb, compressed-tensors):
the output folder, the tokenizer files and generation_config.json beside the weights, and the
checks on the source.

`new_folder` makes the output: a temporary folder beside out_dir, renamed into place when complete;
an existing out_dir is replaced only with force, and only when it is a folder of the same kind this
project wrote. The project's shared writer (formats/writing.py) provides it once it lands; until
then the stand-in below keeps the same signature, marker file and rules, so that switching is the
import alone.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..tokenizer import Tokenizer, find_tokenizer_file
from ..version import __version__
from .common import Checkpoint
from .prebaked import make_readable, replace_folder

log = logging.getLogger(__name__)

MARKER_NAME = "written_by_llama_int8.json"  # formats/writing.py's marker: who wrote the folder, what kind
# Tokenizer files transformers, vLLM and TGI read beside the weights (config.json and
# generation_config.json are written, not copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextmanager
def new_folder(out_dir: str | Path, kind: str, sources: Iterable[Path], force: bool = False) -> Iterator[Path]:
    """A temporary folder to write out_dir's files into, renamed to out_dir when the block ends
    without an exception (and removed otherwise, out_dir untouched).

    Refuses (ValueError) an out_dir that is, contains or lies inside one of sources; refuses
    (FileExistsError) an existing out_dir unless force and its marker says this project wrote a
    folder of this kind there.
    """
    out = Path(out_dir)
    check_outside_sources(out, sources)
    if out.exists():
        check_replaceable(out, kind, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        marker = {"written_by": "llama_int8", "kind": kind, "state": "complete", "version": __version__,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
        make_readable(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_outside_sources(out: Path, sources: Iterable[Path]) -> None:
    target = out.resolve()
    for source in sources:
        src = Path(source).resolve()
        if target == src or target in src.parents or src in target.parents:
            raise ValueError(f"{out}: the output folder cannot be, contain or lie inside the source {source}")


def check_replaceable(out: Path, kind: str, force: bool) -> None:
    try:
        marker = json.loads((out / MARKER_NAME).read_text())
    except (OSError, ValueError):
        marker = None
    ours = isinstance(marker, dict) and marker.get("written_by") == "llama_int8" and marker.get("kind") == kind
    if not ours:
        raise FileExistsError(f"{out} already exists and is not a {kind} folder written by llama_int8 (no "
                              f"{MARKER_NAME} saying so); choose another output folder or remove it yourself")
    if not force:
        raise FileExistsError(f"{out} already exists (a {kind} folder written by llama_int8); pass --force to replace it")


# --- The source -------------------------------------------------------------------------------------

def checkpoint_sources(checkpoint: Checkpoint) -> list[Path]:
    """Every file or folder the checkpoint reads (a stack's base and overlays), which the output may not touch."""
    record = checkpoint.record()
    return [Path(entry["path"]) for entry in record.get("stack", [record])]


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
