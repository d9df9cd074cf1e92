"""Checkpoint formats: a path (or a stack of paths) on disk becomes a configuration and named tensors.

    common.py     the shared vocabulary: Checkpoint, NamedTensor, CheckpointError, names, rotary layout
    meta.py       Meta's params.json + consolidated.NN.pth
    hf.py         Hugging Face config.json + safetensors
    gguf_file.py  llama.cpp's GGUF files, tokenizer included
    hf_bnb.py     Hugging Face folders quantized by bitsandbytes: the reader and the writer
    prebaked.py   quantize_offline.py's folders: the writer and the reader
    compressed_tensors.py  the writer of int8 folders in compressed-tensors' layout (for vLLM)
    export.py     what the writers of Hugging Face-style folders share
    writing.py    making an output folder so that no write destroys what it did not make
    model_config.py  a model configuration checked before anything is built
    detect.py     which format a path holds
    stack.py      a base with overlays, deltas and LoRA adapters merged in; open_checkpoint

`open_checkpoint` is the only door the rest of the package uses.
"""

from .common import Checkpoint, CheckpointError, NamedTensor, QuantizedLayer
from .stack import open_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "NamedTensor", "QuantizedLayer", "open_checkpoint"]
