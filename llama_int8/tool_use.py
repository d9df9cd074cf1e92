"""Tool use over the OpenAI API: what a chat's `tools` and `tool_choice` ask of its prompt and of the
engine, and what the model's answer becomes (an assistant message with `tool_calls`).

The tools go into the model's chat template where it takes them (its text names `tools`); a template
that does not (SmolLM2's) gets them in a system message that describes them and the Hermes format
(`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) in which to call them. The answer is read
by the parser of the format the template teaches (tool_calls.parser_for_template), or Hermes'.

tool_choice "auto" lets the model answer or call; "required" and a named function are enforced by a
grammar (grammar.py) in which the answer is one or more calls (exactly one for a named function, or
with parallel_tool_calls false) whose arguments follow the function's `parameters` schema; "none"
leaves the answer as text. Grammars are written for the Hermes and Llama 3.1 JSON formats; another
format's model is refused "required" and named functions rather than answered unconstrained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .chat import check_dialog
from .grammar import JSON_OPTIONS, GrammarSpec
from .tool_calls import StreamingToolParser, new_call_id, parse_tool_calls, parser_for_template

ToolChoice = str | dict[str, Any]  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
FALLBACK_PARSER = "hermes"  # the format taught to a model whose template shows none
ENFORCED_FORMATS = ("hermes", "llama3_json")


@dataclass(frozen=True)
class ToolUse:
    """One chat's tools and how they may be used. tools: OpenAI's list, {"type": "function",
    "function": {"name", "description", "parameters"}} each."""

    tools: list[dict[str, Any]]
    choice: ToolChoice
    parallel: bool
    parser: str
    in_template: bool  # the chat template takes the tools itself

    @property
    def reads_calls(self) -> bool:
        """Whether the answer is read for calls ("none" leaves it as text)."""
        return self.choice != "none"

    @property
    def grammar_forces_calls(self) -> bool:
        return self.choice not in ("none", "auto")

    @property
    def forced_name(self) -> str | None:
        return self.choice["function"]["name"] if isinstance(self.choice, dict) else None

    def prompt_dialog(self, dialog: list[dict[str, Any]], continue_final: bool = False) -> list[dict[str, Any]]:
        """The dialog to render. Where the template cannot take the tools: described in its system
        message, and earlier calls and their results (checked first) written as the text they stand for."""
        if self.in_template:
            return dialog
        check_dialog(dialog, continue_final)
        dialog = calls_as_text(dialog)
        if dialog[0]["role"] == "system":
            return [{**dialog[0], "content": f"{dialog[0]['content']}\n\n{describe_tools(self.tools)}"}, *dialog[1:]]
        return [{"role": "system", "content": describe_tools(self.tools)}, *dialog]

    def template_tools(self) -> list[dict[str, Any]] | None:
        return self.tools if self.in_template else None

    def grammar(self) -> GrammarSpec | None:
        """The grammar of an answer that must call: "required" or a named function; None otherwise.
        ValueError for a model whose call format has no grammar here."""
        if not self.grammar_forces_calls:
            return None
        if self.parser not in ENFORCED_FORMATS:
            raise ValueError(f"tool_choice: {self.choice!r} is enforced for the {' and '.join(ENFORCED_FORMATS)} call "
                             f"formats; this model writes {self.parser!r} calls: use \"auto\"")
        functions = [t["function"] for t in self.tools if self.forced_name in (None, t["function"]["name"])]
        one_call = self.forced_name is not None or not self.parallel
        if self.parser == "llama3_json":  # one call: a JSON object alone
            return GrammarSpec("json_schema", json.dumps(calls_schema(functions, "parameters")))
        call = 'call: "<tool_call>\\n" %json ' + json.dumps(with_json_options(calls_schema(functions, "arguments"))) \
            + ' "\\n</tool_call>"'
        return GrammarSpec("lark", ("start: call\n" if one_call else 'start: call ("\\n" call)*\n') + call)

    def answer(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message of an answer's text, and its finish reason ("tool_calls" where it calls)."""
        if not self.reads_calls:
            return {"role": "assistant", "content": text}, finish_reason
        content, calls = parse_tool_calls(self.parser, text)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        calls = calls if self.parallel else calls[:1]
        if self.grammar_forces_calls:  # nothing but calls was allowed: what is left is a call cut short
            content = None
        message = {"role": "assistant", "content": content, "tool_calls": [c.openai(new_call_id()) for c in calls]}
        return message, "tool_calls" if finish_reason == "stop" else finish_reason

    def stream_reader(self) -> StreamReader:
        return StreamReader(self)


class StreamReader:
    """One streamed answer's text deltas in, chunk deltas out: content, then tool_calls entries."""

    def __init__(self, use: ToolUse):
        self.use = use
        self.parser = StreamingToolParser(use.parser) if use.reads_calls else None
        self.calls = 0

    def push(self, text: str, final: bool) -> list[dict[str, Any]]:
        """The deltas of text (the answer's next piece); final: the answer ends with it."""
        if self.parser is None:
            return [{"content": text}] if text else []
        content, calls = self.parser.push(text)
        if final:
            rest, more = self.parser.finish()
            content, calls = content + rest, calls + more
        if not self.use.parallel:
            calls = [c for c in calls if c["index"] == 0]
        self.calls = max(self.calls, *(c["index"] + 1 for c in calls), 0)
        return ([{"content": content}] if content else []) + [{"tool_calls": [c]} for c in calls]

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason


def tool_use_of(tools: list[dict[str, Any]] | None, choice: ToolChoice | None, parallel: bool | None,
                chat_template: str | None, parser: str | None = None) -> ToolUse | None:
    """How a chat uses its tools (None without tools); parser overrides the one its template shows."""
    if not tools:
        if choice not in (None, "none"):
            raise ValueError("tool_choice: there are no tools to choose from")
        return None
    if isinstance(choice, dict) and choice["function"]["name"] not in [t["function"]["name"] for t in tools]:
        raise ValueError(f"tool_choice: {choice['function']['name']!r} is none of the tools")
    in_template = chat_template is not None and "tools" in chat_template
    found = parser or (parser_for_template(chat_template) if in_template else None) or FALLBACK_PARSER
    return ToolUse(tools, choice or "auto", parallel is not False, found, in_template)


def calls_as_text(dialog: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A dialog whose calls and results are plain messages, for a template that knows neither: an
    assistant's calls as the Hermes text it would write, the results that follow as one user message."""
    out: list[dict[str, Any]] = []
    for message in dialog:
        if message.get("tool_calls"):
            calls = [f"<tool_call>\n{json.dumps(call_object(c), ensure_ascii=False)}\n</tool_call>"
                     for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([message["content"] or "", *calls]).strip()})
        elif message["role"] == "tool":
            result = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out[-1]["role"] == "user":  # the results of one turn's calls, together
                out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{result}"}
            else:
                out.append({"role": "user", "content": result})
        else:
            out.append(message)
    return out


def call_object(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call["function"]["arguments"]
    return {"name": call["function"]["name"], "arguments": json.loads(arguments) if isinstance(arguments, str)
            else arguments}


def calls_schema(functions: list[dict[str, Any]], arguments: str) -> dict[str, Any]:
    """The JSON schema of one call of any of functions: {"name": its name, arguments: its parameters},
    which admit no property they do not list unless they say so (OpenAI's strict mode, llama.cpp's
    default: JSON Schema's own default let SmolLM2 invent properties until its budget ran out)."""
    def one(function: dict[str, Any]) -> dict[str, Any]:
        parameters = {"additionalProperties": False, **(function.get("parameters") or {"type": "object"})}
        return {"type": "object", "properties": {"name": {"const": function["name"]}, arguments: parameters},
                "required": ["name", arguments], "additionalProperties": False}

    schemas = [one(f) for f in functions]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def with_json_options(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema inside a Lark grammar, with the whitespace and strictness of a response_format's."""
    return {**schema, "x-guidance": JSON_OPTIONS}


def describe_tools(tools: list[dict[str, Any]]) -> str:
    """A system text that gives a model the tools and the Hermes format to call them in."""
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You can call functions. Each one is described by a JSON object, one a line, between <tools> and "
            f"</tools>:\n<tools>\n{listed}\n</tools>\nTo call one, answer with its name and arguments as a JSON "
            "object between <tool_call> and </tool_call>, a call to a block:\n<tool_call>\n"
            '{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>\nThe results come back '
            "between <tool_response> and </tool_response>.")
