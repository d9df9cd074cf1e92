"""llama_int8: a memory-frugal, quantized, single-GPU inference engine for LLaMA-family models."""

from .generation import Llama
from .model import ModelArgs, Transformer

__all__ = ["Llama", "ModelArgs", "Transformer"]
__version__ = "0.1.0"
