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

import argparse

from llama_int8.cli import add_checkpoint_flags, add_switch, make_parser, positive_float, run_cli

SHARD_SIZE_GB = 2.0  # the writer's SHARD_BYTES in GiB (a test keeps them equal); a flag default before torch loads


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(None, __doc__.split("\n", 1)[0])
    parser.add_argument("--out_dir", required=True, metavar="PATH",
                        help="the folder to write; it must not exist, unless --force (required)")
    add_switch(parser, "--force", "replace an existing --out_dir (default: off)")
    parser.add_argument("--shard_size_gb", type=positive_float, default=SHARD_SIZE_GB, metavar="GIB",
                        help="largest safetensors shard, in GiB (default: %(default)s)")
    add_checkpoint_flags(parser, ckpt_required=True)
    return parser


def main(args: argparse.Namespace) -> None:
    # Imported once the flags are known good: the readers and the quantizer import torch and
    # bitsandbytes, seconds before a misspelled flag could be reported.
    from llama_int8.formats import open_checkpoint
    from llama_int8.formats.prebaked import write_prebaked
    from llama_int8.quantize import parse_quant_mode

    threshold = 6.0 if args.int8_threshold is None else args.int8_threshold
    cfg = parse_quant_mode(args.quant, threshold, args.blocksize, args.quantize_head)
    write_prebaked(open_checkpoint(args.ckpt_dir, args.delta), args.out_dir, cfg, force=args.force,
                   tokenizer_path=args.tokenizer_path, shard_bytes=int(args.shard_size_gb * 1024**3))


if __name__ == "__main__":
    run_cli(build_parser(), main)
