"""Generation arguments checked at the API boundary: each bad value is a ValueError naming the
argument and what was expected, raised before any model work, never a torch error from inside
sampling and never silent garbage.

    from llama_int8.params import check_sampling_args, check_max_gen_len, check_prompts, check_dialogs
    check_sampling_args(temperature=0.7, top_p=0.9, repetition_penalty=1.0, seed=7)
    check_max_gen_len(256)                    # None (up to the cache's end), 0 (nothing) or more
    check_prompts(["Once upon a time"])       # a list of strings; a bare string is refused
    check_dialogs([[{"role": "user", "content": "Hi"}]])
    check_prompt_tokens([[1, 15043]], vocab_size=32000)

`Llama`'s generation methods call these; a scheduler or server taking requests calls the same ones
(a SamplingParams can run check_sampling_args(**dataclasses.asdict(self)) in its __post_init__).
Temperatures below GREEDY_BELOW sample greedily (`effective_temperature`): dividing logits by them
overflows float32. Numbers are judged by the value sampling computes with, float32: 1e-300 is 0 there,
so it is no positive repetition penalty.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Collection, Sequence
from numbers import Integral, Real
from typing import Any

from .chat import check_dialog

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
GREEDY_BELOW = 1e-5


def as_float32(value: float) -> float:
    """value rounded to float32, as sampling computes with it: inf beyond float32's range."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def check_number(argument: str, value: Any, expected: str, ok: Callable[[float], bool]) -> None:
    """value is a finite real number (not a bool) for which ok holds, in float32 too, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{argument}: expected a number {expected}, got {value!r}")
    rounded = as_float32(value)
    if not (math.isfinite(rounded) and ok(rounded)):
        raise ValueError(f"{argument}: expected a number {expected} in float32, which sampling computes in; "
                         f"{value!r} is {rounded!r} there")


def check_integer(argument: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{argument}: expected an integer {bound}, got {value!r}")


def check_sampling_args(temperature: float = 1.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                        seed: int | None = None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                        top_k: int = 0, min_p: float = 0.0) -> None:
    """temperature >= 0 (0 is greedy), 0 < top_p <= 1, repetition_penalty > 0, penalties in [-2, 2]
    (OpenAI's range), seed None or an integer torch can seed with, top_k >= -1 (0 and -1: off),
    0 <= min_p <= 1 (0: off)."""
    check_number("temperature", temperature, ">= 0 (0 is greedy)", lambda v: v >= 0)
    check_number("top_p", top_p, "in (0, 1]", lambda v: 0 < v <= 1)
    check_number("repetition_penalty", repetition_penalty, "> 0 (1 is off)", lambda v: v > 0)
    check_number("frequency_penalty", frequency_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
    check_number("presence_penalty", presence_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
    check_integer("top_k", top_k, -1)
    check_number("min_p", min_p, "in [0, 1] (0 is off)", lambda v: 0 <= v <= 1)
    if seed is not None:
        check_integer("seed", seed, *SEED_RANGE)


def check_logit_bias(logit_bias: Sequence[tuple[int, float]]) -> None:
    """(token, bias) pairs, each bias in [-100, 100] (OpenAI's range); the tokens are the vocabulary's
    to check."""
    for token, bias in logit_bias:
        check_number(f"logit_bias[{token}]", bias, "in [-100, 100]", lambda v: -100 <= v <= 100)


def effective_temperature(temperature: float) -> float:
    """The temperature sampling uses: 0 (greedy) below GREEDY_BELOW."""
    return 0.0 if temperature < GREEDY_BELOW else float(temperature)


def check_max_gen_len(max_gen_len: int | None, argument: str = "max_gen_len") -> None:
    """None (as many as the cache holds), 0 (no token for any prompt) or a positive integer."""
    if max_gen_len is not None:
        check_integer(argument, max_gen_len, 0)


def check_text(text: Any, argument: str) -> None:
    """A string that can be encoded as UTF-8 (no lone surrogates, as text decoded with
    errors="surrogateescape" from bytes that were not UTF-8 holds)."""
    if not isinstance(text, str):
        raise ValueError(f"{argument}: expected a string, got {type(text).__name__} {text!r:.80}")
    if (problem := unencodable(text)) is not None:
        raise ValueError(f"{argument}: {problem}")


def unencodable(text: str) -> str | None:
    """What keeps text from being encoded as UTF-8, or None when nothing does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"not valid text: a lone surrogate {text[e.start]!r} at character {e.start} (was it decoded from "
                "bytes that are not UTF-8?)")
    return None


def check_list(value: Any, argument: str, items: str) -> None:
    """value is a non-empty list or tuple (a bare string is not a list of one-character items)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        hint = f"; wrap one in a list: [{argument[:-1]}]" if isinstance(value, str) else ""
        raise ValueError(f"{argument}: expected a list of {items}, got {type(value).__name__}{hint}")
    if not value:
        raise ValueError(f"{argument}: expected a list of {items}, got an empty list")


def check_prompts(prompts: Any, argument: str = "prompts") -> None:
    """A non-empty list of strings, each encodable."""
    check_list(prompts, argument, "strings")
    for i, prompt in enumerate(prompts):
        check_text(prompt, f"{argument}[{i}]")


def check_dialogs(dialogs: Any, argument: str = "dialogs") -> None:
    """A non-empty list of dialogs, each a list of {"role", "content"} messages of the right shape
    (see chat.check_dialog) whose contents can be encoded."""
    check_list(dialogs, argument, "dialogs (each a list of messages)")
    if isinstance(dialogs[0], dict):
        raise ValueError(f"{argument}: expected a list of dialogs, got a list of messages; wrap one dialog in a "
                         "list: [dialog]")
    for i, dialog in enumerate(dialogs):
        check_one_dialog(dialog, f"{argument}[{i}]")


def check_one_dialog(dialog: Any, argument: str = "dialog") -> None:
    try:
        check_dialog(dialog)
    except ValueError as e:
        raise ValueError(f"{argument}: {e}") from None
    for j, message in enumerate(dialog):
        check_text(message["content"], f"{argument}[{j}]['content']")


def check_prompt_tokens(prompt_tokens: Any, vocab_size: int, argument: str = "prompt_tokens") -> None:
    """A list of lists of token ids, each an integer in [0, vocab_size)."""
    check_list(prompt_tokens, argument, "token id lists")
    for i, tokens in enumerate(prompt_tokens):
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise ValueError(f"{argument}[{i}]: expected a list of token ids, got {type(tokens).__name__}")
        check_token_ids(tokens, f"{argument}[{i}]", vocab_size)


def check_token_ids(ids: Collection[Any], argument: str, vocab_size: int) -> None:
    for j, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < vocab_size:
            raise ValueError(f"{argument}[{j}]: expected a token id from 0 to {vocab_size - 1} (the model's "
                             f"vocabulary), got {t!r}")
