"""Chat formats: Llama 2's `[INST]` format and Hugging Face jinja chat templates, behind `encode_dialog`.

A dialog is a list of messages: an optional system message first, then user and assistant messages
alternating, ending with the user message the model is to answer, or, to have the model continue
an answer begun for it (answer prefill, `continue_final=True`), with that assistant message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Literal, TypedDict

from .tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]


class ChatPrediction(TypedDict):
    generation: Message
    tokens: list[int]


# Llama 2 chat format (Meta's llama/generation.py): the tags are text, BOS/EOS are token ids.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, continue_final: bool = False) -> list[int]:
    """The prompt tokens of a dialog, ready for the assistant's answer: the tokenizer's chat template
    when it has one (rendered as transformers renders it), else the Llama 2 chat format. With
    continue_final the dialog ends with the beginning of the answer, which the model continues."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return encode_llama2_dialog(tokenizer, dialog, continue_final)
    check_dialog(dialog, continue_final)
    special = template_special_tokens(tokenizer)
    if continue_final:
        text = continued_answer(render_chat_template(template, dialog, special, add_generation_prompt=False),
                                dialog[-1]["content"])
    else:
        text = render_chat_template(template, dialog, special)
    # The template writes every special token it wants (BOS included): add none on top.
    return tokenizer.encode(text, bos=False, eos=False)


def continued_answer(rendered: str, answer: str) -> str:
    """The rendered dialog cut after the last assistant message's text, so that nothing closes its
    turn (transformers' continue_final_message does the same)."""
    end = rendered.rfind(answer.strip())
    if not answer.strip() or end < 0:
        raise ValueError("the last (assistant) message: expected text the chat template shows, to continue it")
    return rendered[:end + len(answer.strip())]


def check_dialog(dialog: Dialog, continue_final: bool = False) -> None:
    """Raise ValueError naming the first message that breaks the shape system? (user assistant)* user,
    or, with continue_final, system? (user assistant)+."""
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"dialog: expected a non-empty list of messages, got {dialog!r}")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: expected a dict with a 'role' and a string 'content', got {message!r}")
        if message.get("role") not in ROLES:
            raise ValueError(f"message {i}: unknown role {message.get('role')!r}; expected one of {', '.join(ROLES)}")
    offset = 1 if dialog[0]["role"] == "system" else 0
    if offset == len(dialog):
        raise ValueError("dialog: a system message alone; expected a user message after it")
    for i in range(offset, len(dialog)):
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if dialog[i]["role"] != expected:
            where = " (a system message may only come first)" if dialog[i]["role"] == "system" else ""
            raise ValueError(f"message {i}: expected role {expected!r}, got {dialog[i]['role']!r}{where}; "
                             "messages must alternate user/assistant, starting with user")
    if continue_final and dialog[-1]["role"] != "assistant":
        raise ValueError(f"message {len(dialog) - 1}: expected the dialog to end with the assistant message "
                         "to continue")
    if not continue_final and dialog[-1]["role"] != "user":
        raise ValueError(f"message {len(dialog) - 1}: the dialog ends with an assistant message; "
                         "expected it to end with the user message to answer (or ask to continue it)")


# --- Llama 2 ---------------------------------------------------------------------------------------

def encode_llama2_dialog(tokenizer: Tokenizer, dialog: Dialog, continue_final: bool = False) -> list[int]:
    """Llama 2 chat: `<s>[INST] user [/INST] answer</s>` per exchange, then `<s>[INST] user [/INST]`
    (with continue_final, `<s>[INST] user [/INST] answer begun`); the system message goes inside the
    first user message between <<SYS>> tags."""
    check_dialog(dialog, continue_final)
    for i, message in enumerate(dialog):
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
                         add_generation_prompt: bool = True) -> str:
    """Render a chat template as transformers' `apply_chat_template` does: a sandboxed jinja2
    environment with trim_blocks and lstrip_blocks, its helper functions, and the tokenizer's
    named special tokens as variables."""
    from jinja2.exceptions import TemplateError

    messages = [{k: v for k, v in m.items() if v is not None} for m in dialog]  # as transformers does
    try:
        return compile_chat_template(template).render(messages=messages, tools=None, documents=None,
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
    """The dialog with its oldest user/assistant exchanges dropped until it encodes to at most
    max_tokens, and how many exchanges were dropped; the system message is always kept.

    Raises ValueError when even the last user message alone does not fit."""
    offset = 1 if dialog and dialog[0]["role"] == "system" else 0
    dropped = 0
    while len(encode(dialog)) > max_tokens:
        if len(dialog) - offset <= 1:
            raise ValueError(f"the last message alone needs {len(encode(dialog))} tokens, more than the "
                             f"{max_tokens} available; raise --max_seq_len or shorten it")
        dialog = dialog[:offset] + dialog[offset + 2:]
        dropped += 1
    return dialog, dropped
