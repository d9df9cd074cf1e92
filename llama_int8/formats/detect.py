"""Which format a path holds: one folder or file becomes the Checkpoint of its format."""

from __future__ import annotations

from pathlib import Path

from .common import Checkpoint, CheckpointError
from .gguf_file import GGUFCheckpoint
from .hf import HFCheckpoint
from .hf_bnb import open_quantized_hf_folder
from .meta import MetaCheckpoint
from .prebaked import PrebakedCheckpoint, is_prebaked_folder
from .writing import refuse_unfinished_write


def open_single_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """The checkpoint in a folder (Meta, Hugging Face, pre-baked, or a folder holding one GGUF file)
    or a .gguf file, with its model configuration read. A folder a writer of this project has not
    finished is refused; verify: check a pre-baked folder's shard checksums."""
    folder = Path(path)
    if folder.exists():
        refuse_unfinished_write(folder, CheckpointError)
    if folder.is_file() and folder.suffix == ".gguf":
        return GGUFCheckpoint(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder (or .gguf file) does not exist")
    if is_prebaked_folder(folder):
        return PrebakedCheckpoint(folder, verify)
    if (folder / "params.json").exists():
        return MetaCheckpoint(folder)
    if (folder / "config.json").exists():
        return open_quantized_hf_folder(folder) or HFCheckpoint(folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFCheckpoint(ggufs[0])
    if ggufs:
        raise CheckpointError(f"{folder}: holds {len(ggufs)} GGUF files {[g.name for g in ggufs]}; pass one of them")
    raise CheckpointError(f"{folder}: no params.json (Meta), config.json (Hugging Face) or .gguf file found")
