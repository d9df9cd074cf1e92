"""Chat formats: Llama 2's `[INST]` format and Hugging Face jinja chat templates, behind `encode_dialog`.

A dialog is a list of messages: an optional system message first, then user and assistant messages
alternating, ending with the user message the model is to answer, or, to have the model continue
an answer begun for it (answer prefill, `continue_final=True`), with that assistant message.

With tools (chat templates only), an assistant message may carry `tool_calls` in OpenAI's shape
instead of (or with) its text; tool messages with their results follow it, then the assistant's
next message, or the end of the dialog when the model is to answer them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

from .tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


class Message(TypedDict):
    role: Role
    content: str  # may be None or absent on an assistant message with tool_calls
    # An assistant message's calls in OpenAI's shape: [{"id", "type": "function", "function": {"name",
    # "arguments": JSON text (or an object, as transformers takes them)}}].
    tool_calls: NotRequired[list[dict[str, Any]]]
    tool_call_id: NotRequired[str]  # a tool message: the id of the call whose result it holds


Dialog = list[Message]


class ChatPrediction(TypedDict):
    generation: Message
    tokens: list[int]


# Llama 2 chat format (Meta's llama/generation.py): the tags are text, BOS/EOS are token ids.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, continue_final: bool = False,
                  tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The prompt tokens of a dialog, ready for the assistant's answer: the tokenizer's chat template
    when it has one (rendered as transformers renders it), else the Llama 2 chat format. With
    continue_final the dialog ends with the beginning of the answer, which the model continues.
    tools: OpenAI's `tools` list ({"type": "function", "function": {...}} each), passed to the template
    as transformers' `apply_chat_template(..., tools=...)` passes it; the Llama 2 format has none."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        if tools:
            raise ValueError("tools: the Llama 2 chat format (this tokenizer has no chat template) has no tool "
                             "calls; expected no tools")
        return encode_llama2_dialog(tokenizer, dialog, continue_final)
    check_dialog(dialog, continue_final)
    check_tools(tools)
    messages = with_argument_objects(dialog)
    special = template_special_tokens(tokenizer)
    if continue_final:
        text = continued_answer(render_chat_template(template, messages, special, add_generation_prompt=False,
                                                     tools=tools), dialog[-1]["content"])
    else:
        text = render_chat_template(template, messages, special, tools=tools)
    # The template writes every special token it wants (BOS included): add none on top.
    return tokenizer.encode(text, bos=False, eos=False)


def continued_answer(rendered: str, answer: str) -> str:
    """The rendered dialog cut after the last assistant message's text, so that nothing closes its
    turn (transformers' continue_final_message does the same)."""
    end = rendered.rfind(answer.strip())
    if not answer.strip() or end < 0:
        raise ValueError("the last (assistant) message: expected text the chat template shows, to continue it")
    return rendered[:end + len(answer.strip())]


# The roles that may follow a message of each role after the system message; tool results follow an
# assistant message with tool_calls instead.
NEXT_ROLES: dict[str, tuple[str, ...]] = {"user": ("assistant",), "assistant": ("user",),
                                          "tool": ("tool", "assistant")}


def check_dialog(dialog: Dialog, continue_final: bool = False) -> None:
    """Raise ValueError naming the first message that breaks the shape system? (user assistant)* user,
    or, with continue_final, system? (user assistant)+; where an assistant message has tool_calls,
    one or more tool messages with their results follow it, then an assistant message or the end."""
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"dialog: expected a non-empty list of messages, got {dialog!r}")
    for i, message in enumerate(dialog):
        check_message(i, message)
    offset = 1 if dialog[0]["role"] == "system" else 0
    if offset == len(dialog):
        raise ValueError("dialog: a system message alone; expected a user message after it")
    calls: list[dict[str, Any]] = []  # those of the last assistant message, which tool messages answer
    for i in range(offset, len(dialog)):
        expected = next_roles(dialog[i - 1]) if i > offset else ("user",)
        role = dialog[i]["role"]
        if role not in expected:
            where = " (a system message may only come first)" if role == "system" else ""
            raise ValueError(f"message {i}: expected role {' or '.join(map(repr, expected))}, got {role!r}{where}; "
                             "messages must alternate user/assistant, starting with user (tool messages follow "
                             "an assistant message with tool_calls)")
        if role == "assistant":
            calls = dialog[i].get("tool_calls") or []
        if role == "tool":
            check_tool_call_id(i, dialog[i], calls)
    last = dialog[-1]
    if continue_final and (last["role"] != "assistant" or last.get("tool_calls")):
        raise ValueError(f"message {len(dialog) - 1}: expected the dialog to end with the assistant message "
                         "to continue (its text, without tool_calls)")
    if not continue_final and last["role"] == "assistant":
        what = "results (tool messages)" if last.get("tool_calls") else "user message"
        raise ValueError(f"message {len(dialog) - 1}: the dialog ends with an assistant message; "
                         f"expected it to end with the {what} to answer (or ask to continue it)")


def next_roles(message: Message) -> tuple[str, ...]:
    return ("tool",) if message.get("tool_calls") else NEXT_ROLES[message["role"]]


def check_message(i: int, message: Any) -> None:
    """A dict with a known role and string content (an assistant message with tool_calls may have none)."""
    if not isinstance(message, dict):
        raise ValueError(f"message {i}: expected a dict with a 'role' and a string 'content', got {message!r}")
    if message.get("role") not in ROLES:
        raise ValueError(f"message {i}: unknown role {message.get('role')!r}; expected one of {', '.join(ROLES)}")
    calls = message.get("tool_calls")
    if calls is not None:
        if message["role"] != "assistant":
            raise ValueError(f"message {i}: a {message['role']} message with tool_calls; only assistant "
                             "messages carry them")
        check_tool_calls(i, calls)
    if not isinstance(message.get("content"), str) and not (calls and message.get("content") is None):
        raise ValueError(f"message {i}: expected a dict with a 'role' and a string 'content', got {message!r}")


def check_tool_calls(i: int, calls: Any) -> None:
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"message {i}: tool_calls: expected a non-empty list of calls, got {calls!r}")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                or not isinstance(call.get("id", ""), str)):
            raise ValueError(f"message {i}: tool_calls[{j}]: expected {{'id': str, 'type': 'function', 'function': "
                             f"{{'name': str, 'arguments': JSON text}}}}, got {call!r}")
        if not isinstance(arguments_object(function.get("arguments")), dict):
            raise ValueError(f"message {i}: tool_calls[{j}]: arguments: expected the JSON text of an object, "
                             f"got {function.get('arguments')!r}")


def arguments_object(arguments: Any) -> Any:
    """A call's arguments as the object they stand for: OpenAI sends JSON text, transformers an object."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):
        return None


def check_tool_call_id(i: int, message: Message, calls: list[dict[str, Any]]) -> None:
    """A tool message's tool_call_id, when it has one, must name a call of the assistant message before."""
    call_id = message.get("tool_call_id")
    ids = [call["id"] for call in calls if "id" in call]
    if call_id is not None and (not isinstance(call_id, str) or (ids and call_id not in ids)):
        raise ValueError(f"message {i}: tool_call_id {call_id!r} names none of the assistant's tool_calls "
                         f"({', '.join(map(repr, ids))})")


def check_tools(tools: Any) -> None:
    """None, or OpenAI's tools list: {"type": "function", "function": {"name", ...}} each."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise ValueError(f"tools: expected a list of {{'type': 'function', 'function': {{...}}}}, got {tools!r}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name', 'description', "
                             f"'parameters'}}}}, got {tool!r}")


def with_argument_objects(dialog: Dialog) -> Dialog:
    """The dialog with its tool calls' arguments as objects: chat templates write them with tojson, as
    transformers documents, so JSON text (OpenAI's shape) would come out quoted."""
    return [{**message, "tool_calls": [with_argument_object(call) for call in message["tool_calls"]]}
            if message.get("tool_calls") else message for message in dialog]


def with_argument_object(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    return {**call, "function": {**function, "arguments": arguments_object(function["arguments"])}}


# --- Llama 2 ---------------------------------------------------------------------------------------

def encode_llama2_dialog(tokenizer: Tokenizer, dialog: Dialog, continue_final: bool = False) -> list[int]:
    """Llama 2 chat: `<s>[INST] user [/INST] answer</s>` per exchange, then `<s>[INST] user [/INST]`
    (with continue_final, `<s>[INST] user [/INST] answer begun`); the system message goes inside the
    first user message between <<SYS>> tags."""
    check_dialog(dialog, continue_final)
    for i, message in enumerate(dialog):
        if message["role"] == "tool" or message.get("tool_calls"):
            raise ValueError(f"message {i}: the Llama 2 chat format (this tokenizer has no chat template) has no "
                             "tool calls or results; expected user and assistant text")
        tags = [tag for tag in LLAMA2_TAGS if tag in message["content"]]
        if tags:
            raise ValueError(f"message {i}: contains the chat tag(s) {', '.join(tags)}, which the Llama 2 "
                             "format reserves; expected plain text")
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no chat template and no BOS/EOS tokens: "
                         "the Llama 2 chat format needs both")
    dialog = list(fold_system_message(dialog))  # a copy: the answer begun is taken off its end
    begun = dialog.pop()["content"].strip() if continue_final else None
    tokens: list[int] = []
    for user, answer in zip(dialog[:-1:2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()}"
        tokens += tokenizer.encode(text, bos=True, eos=True)
    last = f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}" + (f" {begun}" if begun else "")
    return tokens + tokenizer.encode(last, bos=True, eos=False)


def fold_system_message(dialog: Dialog) -> Dialog:
    """The dialog with its system message moved into the first user message (a blank one dropped:
    an empty <<SYS>> block is not what the model was trained on)."""
    if dialog[0]["role"] != "system":
        return dialog
    system, first, rest = dialog[0]["content"].strip(), dialog[1], dialog[2:]
    if not system:
        return dialog[1:]
    return [{"role": "user", "content": B_SYS + system + E_SYS + first["content"]}, *rest]


# --- Jinja chat templates --------------------------------------------------------------------------

def render_chat_template(template: str, dialog: Dialog, special_tokens: dict[str, str],
                         add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> str:
    """Render a chat template as transformers' `apply_chat_template` does: a sandboxed jinja2
    environment with trim_blocks and lstrip_blocks, its helper functions, and the tokenizer's
    named special tokens and the tools as variables."""
    from jinja2.exceptions import TemplateError

    messages = [{k: v for k, v in m.items() if v is not None} for m in dialog]  # as transformers does
    try:
        return compile_chat_template(template).render(messages=messages, tools=tools, documents=None,
                                                      add_generation_prompt=add_generation_prompt, **special_tokens)
    except TemplateError as e:
        raise ValueError(f"chat template: {e}") from e


def compile_chat_template(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' training
        masks; rendering a prompt keeps its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = template_tojson
    env.globals["raise_exception"] = template_raise_exception
    env.globals["strftime_now"] = template_strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template: line {e.lineno}: {e.message}") from e


def template_raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def template_tojson(x, ensure_ascii: bool = False, indent: int | None = None, separators=None,
                    sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates never want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def template_strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def template_special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The tokenizer's named special tokens as strings (`bos_token`, `eos_token`, ...): its
    `special_tokens_map` when it has one, else the text of its BOS/EOS ids."""
    named = getattr(tokenizer, "special_tokens_map", None)
    if named is not None:
        return dict(named)
    pieces = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    return {name: tokenizer.decode([i]) for name, i in pieces.items() if i is not None}


# --- Long conversations ----------------------------------------------------------------------------

def fit_dialog(encode: Callable[[Dialog], list[int]], dialog: Dialog, max_tokens: int) -> tuple[Dialog, int]:
    """The dialog with its oldest exchanges (a user message and all that answers it: the assistant's
    messages, tool calls and results) dropped until it encodes to at most max_tokens, and how many
    exchanges were dropped; the system message is always kept.

    Raises ValueError when even the last user message alone does not fit."""
    offset = 1 if dialog and dialog[0]["role"] == "system" else 0
    dropped = 0
    while len(encode(dialog)) > max_tokens:
        next_user = next((i for i in range(offset + 1, len(dialog)) if dialog[i]["role"] == "user"), None)
        if next_user is None:
            raise ValueError(f"the last message alone needs {len(encode(dialog))} tokens, more than the "
                             f"{max_tokens} available; raise --max_seq_len or shorten it")
        dialog = dialog[:offset] + dialog[next_user:]
        dropped += 1
    return dialog, dropped
