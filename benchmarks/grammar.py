"""Grammar libraries for constrained decoding, at a real vocabulary: llguidance (behind
llama_int8.grammar) and xgrammar, each where installed. By default the vocabulary is SmolLM2-135M's
byte-level BPE (49152 tokens), read from the demo GGUF.

    python -m benchmarks.grammar
    python -m benchmarks.grammar --libraries llguidance --runs 20 --json
    python -m benchmarks.grammar --tokenizer_path tokenizer.json    # or tokenizer.model, or --gguf file

Per library: the one-off vocabulary setup; the compile time of a JSON schema (median over runs, no
cache); the time to compute the allowed-token bitmask at each step while a document valid under the
schema is replayed token by token: the mean over the first replay (llguidance builds its lexer
states lazily, as requests come) and the median and slowest step over the later ones; for
llguidance also `Matcher.allowed()`, the bool tensor the engine reads; and whether a schema keyword
the library cannot enforce (uniqueItems) is refused or silently dropped.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json as jsonlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import fire

from benchmarks.common import report
from llama_int8.tokenizer import Tokenizer

SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["id", "customer", "items", "status"],
    "properties": {
        "id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {"type": "object", "additionalProperties": False, "required": ["name", "email"],
                     "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 40},
                                    "email": {"type": "string", "format": "email"},
                                    "vip": {"type": "boolean"}}},
        "items": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
            "type": "object", "additionalProperties": False, "required": ["sku", "quantity", "price"],
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                           "price": {"type": "number", "exclusiveMinimum": 0}}}},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "note": {"anyOf": [{"type": "string", "maxLength": 200}, {"type": "null"}]},
    },
}
DOCUMENT = {"id": "ORD-004217", "customer": {"name": "Ada Lovelace", "email": "ada@example.org", "vip": True},
            "items": [{"sku": "ABC-1234", "quantity": 2, "price": 19.99},
                      {"sku": "XYZ-0042", "quantity": 1, "price": 250}],
            "status": "paid", "note": "Leave the parcel at the door, please."}
UNENFORCEABLE = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}


def load_vocabulary(gguf: str | None, tokenizer_path: str | None) -> tuple[Tokenizer, str]:
    """The tokenizer to measure at, and its name: a tokenizer file, a GGUF's, or the demo GGUF's."""
    if tokenizer_path is not None:
        from llama_int8.tokenizer import load_tokenizer

        return load_tokenizer(Path(tokenizer_path)), Path(tokenizer_path).name
    from llama_int8.demo import demo_gguf_path
    from llama_int8.formats.gguf_file import GGUFCheckpoint

    path = Path(gguf) if gguf is not None else demo_gguf_path()
    return GGUFCheckpoint(path).tokenizer(), path.name


def measure_llguidance(tokenizer: Tokenizer, document: list[int], runs: int, threads: int) -> dict:
    from llama_int8.grammar import Grammars, GrammarSpec, UnsupportedGrammar

    setup, grammars = timed(lambda: Grammars(tokenizer, tokenizer.vocab_size))
    spec = GrammarSpec("json_schema", jsonlib.dumps(SCHEMA))
    compile_s = statistics.median(timed(lambda: grammars.build_template(spec))[0] for _ in range(runs))
    compiled = grammars.compile(spec)

    def replay(read_mask: Callable) -> list[list[float]]:
        replays = []
        for _ in range(runs):
            matcher = grammars.matcher(compiled)
            replays.append(replay_steps(partial(read_mask, matcher), matcher.advance, document))
        return replays

    # The bitmask alone (comparable with xgrammar's), then allowed() as the engine calls it.
    bitmask = replay(lambda m: m.state.unsafe_compute_mask_ptr(m.bitmask.ctypes.data, m.bitmask.nbytes))
    allowed = replay(lambda m: m.allowed())
    try:
        grammars.compile(GrammarSpec("json_schema", jsonlib.dumps(UNENFORCEABLE)))
        unenforceable = "dropped silently"
    except UnsupportedGrammar:
        unenforceable = "refused"
    return {"setup s": setup, "compile ms": compile_s * 1e3, **step_figures(bitmask),
            "allowed() µs/step": statistics.median(s for r in allowed[1:] for s in r) * 1e6,
            "uniqueItems": unenforceable}


def measure_xgrammar(tokenizer: Tokenizer, document: list[int], runs: int, threads: int) -> dict:
    import xgrammar

    from llama_int8.grammar import token_bytes

    tokens, special = token_bytes(tokenizer)
    vocabulary = [b"" if i in special else t for i, t in enumerate(tokens)]  # xgrammar: empty = special

    def make_compiler():
        info = xgrammar.TokenizerInfo(vocabulary, xgrammar.VocabType.RAW, vocab_size=len(vocabulary),
                                      stop_token_ids=sorted(tokenizer.stop_ids))
        return xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)

    setup, compiler = timed(make_compiler)
    schema = jsonlib.dumps(SCHEMA)
    compile_s = statistics.median(timed(lambda: compiler.compile_json_schema(schema))[0] for _ in range(runs))
    compiled = compiler.compile_json_schema(schema)
    bitmask = xgrammar.allocate_token_bitmask(1, len(vocabulary))
    replays = []
    for _ in range(runs):
        matcher = xgrammar.GrammarMatcher(compiled)
        replays.append(replay_steps(partial(matcher.fill_next_token_bitmask, bitmask),
                                    partial(accept_or_raise, matcher), document))
    try:
        compiler.compile_json_schema(jsonlib.dumps(UNENFORCEABLE))
        unenforceable = "dropped silently"
    except Exception:  # xgrammar raises RuntimeError or its own InvalidJSONError subclasses
        unenforceable = "refused"
    return {"setup s": setup, "compile ms": compile_s * 1e3, **step_figures(replays), "allowed() µs/step": None,
            "uniqueItems": unenforceable}


LIBRARIES: dict[str, Callable[[Tokenizer, list[int], int, int], dict]] = {
    "llguidance": measure_llguidance, "xgrammar": measure_xgrammar}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def replay_steps(mask: Callable[[], object], accept: Callable[[int], None], document: list[int]) -> list[float]:
    """The seconds mask() takes before each token of document, which accept() then consumes."""
    seconds = []
    for token in document:
        start = time.perf_counter()
        mask()
        seconds.append(time.perf_counter() - start)
        accept(token)
    return seconds


def accept_or_raise(xgrammar_matcher, token: int) -> None:
    if not xgrammar_matcher.accept_token(token):
        raise RuntimeError(f"xgrammar refused token {token} of the benchmark's document")


def step_figures(replays: list[list[float]]) -> dict:
    """The first replay's mean step, and the median and slowest step of the later replays, in µs."""
    later = [s for replay in replays[1:] for s in replay] or replays[0]
    return {"first request µs/step": statistics.mean(replays[0]) * 1e6,
            "mask µs/step": statistics.median(later) * 1e6, "slowest step µs": max(later) * 1e6}


def license_of(distribution: str) -> str:
    meta = importlib.metadata.metadata(distribution)
    return meta.get("License-Expression") or meta.get("License") or "?"


def comma_list(value: str | tuple) -> list[str]:
    """fire passes "a,b" as a tuple and "a" as a string."""
    return [v for v in (value.split(",") if isinstance(value, str) else map(str, value)) if v]


def main(libraries: str | tuple = "llguidance,xgrammar", gguf: str | None = None, tokenizer_path: str | None = None,
         runs: int = 10, threads: int = os.cpu_count() or 1, json: bool = False) -> None:
    """libraries: comma-separated, those not installed are skipped; runs: compiles and replays per
    library (at least 2: the first replay is reported apart); threads: xgrammar's compile threads."""
    tokenizer, vocabulary_name = load_vocabulary(gguf, tokenizer_path)
    document = tokenizer.encode(jsonlib.dumps(DOCUMENT), bos=False, eos=False)
    rows = []
    for name in comma_list(libraries):
        if name not in LIBRARIES:
            raise ValueError(f"--libraries: {name!r} is not one of {sorted(LIBRARIES)}")
        if importlib.util.find_spec(name) is None:
            print(f"{name} is not installed: skipped", file=sys.stderr)
            continue
        figures = LIBRARIES[name](tokenizer, document, max(runs, 2), threads)
        rows.append({"library": name, "version": importlib.metadata.version(name), "license": license_of(name),
                     **figures})
    report(f"Constrained decoding at {vocabulary_name} ({tokenizer.vocab_size} tokens), a JSON schema, "
           f"{len(document)}-token document", rows, json, {"runs": runs, "xgrammar_threads": threads})


if __name__ == "__main__":
    fire.Fire(main)
