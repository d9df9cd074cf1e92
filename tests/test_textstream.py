"""Streamed text: no character is ever split, leading spaces survive, and no part of a stop string
is ever released; measured against decoding the whole text at once."""

from __future__ import annotations

import random

import pytest

from llama_int8.textstream import IncrementalDecoder, StopStringFilter
from llama_int8.tokenizer import SentencePieceTokenizer

TEXT = "Grüße aus Köln: 東京 is 🗼, naïve café! ok"


class ByteTokenizer:
    """One token per UTF-8 byte, decoded as Hugging Face's byte-level tokenizers decode: an
    unfinished character comes out as U+FFFD."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def stream(decoder: IncrementalDecoder, tokens: list[int]) -> list[str]:
    return [decoder.push(t) for t in tokens] + [decoder.flush()]


def test_multibyte_characters_are_never_split():
    tok = ByteTokenizer()
    prompt, generated = tok.encode("Prompt: "), tok.encode(TEXT)
    pieces = stream(IncrementalDecoder(tok, prompt), generated)
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") > 10  # the bytes before a character's last one release nothing


def test_an_unfinished_character_at_the_end_is_flushed():
    tok = ByteTokenizer()
    decoder = IncrementalDecoder(tok, tok.encode("a"))
    cut = tok.encode("x🗼")[:-1]
    assert [decoder.push(t) for t in cut] == ["x", "", "", ""]  # 3 of the 4 bytes
    assert decoder.flush() == "\ufffd"


def test_sentencepiece_leading_spaces_survive(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    prompt = tok.encode("The quick brown", bos=True)
    generated = tok.encode(" fox jumps over the lazy dog.", bos=False)
    pieces = stream(IncrementalDecoder(tok, prompt), generated)
    whole = tok.decode(prompt + generated)
    assert "".join(pieces) == whole[len(tok.decode(prompt)):]
    assert pieces[0].startswith(" ")


@pytest.mark.parametrize("seed", range(20))
def test_stop_strings_cut_the_text_and_no_part_of_one_is_released(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab c") for _ in range(60))
    stops = ("cab", "b cc", "zz")
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    cuts = sorted(rng.sample(range(1, len(text)), 15))
    chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    stop_filter = StopStringFilter(stops)
    released = ""
    for chunk in chunks:
        safe, stopped = stop_filter.push(chunk)
        released += safe
        # Released text is never more than what is known to precede any stop string.
        assert first is None or len(released) <= first
        if stopped:
            break
    if first is None:
        released += stop_filter.flush()
        assert released == text
    else:
        assert stopped and released == text[:first]


def test_held_text_is_released_once_it_cannot_begin_a_stop_string():
    stop_filter = StopStringFilter(["Hello!"])
    assert stop_filter.push("Say Hel") == ("Say ", False)
    assert stop_filter.push("lo") == ("", False)
    assert stop_filter.push(" you") == ("Hello you", False)
    assert stop_filter.push("Hello!") == ("", True)
