"""The command-line flags every script shares, checked before any model loads.

example.py, quantize_offline.py and the package's `python -m` commands build their parsers here, so a
flag has one name, one default and one help line everywhere:

    parser = make_parser("python -m llama_int8.x", "What it does, in one line.")
    add_checkpoint_flags(parser)   # --ckpt_dir --tokenizer_path --delta --quant --int8_threshold --blocksize --quantize_head
    add_runtime_flags(parser)      # --max_batch_size --max_seq_len --device --dtype --attention --sliding_window --prefill_chunk --no_verify
    add_sampling_flags(parser)     # --max_gen_len --temperature --top_p --repetition_penalty --seed
    add_switch(parser, "--chat", "talk to the model on stdin (default: off)")   # --chat, --chat true, --chat=false
    run_cli(parser, main)          # parse and check the flags, set up logging, then main(args)

    def main(args: argparse.Namespace) -> None:
        llm = Llama.build(**build_kwargs(args))            # --ckpt_dir omitted: the demo model
        llm.text_completion(prompts, **sampling_kwargs(args))

A bad flag (unknown, misspelled, out of range, a path that is not there, `--device cuda` where torch
sees no GPU) ends the program with one line on stderr and exit code 2, before any model loads and,
but for `--device cuda` with a torch built for CUDA, before torch is imported: in a fraction of a second. A user error raised
later (ValueError, which the checkpoint and tokenizer errors are, or OSError) is one line and exit
code 1. `--debug`, or LLAMA_INT8_DEBUG=1 in the environment, shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .demo import DEMO_REPETITION_PENALTY, demo_gguf_path
from .logs import setup_logging

DEBUG_ENV = "LLAMA_INT8_DEBUG"
# What --quant, --dtype and --attention accept. The quantizer, generation.resolve_dtype and the model
# check the same names (a test keeps them equal); they are repeated here because importing those
# modules means importing torch and bitsandbytes, seconds before a typo could be reported.
QUANT_MODES = ("int8", "nf4", "nf4-dq", "fp4", "fp4-dq", "none")
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
ATTENTION_BACKENDS = ("flash", "sdpa", "math")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


class FlagParser(argparse.ArgumentParser):
    """argparse, with one help line per flag and one error line (and a guess for a misspelled flag)."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message += self.suggestion(message)
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")

    def suggestion(self, message: str) -> str:
        known = [option for action in self._actions for option in action.option_strings]
        for word in message.split(":", 1)[1].split():
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1)
                if close:
                    return f"; did you mean {close[0]}?"
        return ""


class OneLinePerFlag(argparse.HelpFormatter):
    """Help on the flag's own line, never wrapped: a terminal wraps long lines better than argparse."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=1_000_000)


def make_parser(prog: str | None, description: str) -> FlagParser:
    """A parser with --debug; prog None takes the script's name. Abbreviated flags are refused: a
    prefix that means one flag today may mean two tomorrow."""
    parser = FlagParser(prog=prog, usage="%(prog)s [flags]", description=description,
                        formatter_class=OneLinePerFlag, allow_abbrev=False)
    add_switch(parser, "--debug", f"show the traceback of an error (default: off; also {DEBUG_ENV}=1)")
    return parser


# --- Value types: each names what it expected, argparse adds the flag -------------------------------

def parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def positive_int(text: str) -> int:
    value = int_value(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = int_value(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def int_value(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def non_negative_float(text: str) -> float:
    value = float_value(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = float_value(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def probability(text: str) -> float:
    value = float_value(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def float_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def existing_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


def path_stack(text: str) -> str | list[str]:
    """One path, or several merged in order: `a,b` or `[a,b]` (python-fire's list syntax, kept).
    A value naming an existing path is one path, commas and all."""
    if Path(text).exists():
        return text
    items = [item.strip().strip("'\"").strip() for item in text.strip().removeprefix("[").removesuffix("]").split(",")]
    if any(not item for item in items):
        raise argparse.ArgumentTypeError(f"expected a path or comma-separated paths, got {text!r}")
    paths = [existing_path(item) for item in items]
    return paths[0] if len(paths) == 1 else paths


def non_empty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected text, got an empty string")
    return text


def quant_mode(text: str) -> str:
    if text.removeprefix("bnb.") not in QUANT_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(QUANT_MODES)} (or litgpt's bnb.int8, "
                                         f"bnb.nf4, ...), got {text!r}")
    return text


def device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


# --- The shared flags -------------------------------------------------------------------------------

def add_switch(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, help: str,
               default: bool | None = False) -> None:
    """An on/off flag: `--flag` turns it on; `--flag false` and `--flag=true` are accepted too;
    default None leaves the choice to the code that reads it."""
    parser.add_argument(flag, nargs="?", const=True, default=default, type=parse_bool, metavar="BOOL", help=help)


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
                       help=f"{', '.join(QUANT_MODES)} (default: %(default)s; a pre-baked folder keeps its own)")
    group.add_argument("--int8_threshold", type=non_negative_float, metavar="X",
                       help="LLM.int8()'s outlier threshold, 0 turns the 16-bit outlier path off "
                            "(default: 6.0, or a pre-baked folder's own)")
    group.add_argument("--blocksize", type=positive_int, metavar="N",
                       help="4-bit weights per scale: 32, 64, ... 4096 (default: 64; 32 for nf4-dq and fp4-dq)")
    add_switch(group, "--quantize_head", "quantize the output head too, int8, a tied one as one table with the "
               "embedding (default: on when loading in a quantized mode, off when writing a folder)", default=None)


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

def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv (default: sys.argv[1:]) and check what needs more than the flag itself."""
    args = parser.parse_args(argv)
    if getattr(args, "device", None) is not None and args.device.startswith("cuda"):
        check_cuda(parser, args.device)
    return args


def check_cuda(parser: argparse.ArgumentParser, device: str) -> None:
    """Refuse a CUDA device torch cannot see. A CPU-only build says so in its version (2.13.0+cpu),
    read without importing torch, which takes seconds; other builds are asked."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    if version.endswith("+cpu"):
        parser.error(f"argument --device: {device} asked for, but torch {version} is a CPU-only build")
    import torch  # only here: every other flag is checked without it

    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        parser.error(f"argument --device: {device} asked for, but torch {torch.__version__} ({build}) "
                     f"sees {count} CUDA device(s)")


def build_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Llama.build's keyword arguments from add_checkpoint_flags' and add_runtime_flags' flags; an
    omitted --ckpt_dir is the demo model, fetched on first use."""
    ckpt_dir = args.ckpt_dir
    if ckpt_dir is None:
        ckpt_dir = str(demo_gguf_path())
        logging.getLogger("llama_int8").info("No --ckpt_dir given: using the demo model %s", ckpt_dir)
    return dict(ckpt_dir=ckpt_dir, tokenizer_path=args.tokenizer_path, delta=args.delta, quant=args.quant,
                int8_threshold=args.int8_threshold, blocksize=args.blocksize, quantize_head=args.quantize_head,
                max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, device=args.device,
                dtype=args.dtype, attention=args.attention, sliding_window=args.sliding_window,
                prefill_chunk=args.prefill_chunk, verify=not args.no_verify)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of text_completion, chat_completion and the streaming methods, from
    add_sampling_flags' flags; the demo model (--ckpt_dir omitted) gets its own repetition penalty."""
    penalty = args.repetition_penalty
    if penalty is None:
        penalty = DEMO_REPETITION_PENALTY if args.ckpt_dir is None else 1.0
    return dict(max_gen_len=args.max_gen_len, temperature=args.temperature, top_p=args.top_p,
                repetition_penalty=penalty, seed=args.seed)


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], None],
            argv: list[str] | None = None) -> None:
    """Parse and check the flags, set up logging, run main(args); a user error ends the program with
    one line on stderr and exit code 1 (the traceback with --debug or LLAMA_INT8_DEBUG=1)."""
    args = parse_flags(parser, argv)
    setup_logging()
    try:
        main(args)
    except (ValueError, OSError) as e:
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's code for Ctrl-C; a traceback would say nothing the user does not know
