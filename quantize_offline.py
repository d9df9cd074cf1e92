"""Quantize a checkpoint once, offline, into a pre-baked folder that loads without re-quantizing.

    python quantize_offline.py --ckpt_dir 13B --out_dir 13B-int8 --quant int8
    python quantize_offline.py --ckpt_dir 13B --out_dir 13B-nf4 --quant nf4-dq
    python example.py --ckpt_dir 13B-int8
    python quantize_offline.py --ckpt_dir '[13B,13B-lora-adapter]' --out_dir 13B-tuned-int8
    python quantize_offline.py --ckpt_dir model.Q8_0.gguf --out_dir model-nf4 --quant nf4

Writes safetensors shards of the quantized weights, a manifest (format version, quant settings, model
config, source checkpoint, tool version) and a copy of the tokenizer, into a temporary folder renamed
into place when complete. An existing --out_dir is refused unless --force.
"""

from __future__ import annotations

import logging
import sys

import fire

from llama_int8.logs import setup_logging
from llama_int8.formats import open_checkpoint
from llama_int8.formats.prebaked import SHARD_BYTES, write_prebaked
from llama_int8.quantize import parse_quant_mode


def main(ckpt_dir: str | list[str], out_dir: str, quant: str = "int8", int8_threshold: float = 6.0,
         blocksize: int | None = None, quantize_head: bool = False, tokenizer_path: str | None = None,
         force: bool = False, shard_size_gb: float = SHARD_BYTES / 1024**3,
         delta: str | list[str] | None = None) -> None:
    """Quantize ckpt_dir (Meta, Hugging Face or GGUF) to out_dir; quant: int8, nf4, nf4-dq, fp4 or fp4-dq.

    ckpt_dir may list a base and overlays ('[base,finetune,lora-adapter]'), delta folders to add to it:
    they are merged tensor by tensor before quantizing (llama_int8/overlays.py)."""
    setup_logging()
    cfg = parse_quant_mode(quant, int8_threshold, blocksize, quantize_head)
    write_prebaked(open_checkpoint(ckpt_dir, delta), out_dir, cfg, force=force, tokenizer_path=tokenizer_path,
                   shard_bytes=int(shard_size_gb * 1024**3))


if __name__ == "__main__":
    try:
        fire.Fire(main)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        logging.getLogger("quantize_offline").error("%s", e)
        sys.exit(1)
