"""Constrained decoding: the tokens a request's grammar (JSON schema, any JSON object, regex, Lark)
allows next, through llguidance (MIT; the grammar library of vLLM and llama.cpp).

Grammars (one per tokenizer: reading the vocabulary is costly) compiles a GrammarSpec once (then
caches it), in the thread that receives the request; each request gets its own Matcher, which the
engine's thread drives step by step:

    compiled = grammars.compile(GrammarSpec("json_schema", json.dumps(schema)))  # UnsupportedGrammar
    matcher = grammars.matcher(compiled)
    while not matcher.must_end():
        mask = matcher.allowed()        # bool [vocab_size]; never a stop token: the engine adds its
                                        # own when matcher.can_end()
        ...                             # logits outside mask -> -inf, sample token
        matcher.advance(token)          # ValueError if token was not allowed

llguidance sees each token as its exact bytes, read here from the project's tokenizer objects
(byte-level BPE, pieces with <0xXX> byte fallback and ▁ spaces, or a SentencePiece model), so the
grammar constrains the very text that decoding gives.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import llguidance
import numpy as np
import torch

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

GrammarKind = Literal["json_object", "json_schema", "regex", "lark"]
GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "lark")

# JSON whitespace, matched at most once wherever JSON allows whitespace (llguidance's rule): one
# space, or one line break and up to 16 spaces of indentation. Compact and pretty-printed JSON (2 or 4
# spaces a level) both fit; and since each place must be followed by JSON that is not whitespace, a
# model cannot spend its tokens on whitespace (llguidance's default, [ \t\n\r]+, and even a bound of
# 40 tabs let SmolLM2 fill its budget with them).
JSON_WHITESPACE = r"\x20|\n\x20{0,16}"
# How llguidance writes JSON under a schema (its "x-guidance" options): that whitespace around plain
# `,` and `:`, and an unsupported keyword an error, never dropped.
JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE, "item_separator": ",", "key_separator": ":",
                "lenient": False, "coerce_one_of": False}

# What llguidance's JSON Schema compiler enforces (its docs/json_schema.md), said in UnsupportedGrammar.
SUPPORTED = {
    "json_object": "any JSON object",
    "json_schema": (
        "type, enum, const, anyOf, oneOf (where provably the same as anyOf), allOf, $ref/$defs (local), "
        "properties, required, additionalProperties, patternProperties (disjoint), minProperties/maxProperties "
        "(over properties beyond the required ones), items, prefixItems, minItems, maxItems, minLength, "
        "maxLength, pattern (no look-around), format (date-time, time, date, duration, email, hostname, ipv4, "
        "ipv6, uuid, uri), minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf; annotations "
        "(title, description, default, examples, $schema, $comment) are ignored"),
    "regex": "Rust regex syntax (Python's re without look-around or backreferences), matched whole",
    "lark": "llguidance's Lark dialect (its docs/syntax.md), starting at rule `start`",
}

COMPILED_CACHE_SIZE = 64
SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPACE_MARK = "\u2581"  # ▁, SentencePiece's space
GRAMMAR_END = b"<|grammar_end|>"  # llguidance's own end-of-sequence token (see llguidance_tokenizer)


class UnsupportedGrammar(ValueError):
    """A grammar that cannot be enforced exactly: malformed, or using a feature llguidance lacks (the
    message names it and says what is supported). A grammar is never enforced in part."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks its output to follow. source: the schema as JSON text (canonical
    json.dumps) for json_schema, the regex, or the Lark grammar; "" for json_object."""

    kind: GrammarKind
    source: str

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise UnsupportedGrammar(f"grammar kind {self.kind!r} is not supported; use one of {GRAMMAR_KINDS}")


@dataclass(frozen=True)
class Compiled:
    """A grammar built for one tokenizer. template is never advanced: each Matcher copies it."""

    spec: GrammarSpec
    template: llguidance.LLMatcher


class Grammars:
    """Compiles grammars for one tokenizer and model. vocab_size: the model's logits columns, at
    least the tokenizer's ids; the columns past the tokenizer's ids are never allowed."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
        tokens, special = token_bytes(tokenizer)
        self.tokenizer_ids = len(tokens)
        self.ll_tokenizer = llguidance_tokenizer(tokens, special, tokenizer)
        self.permitted = permitted_tokens(len(tokens), tokenizer.stop_ids | {tokenizer.eos_id} - {None}, vocab_size)
        self.cache: OrderedDict[GrammarSpec, Compiled] = OrderedDict()
        self.cache_lock = threading.Lock()  # compile runs in the server's request threads

    def compile(self, spec: GrammarSpec) -> Compiled:
        """spec built for this tokenizer, from the cache when it was compiled lately. Raises
        UnsupportedGrammar naming what cannot be enforced. Safe to call from any thread."""
        with self.cache_lock:
            if spec in self.cache:
                self.cache.move_to_end(spec)
                return self.cache[spec]
        compiled = Compiled(spec, self.build_template(spec))  # outside the lock: it may take a while
        with self.cache_lock:
            self.cache[spec] = compiled
            while len(self.cache) > COMPILED_CACHE_SIZE:
                self.cache.popitem(last=False)
        return compiled

    def build_template(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """llguidance's matcher at the start of spec's grammar; it reports errors by state, not raising."""
        template = llguidance.LLMatcher(self.ll_tokenizer, llguidance_grammar(spec), log_level=0)
        if template.is_error():
            raise UnsupportedGrammar(f"{spec.kind} grammar not supported: {error_summary(template.get_error())}. "
                                     f"Supported: {SUPPORTED[spec.kind]}")
        return template

    def matcher(self, compiled: Compiled) -> Matcher:
        """A fresh grammar state for one request."""
        return Matcher(compiled.template.deep_copy(), self.permitted, self.tokenizer_ids)


class Matcher:
    """One request's position in its grammar. Not thread-safe: the engine's thread alone uses it."""

    def __init__(self, state: llguidance.LLMatcher, permitted: np.ndarray, tokenizer_ids: int):
        self.state = state
        self.permitted = permitted  # bool [vocab_size], shared, read-only
        self.tokenizer_ids = tokenizer_ids
        # llguidance's mask covers the tokenizer's ids and its end token, 32 a word: token i is bit
        # i % 32 of word i // 32.
        self.bitmask = np.zeros((tokenizer_ids + 1 + 31) // 32, dtype=np.uint32)

    def allowed(self) -> torch.Tensor:
        """bool [vocab_size], on the CPU: the tokens the grammar allows next. Never a stop token
        (the engine adds its own when can_end()); none at all once must_end(). RuntimeError when
        the grammar cannot go on (llguidance's step limits, or text the vocabulary cannot write)."""
        self.state.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        self.raise_if_failed()
        # numpy, not torch: single-threaded microseconds, where torch's thread pool may wait
        # milliseconds for a core on a busy machine.
        little_endian_bytes = self.bitmask.astype("<u4", copy=False).view(np.uint8)
        allowed = np.zeros(len(self.permitted), dtype=bool)
        allowed[:self.tokenizer_ids] = np.unpackbits(little_endian_bytes, bitorder="little")[:self.tokenizer_ids]
        return torch.from_numpy(np.logical_and(allowed, self.permitted, out=allowed))

    def can_end(self) -> bool:
        """The text so far is complete: an end-of-sequence token may come now."""
        return self.state.is_accepting()

    def must_end(self) -> bool:
        """Complete, and nothing may follow: the request should stop now."""
        return self.state.is_stopped()

    def advance(self, token: int) -> None:
        """Consume the sampled token. ValueError, leaving the state as it was, if it was not allowed."""
        # Checked before consuming: llguidance's matcher cannot leave the error state a bad token puts it in.
        permitted = 0 <= token < len(self.permitted) and self.permitted[token]
        if not permitted or self.state.validate_tokens([token]) != 1:
            raise ValueError(f"token {token} is not allowed by the grammar here")
        if not self.state.consume_token(token):
            self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.state.is_error():
            raise RuntimeError(f"grammar matcher failed: {error_summary(self.state.get_error())}")


def llguidance_grammar(spec: GrammarSpec) -> str:
    """spec in llguidance's grammar format. JSON whitespace follows JSON_WHITESPACE around plain `,`
    and `:`, and unsupported schema keywords are errors, whatever a schema's own "x-guidance" asks."""
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if spec.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(parse_schema(spec.source), overrides=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    return llguidance.LLMatcher.grammar_from_lark(spec.source)


def parse_schema(source: str) -> dict | bool:
    try:
        schema = json.loads(source)
    except json.JSONDecodeError as e:
        raise UnsupportedGrammar(f"json_schema is not valid JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise UnsupportedGrammar(f"json_schema must be a JSON object (or true/false), got {type(schema).__name__}")
    return schema


def error_summary(message: str) -> str:
    """llguidance's error on one line: its first line, and the `error:` lines that say what failed
    (the lines between draw the source with carets)."""
    lines = [line.strip() for line in message.strip().splitlines()]
    kept = lines[:1] + [line for line in lines[1:] if line.startswith("error:")]
    return " ".join(kept) or "unknown error"


# --- Vocabulary ------------------------------------------------------------------------------------

def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], set[int]]:
    """Every id's exact bytes as decoding produces them, and the special ids (never text)."""
    if hasattr(tokenizer, "sp"):
        return sentencepiece_token_bytes(tokenizer.sp)
    if hasattr(tokenizer, "tok"):
        return fast_token_bytes(tokenizer.tok, tokenizer.vocab_size)
    raise TypeError(f"{type(tokenizer).__name__} holds neither a SentencePiece model (.sp) nor a `tokenizers` "
                    "tokenizer (.tok): constrained decoding cannot read its vocabulary")


def sentencepiece_token_bytes(sp) -> tuple[list[bytes], set[int]]:
    """A SentencePieceProcessor's pieces as bytes; control, unknown and unused pieces are special."""
    tokens, special = [], set()
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            tokens.append(bytes([int(SENTENCEPIECE_BYTE.fullmatch(piece).group(1), 16)]))
            continue
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            special.add(i)
        tokens.append(piece.replace(SPACE_MARK, " ").encode())
    return tokens, special


def fast_token_bytes(tok, vocab_size: int) -> tuple[list[bytes], set[int]]:
    """A `tokenizers` tokenizer's bytes: the model's pieces read as its decoder reads them, added
    tokens as their text. The unknown piece and ids no token has (gaps) count as special, so that
    they are never allowed."""
    config = json.loads(tok.to_str())
    piece_bytes = piece_decoder(config)
    tokens = [b""] * vocab_size
    special = set(range(vocab_size))
    for piece, i in tok.get_vocab(with_added_tokens=False).items():
        tokens[i] = piece_bytes(piece)
        special.discard(i)
    unk = config["model"].get("unk_token")
    if unk is not None and tok.token_to_id(unk) is not None:
        special.add(tok.token_to_id(unk))
    for i, added in tok.get_added_tokens_decoder().items():
        tokens[i] = added.content.encode()
        if added.special:
            special.add(i)
        else:
            special.discard(i)
    return tokens, special


def piece_decoder(config: dict) -> Callable[[str], bytes]:
    """How a tokenizer.json's decoder turns a model piece into bytes: byte-level BPE maps each
    character to one byte; SentencePiece-style vocabularies have <0xXX> byte pieces and ▁ spaces."""
    kinds = decoder_kinds(config.get("decoder"))
    if "ByteLevel" in kinds:
        byte_of = {char: byte for byte, char in byte_level_alphabet().items()}
        return lambda piece: bytes(byte_of[c] for c in piece)
    if kinds & {"Metaspace", "Replace", "ByteFallback"}:
        byte_fallback = "ByteFallback" in kinds or config["model"].get("byte_fallback", False)
        return lambda piece: sentencepiece_piece_bytes(piece, byte_fallback)
    raise TypeError(f"tokenizer.json decoder {sorted(kinds) or None} is neither byte-level BPE nor "
                    "SentencePiece-style: constrained decoding cannot read its vocabulary")


def decoder_kinds(decoder: dict | None) -> set[str]:
    """The types of a tokenizer.json decoder and of the decoders a Sequence holds."""
    if decoder is None:
        return set()
    kinds = {decoder["type"]}
    for inner in decoder.get("decoders", []):
        kinds |= decoder_kinds(inner)
    return kinds


def sentencepiece_piece_bytes(piece: str, byte_fallback: bool) -> bytes:
    byte = SENTENCEPIECE_BYTE.fullmatch(piece) if byte_fallback else None
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace(SPACE_MARK, " ").encode()


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable Latin-1 bytes stand for themselves, the other bytes
    take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(0x100 + n) for n, b in enumerate(others)}}


class LLGuidanceVocabulary:
    """What llguidance's TokenizerWrapper reads: the token bytes, the special ids, the EOS and BOS
    ids, and a call that tokenizes text."""

    def __init__(self, tokens: list[bytes], special: set[int], eos_token_id: int, tokenizer: Tokenizer):
        self.tokens = tokens
        self.special_token_ids = sorted(special)
        self.special_ids = special
        self.eos_token_id = eos_token_id
        self.bos_token_id = tokenizer.bos_id
        self.tokenizer = tokenizer
        # Later ids win where two tokens have the same bytes: SentencePiece puts its <0xXX> pieces,
        # the model's last resort, before the pieces proper (<0x20> before ▁).
        self.id_of_bytes = {t: i for i, t in enumerate(tokens) if t and i not in special}
        self.longest = max(map(len, self.id_of_bytes))

    def __call__(self, text: str) -> list[int]:
        """Tokens whose bytes are exactly text's: llguidance forces them when the grammar leaves one
        way on. The tokenizer's own when they are; else (a SentencePiece tokenizer adds a ▁ before
        the text, and may merge spaces) the longest tokens first."""
        if not isinstance(text, str):  # TokenizerWrapper tries bytes first, and must learn to send str
            raise TypeError(f"expected str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, bos=False, eos=False)
        if b"".join(self.tokens[i] for i in ids) == text.encode() and not self.special_ids.intersection(ids):
            return ids
        return self.longest_first(text.encode())

    def longest_first(self, data: bytes) -> list[int]:
        """data as the longest tokens that start where the previous one ends; stops short at bytes
        no token has (a vocabulary without byte fallback)."""
        ids, start = [], 0
        while start < len(data):
            for end in range(min(len(data), start + self.longest), start, -1):
                if data[start:end] in self.id_of_bytes:
                    ids.append(self.id_of_bytes[data[start:end]])
                    start = end
                    break
            else:
                return ids
        return ids


def llguidance_tokenizer(tokens: list[bytes], special: set[int], tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer over tokens plus one id of its own, GRAMMAR_END, as its end-of-sequence
    token: so no model token is llguidance's EOS (the engine owns the stop tokens), and a tokenizer
    without an EOS id works too. Special tokens are never matched by text."""
    end = len(tokens)
    vocabulary = LLGuidanceVocabulary([*tokens, GRAMMAR_END], special | {end}, end, tokenizer)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary))


def permitted_tokens(tokenizer_ids: int, stops: set[int], vocab_size: int) -> np.ndarray:
    """bool [vocab_size]: the ids a grammar may ever allow. Not the stop tokens (the engine's
    decision), nor the ids past the tokenizer's (a padded embedding: they have no text)."""
    permitted = np.zeros(vocab_size, dtype=bool)
    permitted[:tokenizer_ids] = True
    permitted[sorted(i for i in stops if i < vocab_size)] = False
    return permitted
