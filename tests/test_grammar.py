"""Constrained decoding: random walks through the allowed tokens of real tokenizers always give text
that the grammar's reference accepts (jsonschema for JSON schemas, json for any object, Python's re
for regexes); masks never hold stop tokens or ids past the tokenizer; unsupported schemas are refused."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import jsonschema
import pytest
import torch

from conftest import CORPUS
from llama_int8.formats.gguf_file import (BYTE, CONTROL, GGUFCheckpoint, GGUFTokenizer, add_special_tokens,
                                          sentencepiece_bpe)
from llama_int8.grammar import GrammarSpec, Grammars, Matcher, UnsupportedGrammar, token_bytes
from llama_int8.tokenizer import SentencePieceTokenizer, Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PADDING = 64  # the model's embedding rows past the tokenizer's ids, which no mask may allow

SCHEMAS = {
    "nested_objects": {
        "type": "object", "additionalProperties": False, "required": ["user"],
        "properties": {"user": {
            "type": "object", "additionalProperties": False, "required": ["name", "address"],
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                            "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 10},
                                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}}},
    "array_with_bounds": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                          "minItems": 2, "maxItems": 4},
    "enums": {"type": "object", "additionalProperties": False, "required": ["color", "size"],
              "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3, None]}}},
    "required_and_optional": {"type": "object", "required": ["id", "ok"],  # additional properties: any JSON
                              "properties": {"id": {"type": "integer"}, "note": {"type": "string", "maxLength": 8},
                                             "ok": {"type": "boolean"}}},
    "bounded_numbers": {
        "type": "object", "additionalProperties": False, "required": ["price", "count", "ratio"],
        "properties": {"price": {"type": "number", "minimum": 0, "exclusiveMaximum": 100},
                       "count": {"type": "integer", "minimum": 1, "maximum": 999},
                       "ratio": {"type": "number", "minimum": -1, "maximum": 1}}},
    "patterns_and_any_of": {
        "type": "object", "additionalProperties": False, "required": ["code", "tags"],
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                       "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 5},
                                "maxItems": 3},
                       "value": {"anyOf": [{"type": "string", "maxLength": 4},
                                           {"type": "integer", "minimum": 0, "maximum": 9}]}}},
}

# Once a walk is this long it heads for the end: closing tokens first, and it stops once it may.
SOFT_LIMIT = 40
HARD_LIMIT = 400
CLOSING_TEXTS = (b'"', b"}", b"]", b",")  # by preference


# --- Tokenizers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf) -> Tokenizer:
    """SmolLM2's byte-level BPE (49152 ids), rebuilt from its GGUF."""
    return GGUFCheckpoint(smollm2_gguf).tokenizer()


@pytest.fixture(scope="module")
def sp_byte_model(tmp_path_factory):
    """A SentencePiece BPE model with byte fallback: any byte can be written, in <0xXX> pieces."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp-bytes")
    lines = CORPUS.split(". ")[:8] + [json.dumps({"name": "Paris", "tags": ["a", "b"], "n": 12.5}),
                                      '{"ok": true, "value": null}']
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return folder / "tokenizer.model"


def sentencepiece_style_tokenizer_json(sp_model) -> GGUFTokenizer:
    """A SentencePiece vocabulary as a `tokenizers` tokenizer (<0xXX> byte pieces, ▁ spaces), as the
    project builds it from a GGUF of a Llama-2-style model."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sp_model))
    ids = range(sp.vocab_size())
    tokens = [sp.id_to_piece(i) for i in ids]
    unknown, normal = 2, 1  # llama.cpp's token types, beside CONTROL and BYTE
    types = [CONTROL if sp.is_control(i) else unknown if sp.is_unknown(i) else BYTE if sp.is_byte(i) else normal
             for i in ids]
    tok = sentencepiece_bpe(tokens, [sp.get_score(i) for i in ids], types, add_space_prefix=True)
    add_special_tokens(tok, tokens, types)
    return GGUFTokenizer(tok, tokens, types, sp.bos_id(), sp.eos_id(), add_bos=True, chat_template=None)


@dataclass
class Constrained:
    """A tokenizer and its Grammars, as an engine holds them, for a model padded past the tokenizer,
    with the token classes random walks use (bool [vocab] each)."""

    tokenizer: Tokenizer
    grammars: Grammars
    whitespace: torch.Tensor  # tokens of whitespace only
    closing: list[torch.Tensor]  # per CLOSING_TEXTS entry: the tokens that are it, spaces aside

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> Constrained:
        tokens, _ = token_bytes(tokenizer)
        return cls(tokenizer, Grammars(tokenizer, tokenizer.vocab_size + PADDING),
                   token_class(tokens, lambda t: t != b"" and t.strip() == b""),
                   [token_class(tokens, lambda t, c=c: t.strip() == c) for c in CLOSING_TEXTS])


def token_class(tokens: list[bytes], member: Callable[[bytes], bool]) -> torch.Tensor:
    mask = torch.zeros(len(tokens) + PADDING, dtype=torch.bool)
    mask[[i for i, t in enumerate(tokens) if member(t)]] = True
    return mask


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer) -> Constrained:
    return Constrained.of(smollm2_tokenizer)


@pytest.fixture(scope="module", params=["smollm2_byte_level", "sentencepiece", "sentencepiece_tokenizer_json"])
def any_json(request, sp_byte_model) -> Constrained:
    """Each kind of tokenizer the project reads, all able to write any JSON."""
    if request.param == "smollm2_byte_level":
        return request.getfixturevalue("smollm2")
    if request.param == "sentencepiece":
        return Constrained.of(SentencePieceTokenizer(sp_byte_model))
    return Constrained.of(sentencepiece_style_tokenizer_json(sp_byte_model))


# --- Random walks ------------------------------------------------------------------------------------

def random_walk(setup: Constrained, spec: GrammarSpec, seed: int) -> str:
    """Text from tokens drawn at random among the allowed ones until the grammar must end (or, past
    SOFT_LIMIT, may end), checking every mask on the way."""
    tokenizer = setup.tokenizer
    matcher = setup.grammars.matcher(setup.grammars.compile(spec))
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    while not matcher.must_end():
        allowed = matcher.allowed()
        assert_mask_keeps_out_stops_and_padding(allowed, tokenizer)
        if len(ids) >= SOFT_LIMIT and matcher.can_end():
            break
        assert len(ids) < HARD_LIMIT, f"no end in sight: {tokenizer.decode(ids)!r}"
        assert allowed.any(), f"nothing allowed after {tokenizer.decode(ids)!r}"
        token = draw(setup, allowed, heading_for_the_end=len(ids) >= SOFT_LIMIT, generator=generator)
        matcher.advance(token)
        ids.append(token)
    assert matcher.can_end()
    return tokenizer.decode(ids)


def draw(setup: Constrained, allowed: torch.Tensor, heading_for_the_end: bool, generator: torch.Generator) -> int:
    """A random allowed token: a closing one when heading for the end and one is allowed; else
    whitespace only one time in four (most of a vocabulary's tokens that JSON allows between
    values are whitespace: walks would be little else)."""
    choices = allowed
    if heading_for_the_end:
        choices = next((allowed & c for c in setup.closing if (allowed & c).any()), allowed)
    elif (allowed & ~setup.whitespace).any() and torch.rand(1, generator=generator).item() < 0.75:
        choices = allowed & ~setup.whitespace
    candidates = choices.nonzero()[:, 0]
    return candidates[torch.randint(len(candidates), (1,), generator=generator)].item()


def assert_mask_keeps_out_stops_and_padding(allowed: torch.Tensor, tokenizer: Tokenizer) -> None:
    assert allowed.dtype == torch.bool and allowed.shape == (tokenizer.vocab_size + PADDING,)
    assert not allowed[tokenizer.vocab_size:].any()
    assert not allowed[sorted(tokenizer.stop_ids | {tokenizer.eos_id})].any()


def feed(setup: Constrained, spec: GrammarSpec, text: str) -> Matcher:
    """A matcher after the tokens of text, as the tokenizer encodes it."""
    matcher = setup.grammars.matcher(setup.grammars.compile(spec))
    for token in setup.tokenizer.encode(text, bos=False, eos=False):
        matcher.advance(token)
    return matcher


# --- JSON ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEMAS)
def test_random_walks_validate_against_the_schema(any_json, name):
    schema = SCHEMAS[name]
    spec = GrammarSpec("json_schema", json.dumps(schema))
    for seed in range(3):
        text = random_walk(any_json, spec, seed)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_walks_give_objects(any_json):
    for seed in range(4):
        text = random_walk(any_json, GrammarSpec("json_object", ""), seed)
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("indent", [None, 2, 4])
def test_compact_and_pretty_json_are_accepted_and_end_the_request(smollm2, indent):
    document = {"a": [1, 2.5, {"b": None}], "c": "x y", "d": {"e": True}}
    separators = (",", ":") if indent is None else None
    text = json.dumps(document, indent=indent, separators=separators)
    matcher = feed(smollm2, GrammarSpec("json_object", ""), text)
    assert matcher.must_end() and matcher.can_end()
    assert not matcher.allowed().any()


def test_whitespace_cannot_run_forever(smollm2):
    """After `{`, taking only whitespace tokens, the grammar soon allows no more whitespace."""
    matcher = feed(smollm2, GrammarSpec("json_object", ""), "{")
    for _ in range(50):
        spaces = (matcher.allowed() & smollm2.whitespace).nonzero()[:, 0]
        if len(spaces) == 0:
            break
        matcher.advance(spaces[-1].item())  # the longest whitespace tokens come late in a BPE vocabulary
    else:
        pytest.fail("whitespace was still allowed after 50 whitespace tokens")
    assert not matcher.can_end()


def test_json_outside_the_whitespace_bound_is_refused(smollm2):
    for text in [" {}", '{"a": 1} ', "{" + " " * 9 + '"a": 1}', '{\n\n"a": 1}', "[1]"]:
        with pytest.raises(ValueError, match="not allowed"):
            feed(smollm2, GrammarSpec("json_object", ""), text)


def test_a_schema_cannot_loosen_the_whitespace_bound(smollm2):
    loose = {"type": "array", "x-guidance": {"item_separator": "\\s*,\\s*", "whitespace_pattern": "\\s+"}}
    spec = GrammarSpec("json_schema", json.dumps(loose))
    assert feed(smollm2, spec, "[1, 2]").must_end()
    with pytest.raises(ValueError, match="not allowed"):
        feed(smollm2, spec, "[1" + " " * 30 + ",2]")


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "string", "format": "color-hex"}, "color-hex"),
    ({"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}, "uniqueItems"),  # no way around it
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
])
def test_unsupported_schema_is_refused_naming_the_feature(smollm2, schema, keyword):
    with pytest.raises(UnsupportedGrammar, match=re.escape(keyword)) as refused:
        smollm2.grammars.compile(GrammarSpec("json_schema", json.dumps(schema)))
    assert "Supported: type, enum" in str(refused.value)


@pytest.mark.parametrize("spec", [GrammarSpec("json_schema", "{"), GrammarSpec("json_schema", "[1]"),
                                  GrammarSpec("regex", "(a"), GrammarSpec("lark", "start: undefined_rule")])
def test_malformed_grammars_are_refused(smollm2, spec):
    with pytest.raises(UnsupportedGrammar, match=spec.kind):
        smollm2.grammars.compile(spec)


def test_unknown_grammar_kind_is_refused():
    with pytest.raises(UnsupportedGrammar, match="'xml' is not supported"):
        GrammarSpec("xml", "<a/>")


# --- Regex and Lark ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", r"(yes|no|maybe)", r"[0-9]{3}-[0-9]{4}",
                                     r"[αβγ]{1,3}!", r"(ab|cd)+e?"])
def test_regex_walks_fullmatch(smollm2, pattern):
    for seed in range(3):
        text = random_walk(smollm2, GrammarSpec("regex", pattern), seed)
        assert re.fullmatch(pattern, text), text


def test_regex_walks_fullmatch_on_a_sentencepiece_model(sp_model):
    """The 128-piece model of conftest, no byte fallback: the walk spells words from its pieces."""
    pattern = r"(quick|lazy) (fox|dog)( and (fox|dog)){0,2}"
    setup = Constrained.of(SentencePieceTokenizer(sp_model))
    for seed in range(3):
        text = random_walk(setup, GrammarSpec("regex", pattern), seed)
        assert re.fullmatch(pattern, text), text


def test_lark_walks_follow_the_grammar(smollm2):
    grammar = 'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[a-z]{2,6}/'
    for seed in range(3):
        text = random_walk(smollm2, GrammarSpec("lark", grammar), seed)
        assert re.fullmatch(r"(hello|hi) [a-z]{2,6}!", text), text


def test_can_end_and_must_end(smollm2):
    spec = GrammarSpec("regex", "a+b?")
    matcher = feed(smollm2, spec, "")
    assert not matcher.can_end() and not matcher.must_end()
    matcher = feed(smollm2, spec, "a")
    assert matcher.can_end() and not matcher.must_end()
    matcher = feed(smollm2, spec, "ab")
    assert matcher.can_end() and matcher.must_end()
    assert not matcher.allowed().any()


# --- Masks and advance -----------------------------------------------------------------------------------

def test_advance_refuses_tokens_outside_the_mask_and_keeps_its_state(smollm2):
    tokenizer = smollm2.tokenizer
    matcher = feed(smollm2, GrammarSpec("json_object", ""), "")
    allowed = matcher.allowed()
    past_tokenizer = tokenizer.vocab_size
    for token in [tokenizer.token_id("x"), tokenizer.eos_id, *tokenizer.stop_ids, past_tokenizer, -1,
                  past_tokenizer + PADDING]:
        assert not 0 <= token < len(allowed) or not allowed[token]
        with pytest.raises(ValueError, match=f"token {token} is not allowed"):
            matcher.advance(token)
    for token in tokenizer.encode("{}", bos=False, eos=False):  # the refusals changed nothing
        matcher.advance(token)
    assert matcher.must_end()


def test_special_tokens_are_never_text(smollm2):
    """<|im_start|> is not the characters `<|im_start|>`, which a regex may well allow."""
    allowed = feed(smollm2, GrammarSpec("regex", r"[<|a-z_>]+"), "").allowed()
    assert allowed[smollm2.tokenizer.token_id("<")]
    assert not allowed[smollm2.tokenizer.token_id("<|im_start|>")]


def test_byte_level_token_bytes_decode_as_the_tokenizer_does(smollm2_tokenizer):
    tokens, special = token_bytes(smollm2_tokenizer)
    texts = smollm2_tokenizer.tok.decode_batch([[i] for i in range(len(tokens))], skip_special_tokens=False)
    mismatched = [i for i, (b, text) in enumerate(zip(tokens, texts, strict=True))
                  if i not in special and b.decode(errors="replace") != text]
    assert mismatched == []
    assert special == {i for i, t in smollm2_tokenizer.tok.get_added_tokens_decoder().items() if t.special}


def test_sentencepiece_tokenizer_json_has_the_sentencepiece_model_bytes(sp_byte_model):
    """The same vocabulary read from a SentencePiece model and from its tokenizers rebuild."""
    model_bytes, model_special = token_bytes(SentencePieceTokenizer(sp_byte_model))
    json_bytes, json_special = token_bytes(sentencepiece_style_tokenizer_json(sp_byte_model))
    assert json_bytes == model_bytes and json_special == model_special
    assert bytes(range(256)) == b"".join(model_bytes[3:259])  # <0x00>..<0xFF> after <unk>, <s>, </s>


def test_compiled_grammars_are_cached_and_the_cache_is_bounded(smollm2_tokenizer):
    grammars = Grammars(smollm2_tokenizer, smollm2_tokenizer.vocab_size)
    first = grammars.compile(GrammarSpec("regex", "a0"))
    assert grammars.compile(GrammarSpec("regex", "a0")) is first
    for i in range(1, 65):
        grammars.compile(GrammarSpec("regex", f"a{i}"))
    assert grammars.compile(GrammarSpec("regex", "a0")) is not first


def test_vocab_smaller_than_the_tokenizer_is_refused(sp_model):
    tokenizer = SentencePieceTokenizer(sp_model)
    with pytest.raises(ValueError, match="smaller than the tokenizer's 128 ids"):
        Grammars(tokenizer, 100)
