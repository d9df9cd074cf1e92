"""The model flags every script that loads a model shares, checked before any model loads.

example.py, the package's `python -m` commands (serve, batch) and quantize_offline.py add them to a
parser of flags.py, so a flag has one name, one default and one help line everywhere:

    parser = make_parser("python -m llama_int8.x", "What it does, in one line.")   # flags.py
    add_checkpoint_flags(parser)   # --ckpt_dir --tokenizer_path --delta --quant --int8_threshold --blocksize --quantize_head
    add_runtime_flags(parser)      # --max_batch_size --max_seq_len --device --dtype --attention --sliding_window --prefill_chunk --kv_cache --int8_matmul --no_verify
    add_sampling_flags(parser)     # --max_gen_len --temperature --top_p --repetition_penalty --seed
    run_cli(parser, main)          # flags.py

    def main(args: argparse.Namespace) -> None:
        llm = Llama.build(**build_kwargs(args))            # --ckpt_dir omitted: the demo model
        llm.text_completion(prompts, **sampling_kwargs(args))
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from .demo import DEMO_REPETITION_PENALTY, demo_gguf_path
from .flags import add_switch, device_name, existing_path, int_value, non_negative_float, non_negative_int, \
    path_stack, positive_float, positive_int, probability

# What --quant, --dtype, --attention, --kv_cache and --int8_matmul accept. The quantizer, generation.resolve_dtype and
# the model check the same names (tests keep them equal); they are repeated here because importing those
# modules means importing torch and bitsandbytes, seconds before a typo could be reported.
QUANT_MODES = ("int8", "nf4", "nf4-dq", "fp4", "fp4-dq", "gguf", "none")
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
ATTENTION_BACKENDS = ("flash", "sdpa", "math")
KV_CACHES = ("model", "int8")
INT8_MATMULS = ("llm.int8", "weight_only")


def quant_mode(text: str) -> str:
    if text.removeprefix("bnb.") not in QUANT_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(QUANT_MODES)} (or litgpt's bnb.int8, "
                                         f"bnb.nf4, ...), got {text!r}")
    return text


# --- The shared flags -------------------------------------------------------------------------------

def add_checkpoint_flags(parser: argparse.ArgumentParser, ckpt_required: bool = False) -> None:
    """What to load and how to quantize it: Llama.build's checkpoint and quantization arguments."""
    group = parser.add_argument_group("checkpoint and quantization")
    default = "required" if ckpt_required else "default: the demo model, SmolLM2-135M-Instruct, fetched on first use"
    group.add_argument("--ckpt_dir", type=path_stack, required=ckpt_required, metavar="PATH",
                       help=f"a checkpoint folder or .gguf file, or a stack base,overlay,... merged in order ({default})")
    group.add_argument("--tokenizer_path", type=existing_path, metavar="PATH",
                       help="tokenizer.model or tokenizer.json (default: found beside the checkpoint, or in its parent)")
    group.add_argument("--delta", type=path_stack, metavar="PATH",
                       help="folders whose weights are added to the checkpoint's, comma-separated (default: none)")
    group.add_argument("--quant", type=quant_mode, default="int8", metavar="MODE",
                       help=f"{', '.join(QUANT_MODES)} (default: %(default)s; a pre-baked folder keeps its own; gguf: "
                            "a .gguf file's Q4_0/Q4_1 weights as stored, through torch's int4pack kernel)")
    group.add_argument("--int8_threshold", type=non_negative_float, metavar="X",
                       help="LLM.int8()'s outlier threshold, 0 turns the 16-bit outlier path off "
                            "(default: 6.0, or a pre-baked folder's own)")
    group.add_argument("--blocksize", type=positive_int, metavar="N",
                       help="4-bit weights per scale: 32, 64, ... 4096 (default: 64; 32 for nf4-dq and fp4-dq)")
    add_switch(group, "--quantize_head", "quantize the output head too, int8, a tied one as one table with the "
               "embedding (default: on in the quantized modes, loading and pre-baking alike; the hf-bnb and "
               "compressed-tensors exports keep it 16-bit)", default=None)


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """Where and how the model runs: Llama.build's device, memory and attention arguments."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--max_batch_size", type=positive_int, default=1, metavar="N",
                       help="sequences generated together; sizes the KV cache (default: %(default)s)")
    group.add_argument("--max_seq_len", type=positive_int, default=512, metavar="N",
                       help="prompt and answer positions per sequence; sizes the KV cache (default: %(default)s)")
    group.add_argument("--device", type=device_name, metavar="DEVICE",
                       help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
    group.add_argument("--dtype", choices=DTYPES, metavar="DTYPE",
                       help="float32, bfloat16 or float16, for activations, cache and unquantized weights "
                            "(default: float32 on the CPU; bfloat16 on a GPU that has it, else float16)")
    group.add_argument("--attention", choices=ATTENTION_BACKENDS, metavar="BACKEND",
                       help="flash, sdpa or math (default: flash where flash-attn is installed and usable, else sdpa)")
    group.add_argument("--sliding_window", type=positive_int, metavar="N",
                       help="attend to the last N positions only; the KV cache then holds N (default: the checkpoint's)")
    group.add_argument("--prefill_chunk", type=positive_int, metavar="N",
                       help="prefill long prompts N tokens at a time (default: the whole prompt at once)")
    group.add_argument("--kv_cache", choices=KV_CACHES, default="model", metavar="KIND",
                       help="model: keys and values in --dtype; int8: in int8 with a scale per position and head, "
                            "half a 16-bit cache's bytes (default: %(default)s)")
    group.add_argument("--int8_matmul", choices=INT8_MATMULS, default="llm.int8", metavar="KIND",
                       help="llm.int8: LLM.int8() as bitsandbytes computes it; weight_only: steps of up to 4 rows on "
                            "the CPU multiply bfloat16 activations by the int8 weights (faster, closer to the stored "
                            "weights, not bitsandbytes' numbers) (default: %(default)s)")
    add_switch(group, "--no_verify", "load a pre-baked folder without checking its shards' SHA-256 (default: checked)")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """How answers are sampled: the generation methods' keyword arguments."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max_gen_len", type=non_negative_int, default=256, metavar="N",
                       help="most tokens generated per answer (default: %(default)s)")
    group.add_argument("--temperature", type=non_negative_float, default=0.6, metavar="X",
                       help="sampling temperature, 0 is greedy (default: %(default)s)")
    group.add_argument("--top_p", type=probability, default=0.9, metavar="P",
                       help="sample among the most likely tokens whose probabilities add up to P (default: %(default)s)")
    group.add_argument("--repetition_penalty", type=positive_float, metavar="X",
                       help="divide the logits of tokens already in the text by X, as transformers does; 1 is off "
                            f"(default: 1.0; {DEMO_REPETITION_PENALTY} for the demo model, which repeats itself without)")
    group.add_argument("--seed", type=int_value, default=1, metavar="N",
                       help="random seed of the sampler, for answers that repeat run to run (default: %(default)s)")


# --- From flags to work -----------------------------------------------------------------------------

def build_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Llama.build's keyword arguments from add_checkpoint_flags' and add_runtime_flags' flags; an
    omitted --ckpt_dir is the demo model, fetched on first use."""
    ckpt_dir = args.ckpt_dir
    if ckpt_dir is None:
        ckpt_dir = str(demo_gguf_path())
        logging.getLogger("llama_int8").info("No --ckpt_dir given: using the demo model %s", ckpt_dir)
    return dict(ckpt_dir=ckpt_dir, tokenizer_path=args.tokenizer_path, delta=args.delta, quant=args.quant,
                int8_threshold=args.int8_threshold, int8_matmul=args.int8_matmul, blocksize=args.blocksize,
                quantize_head=args.quantize_head,
                max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, device=args.device,
                dtype=args.dtype, attention=args.attention, sliding_window=args.sliding_window,
                prefill_chunk=args.prefill_chunk, kv_cache=args.kv_cache, verify=not args.no_verify)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of text_completion, chat_completion and the streaming methods, from
    add_sampling_flags' flags; the demo model (--ckpt_dir omitted) gets its own repetition penalty."""
    penalty = args.repetition_penalty
    if penalty is None:
        penalty = DEMO_REPETITION_PENALTY if args.ckpt_dir is None else 1.0
    return dict(max_gen_len=args.max_gen_len, temperature=args.temperature, top_p=args.top_p,
                repetition_penalty=penalty, seed=args.seed)
