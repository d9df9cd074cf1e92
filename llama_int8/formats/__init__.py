"""Checkpoint formats: a path (or a stack of paths) on disk becomes a configuration and named tensors.

    common.py     the shared vocabulary: Checkpoint, NamedTensor, CheckpointError, names, rotary layout
    meta.py       Meta's params.json + consolidated.NN.pth
    hf.py         Hugging Face config.json + safetensors
    gguf_file.py  llama.cpp's GGUF files, tokenizer included
    prebaked.py   quantize_offline.py's folders: the writer and the reader
    detect.py     which format a path holds
    stack.py      a base with overlays, deltas and LoRA adapters merged in; open_checkpoint

`open_checkpoint` is the only door the rest of the package uses.
"""

from .common import Checkpoint, CheckpointError, NamedTensor, QuantizedLayer
from .stack import open_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "NamedTensor", "QuantizedLayer", "open_checkpoint"]
