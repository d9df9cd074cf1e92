"""Quantize a checkpoint once, offline, into a pre-baked folder that loads without re-quantizing.

    python quantize_offline.py --ckpt_dir 13B --out_dir 13B-int8 --quant int8
    python quantize_offline.py --ckpt_dir 13B --out_dir 13B-nf4 --quant nf4-dq
    python example.py --ckpt_dir 13B-int8
    python quantize_offline.py --ckpt_dir '[13B,13B-lora-adapter]' --out_dir 13B-tuned-int8
    python quantize_offline.py --ckpt_dir model.Q8_0.gguf --out_dir model-nf4 --quant nf4
    python quantize_offline.py --ckpt_dir 13B --out_dir 13B-hf-nf4 --format hf-bnb --quant nf4-dq  # for transformers, vLLM
    python quantize_offline.py --ckpt_dir 13B --out_dir 13B-w8a16 --format compressed-tensors --dtype bfloat16
    python quantize_offline.py --ckpt_dir model.gguf --out_dir model-hf --format hf --dtype bfloat16

A pre-baked folder quantizes the output head as loading does (int8, on by default in the quantized
modes; --quantize_head false keeps it 16-bit); the exports keep it 16-bit.
Writes safetensors shards of the quantized weights, a manifest (format version, quant settings, model
config, source checkpoint, tool version) and a copy of the tokenizer, into a temporary folder renamed
into place when complete. An existing --out_dir is refused unless --force.
--format hf, hf-bnb and compressed-tensors write Hugging Face folders other engines load (README:
"When one GPU is not enough").
"""

from __future__ import annotations

import argparse

from llama_int8.cli import add_checkpoint_flags
from llama_int8.flags import add_switch, make_parser, positive_float, run_cli

# What --format and --dtype accept (repeated from the writers so that a typo is reported before torch loads).
FORMATS = ("prebaked", "hf-bnb", "compressed-tensors", "hf")
EXPORT_DTYPES = ("bfloat16", "float16", "float32")
SHARD_SIZE_GB = 2.0  # the writer's SHARD_BYTES in GiB (a test keeps them equal); a flag default before torch loads


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(None, __doc__.split("\n", 1)[0])
    parser.add_argument("--out_dir", required=True, metavar="PATH",
                        help="the folder to write; it must not exist, unless --force (required)")
    add_switch(parser, "--force", "replace an existing --out_dir (default: off)")
    parser.add_argument("--shard_size_gb", type=positive_float, default=SHARD_SIZE_GB, metavar="GIB",
                        help="largest safetensors shard, in GiB (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default="prebaked", metavar="FORMAT",
                        help="prebaked (llama_int8's own), hf-bnb (transformers; vLLM with pipeline parallelism), "
                             "compressed-tensors (int8 for vLLM with tensor parallelism) or hf (16-bit, any engine) "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, metavar="DTYPE",
                        help="bfloat16, float16 or float32: the 16-bit tensors of an hf, hf-bnb or compressed-tensors "
                             "folder, and its weights before quantizing (default: as the source holds them)")
    add_checkpoint_flags(parser, ckpt_required=True)
    return parser


def quantize_head_flag(args: argparse.Namespace) -> bool | None:
    """--quantize_head as given. Omitted: None for a pre-baked folder, the default loading resolves
    too, so that baking at defaults makes the model loading at defaults does; off for the exports,
    whose head stays 16-bit as transformers and vLLM keep theirs."""
    if args.quantize_head is None and args.format != "prebaked":
        return False
    return args.quantize_head


def main(args: argparse.Namespace) -> None:
    # Imported once the flags are known good: the readers and the quantizer import torch and
    # bitsandbytes, seconds before a misspelled flag could be reported.
    from llama_int8.formats import open_checkpoint
    from llama_int8.formats.compressed_tensors import write_compressed_tensors
    from llama_int8.formats.hf import write_hf
    from llama_int8.formats.hf_bnb import TRANSFORMERS_BLOCKSIZE, write_hf_bnb
    from llama_int8.formats.prebaked import write_prebaked
    from llama_int8.quantize import GGUF_QUANTIZES_NOTHING, parse_quant_mode

    if args.quant == "gguf" and args.format != "hf":
        raise ValueError(f"--quant gguf: {GGUF_QUANTIZES_NOTHING}")
    threshold = 6.0 if args.int8_threshold is None else args.int8_threshold
    blocksize = TRANSFORMERS_BLOCKSIZE if args.blocksize is None and args.format == "hf-bnb" else args.blocksize
    cfg = parse_quant_mode(args.quant, threshold, blocksize, quantize_head_flag(args))
    if args.dtype is not None and args.format == "prebaked":
        raise ValueError("--dtype applies to --format hf, hf-bnb and compressed-tensors; a pre-baked folder keeps "
                         "the source's dtype")
    checkpoint = open_checkpoint(args.ckpt_dir, args.delta)
    common = dict(force=args.force, tokenizer_path=args.tokenizer_path, shard_bytes=int(args.shard_size_gb * 1024**3))
    if args.format == "prebaked":
        write_prebaked(checkpoint, args.out_dir, cfg, **common)
    elif args.format == "hf":
        write_hf(checkpoint, args.out_dir, args.dtype, **common)
    elif args.format == "hf-bnb":
        write_hf_bnb(checkpoint, args.out_dir, cfg, args.dtype, **common)
    else:
        write_compressed_tensors(checkpoint, args.out_dir, cfg, args.dtype, **common)


if __name__ == "__main__":
    run_cli(build_parser(), main)
