"""Generated tokens as the text a client may be shown, piece by piece.

Two traps of streaming (every serving engine has met both): decoding one token at a time splits
multi-byte characters and loses SentencePiece's leading spaces, and a stop string that spans
tokens leaks its first part before the rest arrives. IncrementalDecoder decodes a short window of
ids around the new token and releases only complete characters; StopStringFilter holds back any
tail that could begin a stop string until it is known not to, and never releases the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

INCOMPLETE = "\ufffd"  # what decoding an unfinished UTF-8 sequence ends with
# Prompt tokens decoded before the first generated one, so that its leading space (SentencePiece
# drops the space of a text's first piece) and any merge with the prompt come out as in the whole text.
PROMPT_CONTEXT_TOKENS = 4


class IncrementalDecoder:
    """The text of a growing list of generated ids, released as complete characters.

    Each push decodes ids[prefix:] and ids[prefix:read], the tokens since the last release and one
    release of context before them, and releases the difference: the work per token stays small
    however long the text grows.
    """

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt[-PROMPT_CONTEXT_TOKENS:])
        self.prefix = 0  # start of the context window
        self.read = len(self.ids)  # ids before this have been released

    def push(self, token: int) -> str:
        """Text that token completes ("" while a character is still unfinished)."""
        self.ids.append(token)
        return self.release(final=False)

    def flush(self) -> str:
        """Whatever is left at the end of the text, unfinished characters included."""
        return self.release(final=True)

    def release(self, final: bool) -> str:
        released = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(released) or (text.endswith(INCOMPLETE) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(released):]


class StopStringFilter:
    """Cuts text at the first stop string, holding back any tail that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text that is safe to release, whether a stop string was met: nothing follows it)."""
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=None)
        if cut is not None:
            safe, self.held = self.held[:cut], ""
            return safe, True
        keep = self.longest_stop_prefix_at_end()
        safe, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return safe, False

    def flush(self) -> str:
        """The held tail at the end of the text: it turned out not to be a stop string."""
        held, self.held = self.held, ""
        return held

    def longest_stop_prefix_at_end(self) -> int:
        longest = max((len(s) for s in self.stops), default=1)
        for n in range(min(len(self.held), longest - 1), 0, -1):
            tail = self.held[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
