"""How every command line of the project parses its flags and reports errors: argparse with one
help line per flag, value types that name what they expected, on/off switches, and run_cli.

    parser = make_parser("python -m llama_int8.x", "What it does, in one line.")
    add_switch(parser, "--chat", "talk to the model on stdin (default: off)")   # --chat, --chat true, --chat=false
    run_cli(parser, main)          # parse and check the flags, set up logging, then main(args)

A bad flag (unknown, misspelled, out of range, a path that is not there, `--device cuda` where torch
sees no GPU) ends the program with one line on stderr and exit code 2, before any model loads and,
but for `--device cuda` with a torch built for CUDA, before torch is imported: in a fraction of a
second. A user error raised later (ValueError, which the checkpoint and tokenizer errors are, or
OSError) is one line and exit code 1. `--debug`, or LLAMA_INT8_DEBUG=1 in the environment, shows the
traceback instead. The model's own flags, shared by every script that loads one, are cli.py's.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from .logs import setup_logging
from .tool_calls import PARSERS

DEBUG_ENV = "LLAMA_INT8_DEBUG"


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


def device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def add_switch(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, help: str,
               default: bool | None = False) -> None:
    """An on/off flag: `--flag` turns it on; `--flag false` and `--flag=true` are accepted too;
    default None leaves the choice to the code that reads it."""
    parser.add_argument(flag, nargs="?", const=True, default=default, type=parse_bool, metavar="BOOL", help=help)


def add_tool_parser_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--tool_parser", choices=list(PARSERS),
                        help="the format of the model's tool calls (default: the one its chat template shows, else "
                             "hermes)")


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
