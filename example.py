"""Chat with, or complete prompts with, a LLaMA-family checkpoint, streaming the answer as it is generated.

    python example.py                                     # the demo model (SmolLM2-135M-Instruct): a few questions
    python example.py --chat                              # talk to it: one message a line, EOF or "exit" ends
    python example.py --ckpt_dir 13B --max_batch_size=1   # a base model: the built-in completion prompts
    python example.py --ckpt_dir 13B --prompt "Simply put, the theory of relativity states that"
    python example.py --ckpt_dir 13B --quant nf4          # int8 (LLM.int8()) by default; none for 16-bit
    python example.py --ckpt_dir 13B-int8                 # pre-baked by quantize_offline.py: no re-quantizing
    python example.py --ckpt_dir llama-2-7b-chat --chat --system "Answer in one sentence."

Chat models (a tokenizer with a chat template, or a folder named *chat*) answer the built-in questions;
other models complete the built-in prompts. --prompt always completes the given text as it is.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from llama_int8.cli import add_checkpoint_flags, add_runtime_flags, add_sampling_flags, build_kwargs, sampling_kwargs
from llama_int8.flags import add_switch, make_parser, non_empty_text, run_cli

from llama_int8.chat import Dialog, fit_dialog

if TYPE_CHECKING:
    from llama_int8 import Llama

log = logging.getLogger("example")

BUILT_IN_PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that",
    "Building a website can be done in 10 simple steps:\n",
]

BUILT_IN_QUESTIONS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a short poem about the sea.",
]

SEPARATOR = "\n\n==================================\n"
EXIT_WORDS = ("exit", "quit")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(None, __doc__.split("\n", 1)[0])
    parser.add_argument("--prompt", action="append", type=non_empty_text, metavar="TEXT",
                        help="complete TEXT as it is; repeat the flag for several prompts "
                             "(default: the built-in questions, or prompts for a model that does not chat)")
    add_switch(parser, "--chat", 'talk to the model: one message a line on stdin, EOF or "exit" ends (default: off)')
    parser.add_argument("--system", type=non_empty_text, metavar="TEXT",
                        help="a system message for the chat and the built-in questions (default: none)")
    add_checkpoint_flags(parser)
    add_runtime_flags(parser)
    add_sampling_flags(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    import torch  # imported once the flags are known good: torch and the model take seconds to import

    from llama_int8 import Llama

    torch.set_grad_enabled(False)
    build = build_kwargs(args)
    llm = Llama.build(**build)
    sampling = sampling_kwargs(args)
    if args.chat:
        chat_loop(llm, args.system, sampling, args.max_seq_len)
    elif args.prompt is None and is_chat_model(llm, build["ckpt_dir"]):
        dialogs = [with_system(args.system) + [{"role": "user", "content": q}] for q in BUILT_IN_QUESTIONS]
        answer_questions(llm, dialogs, sampling, args.max_batch_size)
    else:
        complete_prompts(llm, args.prompt or BUILT_IN_PROMPTS, sampling, args.max_batch_size)


def is_chat_model(llm: Llama, ckpt_dir: str | list[str]) -> bool:
    """A tokenizer with a chat template, or Meta's naming (llama-2-7b-chat) for the Llama 2 format."""
    name = Path(ckpt_dir if isinstance(ckpt_dir, str) else ckpt_dir[0]).name.lower()
    return getattr(llm.tokenizer, "chat_template", None) is not None or "chat" in name


def with_system(system: str | None) -> Dialog:
    return [{"role": "system", "content": system}] if system else []


def complete_prompts(llm: Llama, prompts: list[str], sampling: dict, max_batch_size: int) -> None:
    if max_batch_size == 1:
        for text in prompts:
            print(text, end="", flush=True)
            print_stream(llm.stream_completion(text, **sampling))
            print(SEPARATOR, flush=True)
        return
    for start in range(0, len(prompts), max_batch_size):
        batch = prompts[start:start + max_batch_size]
        for text, result in zip(batch, llm.text_completion(batch, **sampling)):
            print(f"{text}{result['generation']}{SEPARATOR}", flush=True)


def answer_questions(llm: Llama, dialogs: list[Dialog], sampling: dict, max_batch_size: int) -> None:
    if max_batch_size == 1:
        for dialog in dialogs:
            print(f"User: {dialog[-1]['content']}\n\nAssistant: ", end="", flush=True)
            print_stream(llm.stream_chat(dialog, **sampling))
            print(SEPARATOR, flush=True)
        return
    for start in range(0, len(dialogs), max_batch_size):
        batch = dialogs[start:start + max_batch_size]
        for dialog, result in zip(batch, llm.chat_completion(batch, **sampling)):
            answer = result["generation"]["content"].strip()
            print(f"User: {dialog[-1]['content']}\n\nAssistant: {answer}{SEPARATOR}", flush=True)


def chat_loop(llm: Llama, system: str | None, sampling: dict, max_seq_len: int) -> None:
    """Read one user message a line until EOF or "exit"; the history goes with each message, its
    oldest exchanges dropped when the conversation would leave no room for the answer."""
    room = min(sampling["max_gen_len"], max_seq_len // 2)
    dialog = with_system(system)
    while (text := read_user_message()) is not None:
        dialog.append({"role": "user", "content": text})
        try:
            dialog, dropped = fit_dialog(llm.encode_dialog, dialog, max_seq_len - room)
        except ValueError as e:
            log.error("%s", e)
            dialog.pop()
            continue
        if dropped:
            log.warning("Dropped the %d oldest exchange(s) of the conversation to fit max_seq_len=%d",
                        dropped, max_seq_len)
        answer = print_stream(llm.stream_chat(dialog, **sampling))
        print("\n", flush=True)
        dialog.append({"role": "assistant", "content": answer.strip()})


def read_user_message() -> str | None:
    """The next non-empty line of stdin, or None at EOF or an exit word."""
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip().lower() in EXIT_WORDS:
            return None
        if line.strip():
            return line.strip()


def print_stream(pieces: Iterator[str]) -> str:
    """Print the pieces as they come; the whole text."""
    text = ""
    for piece in pieces:
        print(piece, end="", flush=True)
        text += piece
    return text


if __name__ == "__main__":
    run_cli(build_parser(), main)
