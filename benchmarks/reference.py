"""The reference the benchmarks measure against: Hugging Face transformers (+ bitsandbytes) on the
same weights. transformers is a benchmark- and test-only dependency."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llama_int8.demo import cache_dir

log = logging.getLogger(__name__)


def transformers_folder(source: Path) -> Path:
    """An HF folder transformers can load with a quantization config: the source itself, or for a
    GGUF file a float32 export of it made once and cached (transformers reads GGUF only dequantized)."""
    source = Path(source)
    if source.is_dir() and (source / "config.json").exists():
        return source
    ggufs = [source] if source.suffix == ".gguf" else sorted(source.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ValueError(f"{source}: the transformers comparison needs an HF folder or one GGUF file")
    target = cache_dir() / f"hf-{ggufs[0].stem}"
    if not (target / "config.json").exists():
        export_gguf_to_hf(ggufs[0], target)
    return target


def export_gguf_to_hf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Exporting %s to an HF folder for transformers (once)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # a GGUF-loaded model refuses to save while it names its source format
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bnb_config(quant: str, compute_dtype: torch.dtype, int8_threshold: float = 6.0):
    """transformers' BitsAndBytesConfig for one of our --quant modes (None for 'none')."""
    from transformers import BitsAndBytesConfig

    mode = quant.removeprefix("bnb.")
    if mode == "none":
        return None
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(int8_threshold))
    kind, _, dq = mode.partition("-")
    if kind not in ("nf4", "fp4") or dq not in ("", "dq"):
        raise ValueError(f"quant: no transformers equivalent for {quant!r}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=dq == "dq")


def load_transformers(folder: Path, quant: str, device: torch.device, dtype: torch.dtype,
                      int8_threshold: float = 6.0):
    from transformers import AutoModelForCausalLM

    config = bnb_config(quant, dtype, int8_threshold)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=config,
                                                 device_map={"": device})
    return model.eval()
