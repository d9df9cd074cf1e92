"""Tool calls in a model's answer, as OpenAI's API returns them, for the formats this engine's families
were trained to write:

- llama3_json (Llama 3.1/3.2): the answer is a JSON object {"name", "parameters"} ("arguments" also
  taken), after an optional <|python_tag|>; several calls are separated by ";".
- pythonic (Llama 3.2's lightweight models): the answer is a list of calls with keyword arguments in
  Python literals, `[get_weather(city="Paris"), get_time()]`; read with `ast`, never evaluated.
- hermes (Qwen2.5, Hermes, many fine-tunes): `<tool_call>{"name", "arguments"}</tool_call>` blocks,
  after optional text.
- mistral: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"}, or (newer tokenizers)
  `[TOOL_CALLS]name[ARGS]{...}`.

A format reads an answer in one pass: the text before its calls is content, each call that parses is a
call, and what it cannot read (malformed JSON, text after the calls) is content again, never dropped.
A call once read stays read whatever text follows it, so the same reader serves streaming:
StreamingToolParser re-reads the growing answer and sends each call as soon as its text is complete.
Arguments are re-serialized (json.dumps), so a prefix of the model's text is not a prefix of them:
a streamed call's arguments come in one fragment, when the call's text is complete.

The markers are special tokens in some vocabularies: the answer must be decoded with them kept.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

PYTHON_TAG = "<|python_tag|>"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
MISTRAL_NAME = re.compile(r"[\w.-]+")
WHITESPACE = re.compile(r"\s*")
JSON_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object (json.dumps, ensure_ascii=False)

    def openai(self, id: str) -> dict[str, Any]:
        """The call as an OpenAI message's `tool_calls` entry."""
        return {"id": id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    """A fresh call id in OpenAI's shape: "call_" and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


# --- Reading calls ------------------------------------------------------------------------------------

def tool_call_from_object(value: Any) -> ToolCall | None:
    """The call a decoded {"name", "arguments" | "parameters"} object describes; None if it is none."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some fine-tunes write the arguments as JSON text, as OpenAI sends them
        arguments = json_or_none(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def json_value_at(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON value that begins at text[pos] and where it ends; None while it is unfinished or invalid."""
    try:
        return JSON_DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the interpreter's stack
        return None


def json_or_none(text: str) -> Any:
    """text decoded as JSON; None if it is not JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def skip_whitespace(text: str, pos: int) -> int:
    return WHITESPACE.match(text, pos).end()


class ToolCallFormat(ABC):
    """How one family writes its calls: where they begin, and how they read."""

    markers: tuple[str, ...] = ()  # text that begins the calls wherever it appears
    # How an answer made of calls begins (after whitespace), when it needs no marker; group 1 matched:
    # it surely is calls. None: calls begin at a marker only.
    opening: re.Pattern[str] | None = None

    def opens_calls(self, text: str, pos: int) -> bool:
        """Whether text, from pos on, begins calls or may still (while it is a prefix of such a beginning)."""
        match = self.opening.match(text, pos) if self.opening is not None else None
        return match is not None and (match.group(1) is not None or match.end() == len(text))

    @abstractmethod
    def read_calls(self, section: str) -> tuple[list[ToolCall], list[str]]:
        """The calls of section (the answer from where its calls begin), and the text in it that is
        content. Only a call whose text is complete is read, so more text never changes one."""


class Llama3JsonFormat(ToolCallFormat):
    markers = (PYTHON_TAG,)
    opening = re.compile(r'\{\s*(")?')

    def read_calls(self, section: str) -> tuple[list[ToolCall], list[str]]:
        pos = len(PYTHON_TAG) if section.startswith(PYTHON_TAG) else 0
        calls: list[ToolCall] = []
        while True:
            pos = skip_whitespace(section, pos)
            decoded = json_value_at(section, pos)
            call = tool_call_from_object(decoded[0]) if decoded is not None else None
            if call is None:
                return calls, [section[pos:]]
            calls.append(call)
            pos = skip_whitespace(section, decoded[1])
            if not section.startswith(";", pos):
                return calls, [section[pos:]]
            pos += 1


class PythonicFormat(ToolCallFormat):
    opening = re.compile(r"\[\s*(?:[A-Za-z_][\w.]*\s*(\()?)?")

    def read_calls(self, section: str) -> tuple[list[ToolCall], list[str]]:
        # The list ends at the first "]" up to which the text parses: a "]" inside a string or a nested
        # list leaves the text before it unbalanced.
        for bracket in re.finditer(r"\]", section):
            end = bracket.end()
            try:
                tree = ast.parse(section[:end], mode="eval")
            except (SyntaxError, ValueError, RecursionError, MemoryError):  # MemoryError: too deeply nested
                continue
            calls = tool_calls_from_python_list(tree.body)
            return (calls, [section[end:]]) if calls is not None else ([], [section])
        return [], [section]


def tool_calls_from_python_list(node: ast.expr) -> list[ToolCall] | None:
    """The calls of a parsed `[f(a=1), g(b="x")]`; None unless it is a non-empty list of such calls."""
    if not isinstance(node, ast.List) or not node.elts:
        return None
    calls = [tool_call_from_python(element) for element in node.elts]
    return None if None in calls else calls


def tool_call_from_python(node: ast.expr) -> ToolCall | None:
    """A parsed `name(keyword=literal, ...)` as a call; None for positional or non-literal arguments."""
    name = dotted_name(node.func) if isinstance(node, ast.Call) else None
    if name is None or node.args or any(keyword.arg is None for keyword in node.keywords):
        return None
    try:
        arguments = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False))
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):  # TypeError: a set, bytes...
        return None


def dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = dotted_name(node.value)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


class HermesFormat(ToolCallFormat):
    markers = (HERMES_OPEN,)

    def read_calls(self, section: str) -> tuple[list[ToolCall], list[str]]:
        calls: list[ToolCall] = []
        content: list[str] = []
        pos = 0
        while (begin := section.find(HERMES_OPEN, pos)) >= 0:
            content.append(section[pos:begin])
            body = skip_whitespace(section, begin + len(HERMES_OPEN))
            decoded = json_value_at(section, body)
            call = tool_call_from_object(decoded[0]) if decoded is not None else None
            if call is not None:
                calls.append(call)
                pos = skip_whitespace(section, decoded[1])
                # A model that stops at its end-of-turn token may leave the last block unclosed.
                pos += len(HERMES_CLOSE) if section.startswith(HERMES_CLOSE, pos) else 0
            else:
                close = section.find(HERMES_CLOSE, body)
                pos = len(section) if close < 0 else close + len(HERMES_CLOSE)
                content.append(section[begin:pos])
        content.append(section[pos:])
        return calls, content


class MistralFormat(ToolCallFormat):
    markers = (MISTRAL_CALLS,)

    def read_calls(self, section: str) -> tuple[list[ToolCall], list[str]]:
        calls: list[ToolCall] = []
        pos = 0
        while section.startswith(MISTRAL_CALLS, pos):
            after = skip_whitespace(section, pos + len(MISTRAL_CALLS))
            read = (mistral_call_list(section, after) if section.startswith("[", after)
                    else mistral_named_call(section, after))
            if read is None:
                break
            calls += read[0]
            pos = skip_whitespace(section, read[1])
        return calls, [section[pos:]]


def mistral_call_list(text: str, pos: int) -> tuple[list[ToolCall], int] | None:
    """The calls of the JSON list `[{"name", "arguments"}, ...]` at text[pos], and where it ends."""
    decoded = json_value_at(text, pos)
    if decoded is None or not isinstance(decoded[0], list) or not decoded[0]:
        return None
    calls = [tool_call_from_object(value) for value in decoded[0]]
    return None if None in calls else (calls, decoded[1])


def mistral_named_call(text: str, pos: int) -> tuple[list[ToolCall], int] | None:
    """The call `name[ARGS]{...}` at text[pos], and where it ends."""
    args = text.find(MISTRAL_ARGS, pos)
    name = text[pos:args].strip() if args >= 0 else ""
    if not MISTRAL_NAME.fullmatch(name):
        return None
    decoded = json_value_at(text, skip_whitespace(text, args + len(MISTRAL_ARGS)))
    if decoded is None or not isinstance(decoded[0], dict):
        return None
    return [ToolCall(name, json.dumps(decoded[0], ensure_ascii=False))], decoded[1]


PARSERS: dict[str, type[ToolCallFormat]] = {
    "llama3_json": Llama3JsonFormat,
    "pythonic": PythonicFormat,
    "hermes": HermesFormat,
    "mistral": MistralFormat,
}


def tool_call_format(parser: str) -> ToolCallFormat:
    if parser not in PARSERS:
        raise ValueError(f"tool call parser {parser!r}: expected one of {', '.join(PARSERS)}")
    return PARSERS[parser]()


# --- Whole answers ------------------------------------------------------------------------------------

def calls_start(form: ToolCallFormat, text: str, since: int = 0) -> int | None:
    """Where the calls of an answer begin: at its beginning if that opens calls (or may still), else at
    the first marker at or after since; None if nowhere (yet)."""
    first = skip_whitespace(text, 0)
    if form.opens_calls(text, first):
        return first
    found = [i for i in (text.find(marker, since) for marker in form.markers) if i >= 0]
    return min(found, default=None)


def read_answer(form: ToolCallFormat, text: str) -> tuple[str | None, list[ToolCall]]:
    start = calls_start(form, text)
    calls, rest = form.read_calls(text[start:]) if start is not None else ([], [])
    if not calls:
        return text, []
    # Whitespace that separated text from the calls goes with them; the text before them is kept as
    # it came, which is what a stream showed of it.
    pieces = [text[:start].rstrip(), *(piece.strip() for piece in rest)]
    return "\n".join(piece for piece in pieces if piece) or None, calls


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(the answer's content outside its calls, or None if there is none; its calls), for a parser of
    PARSERS. An answer without a call, or whose calls do not parse, is all content: (text, [])."""
    return read_answer(tool_call_format(parser), text)


def parser_for_template(chat_template: str | None) -> str | None:
    """The parser for the calls a chat template teaches its model to write, found from the markers its
    text shows; None when it shows no tool format."""
    if chat_template is None:
        return None
    for parser, marker in TEMPLATE_MARKERS:
        if marker.search(chat_template):
            return parser
    return None


# Checked in order: a pythonic template may also name <|python_tag|>. The pythonic one is known by
# the example call its instructions show, such as `[func_name1(param1=value1, ...)]`.
TEMPLATE_MARKERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("hermes", re.compile(re.escape(HERMES_OPEN))),
    ("mistral", re.compile(re.escape(MISTRAL_CALLS))),
    ("pythonic", re.compile(r"\[\s*[A-Za-z_]\w*\(\s*[A-Za-z_]\w*\s*=")),
    ("llama3_json", re.compile(re.escape(PYTHON_TAG))),
)


# --- Streamed answers ---------------------------------------------------------------------------------

class StreamingToolParser:
    """An answer's text deltas in, what to stream out: content as soon as it cannot be the beginning
    of a call, and OpenAI `delta.tool_calls` entries as soon as each call's text is complete.

    The content streamed, and the calls with their arguments' fragments joined, end up the same as
    parse_tool_calls on the whole answer (content None streams as nothing)."""

    def __init__(self, parser: str):
        self.format = tool_call_format(parser)
        self.text = ""
        self.shown = 0  # text[:shown] has been streamed as content
        self.sent = 0  # calls streamed so far

    def push(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """(content safe to show now, `delta.tool_calls` entries of the calls delta completes)."""
        self.text += delta
        # Found again each time, cheaply (nothing before shown can begin calls): an answer that may have
        # begun with calls can turn out not to.
        start = calls_start(self.format, self.text, since=self.shown)
        if start is None:
            return self.release(self.content_end()), []
        content = self.release(self.shown + len(self.text[self.shown:start].rstrip()))
        calls, _ = self.format.read_calls(self.text[start:])
        return content, self.call_deltas(calls)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The content and calls left at the end of the answer: held-back text that turned out to be
        content, malformed calls (as content), calls closed by the end of the text."""
        content, calls = read_answer(self.format, self.text)
        return (content or "")[self.shown:], self.call_deltas(calls)

    def content_end(self) -> int:
        """Where the text that is surely content ends: before a tail that may begin a marker, and
        before trailing whitespace (dropped if calls follow it)."""
        end = len(self.text) - max((longest_prefix_at_end(self.text, m) for m in self.format.markers), default=0)
        return self.shown + len(self.text[self.shown:end].rstrip())

    def release(self, end: int) -> str:
        content, self.shown = self.text[self.shown:end], end
        return content

    def call_deltas(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """The entries that stream calls not streamed yet: for each, one naming it (arguments "") and
        one carrying its arguments."""
        deltas = []
        for index, call in enumerate(calls[self.sent:], start=self.sent):
            deltas.append({"index": index, "id": new_call_id(), "type": "function",
                           "function": {"name": call.name, "arguments": ""}})
            deltas.append({"index": index, "function": {"arguments": call.arguments}})
        self.sent = max(self.sent, len(calls))
        return deltas


def longest_prefix_at_end(text: str, marker: str) -> int:
    """The length of the longest proper prefix of marker that text ends with."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
