"""The OpenAI API's wire format: request bodies as pydantic models, and the JSON of responses,
stream chunks and errors, for `/v1/chat/completions` and `/v1/completions` (serve.py routes them).

Nothing is silently ignored: FIELDS says of every field of OpenAI's two requests whether it is
honoured, accepted as a no-op (it changes no answer: `user`, `store`, `metadata`, ...) or refused; a
refused or unknown field is a 400 naming it. Besides OpenAI's fields, requests take the extensions
other OpenAI-compatible servers take: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`prompt_logprobs`, `continue_final_message` (vLLM's spellings).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from .engine import Output, Request, TokenLogprob
from .grammar import Compiled, GrammarSpec
from .params import SEED_RANGE, as_float32, unencodable
from .sampling import SamplingParams
from .tokenizer import Tokenizer

# OpenAI's legacy completions generate 16 tokens when max_tokens is not given; chat fills the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 16
MAX_CHOICES = 16


def valid_text(text: str) -> str:
    """Text that can be encoded (JSON's \\ud800 escapes decode to lone surrogates, which cannot)."""
    if (problem := unencodable(text)) is not None:
        raise ValueError(problem)
    return text


def nonzero_in_float32(value: float) -> float:
    """A value sampling can tell from 0: it computes in float32, where 1e-300 is 0."""
    if value != 0 and as_float32(value) == 0:
        raise ValueError(f"{value!r} is 0 in float32, which sampling computes in")
    return value


Text = Annotated[str, AfterValidator(valid_text)]
PositiveFloat32 = Annotated[float, AfterValidator(nonzero_in_float32)]


HONOURED, NO_OP, REFUSED = "honoured", "no-op", "refused"
# Every field of OpenAI's chat (chat) and legacy completions (completions) requests, and the
# extensions taken: (where, what is done with it, why or how). The README's table is this one.
FIELDS: dict[str, tuple[str, str, str]] = {
    "messages": ("chat", HONOURED, "through the model's chat template"),
    "prompt": ("completions", HONOURED, "a text, texts, token ids or lists of them"),
    "model": ("both", HONOURED, "must name the served model when given"),
    "max_tokens": ("both", HONOURED, "0 scores the prompt only (echo with logprobs, or prompt_logprobs)"),
    "max_completion_tokens": ("chat", HONOURED, "max_tokens' newer name"),
    "temperature": ("both", HONOURED, "0 is greedy"),
    "top_p": ("both", HONOURED, "nucleus sampling"),
    "seed": ("both", HONOURED, "choice i draws with seed + i"),
    "n": ("both", HONOURED, "up to 16 choices"),
    "stop": ("both", HONOURED, "up to 16 strings, never shown"),
    "stream": ("both", HONOURED, "server-sent events"),
    "stream_options": ("both", HONOURED, "include_usage; include_obfuscation is a no-op"),
    "logprobs": ("both", HONOURED, "chat: true/false; completions: up to 5 alternatives"),
    "top_logprobs": ("chat", HONOURED, "needs logprobs: true"),
    "frequency_penalty": ("both", HONOURED, "OpenAI's, over the generated tokens"),
    "presence_penalty": ("both", HONOURED, "OpenAI's, over the generated tokens"),
    "logit_bias": ("both", HONOURED, "token id -> bias in [-100, 100]"),
    "echo": ("completions", HONOURED, "the prompt before the completion, scored with logprobs"),
    "best_of": ("completions", HONOURED, "equal to n (or unset) only: choices are not ranked; else refused"),
    "user": ("both", NO_OP, "OpenAI's end-user id"),
    "store": ("chat", NO_OP, "nothing is stored"),
    "metadata": ("chat", NO_OP, "nothing is stored"),
    "service_tier": ("chat", NO_OP, "one tier"),
    "prompt_cache_key": ("chat", NO_OP, "an OpenAI cache hint"),
    "safety_identifier": ("chat", NO_OP, "OpenAI's end-user id"),
    "parallel_tool_calls": ("chat", HONOURED, "false: one call at most (enforced with required or a named tool)"),
    "modalities": ("chat", NO_OP, "only [\"text\"]; anything else refused"),
    "response_format": ("both", HONOURED, "text, json_object (any JSON object) or json_schema (enforced, strict "
                        "or not): README, Structured output"),
    "suffix": ("completions", REFUSED, "no model this server loads fills in the middle"),
    "tools": ("chat", HONOURED, "functions, through the chat template: README, Structured output and tools"),
    "tool_choice": ("chat", HONOURED, "none, auto, required or a named function (both enforced by a grammar)"),
    "functions": ("chat", REFUSED, "OpenAI's deprecated tool calls: not supported"),
    "function_call": ("chat", REFUSED, "OpenAI's deprecated tool calls: not supported"),
    "audio": ("chat", REFUSED, "text output only"),
    "prediction": ("chat", REFUSED, "predicted outputs are not supported"),
    "reasoning_effort": ("chat", REFUSED, "for OpenAI's reasoning models"),
    "verbosity": ("chat", REFUSED, "for OpenAI's reasoning models"),
    "web_search_options": ("chat", REFUSED, "no web search here"),
    "top_k": ("both", HONOURED, "extension: the k likeliest tokens (0 or -1: off)"),
    "min_p": ("both", HONOURED, "extension: tokens below min_p times the likeliest's probability dropped"),
    "repetition_penalty": ("both", HONOURED, "extension: CTRL's, over prompt and completion"),
    "ignore_eos": ("both", HONOURED, "extension: generate max_tokens whatever the model says"),
    "prompt_logprobs": ("both", HONOURED, "extension: each prompt token's logprob, rank and alternatives"),
    "structured_outputs": ("both", HONOURED, "extension: exactly one of json (a schema), regex, grammar (Lark) "
                           "or choice (texts)"),
    "continue_final_message": ("chat", HONOURED, "extension: continue a last assistant message (the default "
                               "when the chat ends with one)"),
}


def refusal(field: str) -> str | None:
    """Why a field that is not taken is refused, or None for a field nobody defines."""
    where, what, why = FIELDS.get(field, ("", "", ""))
    return why if what == REFUSED else None


class OpenAIBody(BaseModel):
    """A request body: a field no model declares is refused, naming it (nothing silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIBody):
    include_usage: bool = False
    include_obfuscation: bool = False  # OpenAI pads chunks against side channels: nothing to pad here


class JsonSchema(OpenAIBody):
    """response_format's json_schema: the schema an answer follows (enforced, strict or not)."""

    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema: expected with type "json_schema", and only with it')
        return self


class StructuredOutputs(OpenAIBody):
    """vLLM's extension: exactly one of a JSON schema, a regular expression (matched whole), a Lark
    grammar (llguidance's dialect, from rule `start`) or a list of texts to choose among."""

    json_: dict[str, Any] | bool | None = Field(None, alias="json")
    regex: Text | None = None
    grammar: Text | None = None
    choice: list[Text] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json_", "regex", "grammar", "choice") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of json, regex, grammar and choice, got {len(given)}")
        return self


def grammar_of(outputs: StructuredOutputs) -> GrammarSpec:
    if outputs.json_ is not None:
        return GrammarSpec("json_schema", json.dumps(outputs.json_))
    if outputs.regex is not None:
        return GrammarSpec("regex", outputs.regex)
    if outputs.grammar is not None:
        return GrammarSpec("lark", outputs.grammar)
    # JSON's string escapes are Lark's: each choice a literal, one of them the whole answer.
    return GrammarSpec("lark", "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in outputs.choice))


class GenerationFields(OpenAIBody):
    """What chat and legacy completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (serving.py)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: PositiveFloat32 = Field(1.0, gt=0, le=1)
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: PositiveFloat32 = Field(1.0, gt=0, le=10)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (a string in JSON)
    ignore_eos: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's: score the prompt, with N alternatives
    top_k: int = Field(0, ge=-1)  # vLLM's: 0 or -1 is off
    min_p: float = Field(0.0, ge=0, le=1)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    user: Text | None = None

    @property
    def grammar(self) -> tuple[GrammarSpec, str] | None:
        """What the answer must follow, and the field that asked for it; None: free text."""
        asked = self.response_format is not None and self.response_format.type != "text"
        if asked and self.structured_outputs is not None:
            raise ValueError("structured_outputs: give it or response_format, not both")
        if self.structured_outputs is not None:
            return grammar_of(self.structured_outputs), "structured_outputs"
        if not asked:
            return None
        if self.response_format.type == "json_object":
            return GrammarSpec("json_object", ""), "response_format"
        schema = self.response_format.json_schema.schema_
        return GrammarSpec("json_schema", json.dumps(schema)), "response_format.json_schema.schema"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(OpenAIBody):
    type: Literal["text"]
    text: Text


class FunctionCall(OpenAIBody):
    name: Text
    arguments: Text  # JSON text of an object


class ToolCall(OpenAIBody):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: Text | None = None  # a tool message: the call whose result it holds
    refusal: Text | None = None  # OpenAI's, on an assistant message it returned: not shown to the model

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def message(self) -> dict[str, Any]:
        """As chat.encode_dialog takes it; OpenAI's `developer` role is the system's."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        out["content"] = None if self.tool_calls and not self.text else self.text
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(OpenAIBody):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # the arguments follow parameters when a call is enforced, strict or not


class Tool(OpenAIBody):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(OpenAIBody):
    name: Text


class NamedToolChoice(OpenAIBody):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    continue_final_message: bool | None = None  # None: when the chat ends with an assistant message
    store: bool | None = None
    metadata: dict[str, Text] | None = None
    service_tier: Text | None = None
    prompt_cache_key: Text | None = None
    safety_identifier: Text | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text"]] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @property
    def dialog(self) -> list[dict[str, Any]]:
        """The messages as chat.encode_dialog takes them."""
        return [m.message() for m in self.messages]

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def alternatives(self) -> int | None:
        """How many likeliest tokens to report with each token; None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: Text | None = None


class TokenizeRequest(OpenAIBody):
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True


class DetokenizeRequest(OpenAIBody):
    tokens: list[int]


# How pydantic names the branch of a union it tried ("str", "list[TextPart]", "function-after[...]",
# "ChatMessage"): a type, never a field of ours, which are lower-case words.
UNION_BRANCH = re.compile(r"(str|int|float|bool|none|bytes|[a-z]+(-[a-z]+)*\[.*\]|[A-Z]\w*)")


def field_path(loc: tuple | list) -> str:
    """pydantic's error location as a field path: ("body", "messages", 0, "role") -> messages[0].role."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif not UNION_BRANCH.fullmatch(str(part)):
            path += f".{part}" if path else str(part)
    return path


def telling_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report of pydantic's list. A value that fails a union fails every branch; the
    telling branch is one whose type the value has ("at most 16 items" over "not a string"), else
    the deepest (where the value went wrong inside a list)."""

    def type_mismatch(error: dict[str, Any]) -> bool:
        return error.get("type", "").endswith(("_type", "_parsing"))

    return min(errors, key=lambda e: (type_mismatch(e), -len(e.get("loc", ()))))


def first_invalid_field(errors: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The field (None for the body itself) and message of pydantic's telling validation error, the
    message led by the field's path. A body that is not JSON names no field: the location pydantic
    gives it is a character offset."""
    first = telling_error(errors)
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        where = first.get("loc", ())[-1:]
        at = f" at character {where[0]}" if where and isinstance(where[0], int) else ""
        return None, f"the body is not valid JSON{at}" + (f": {reason}" if reason else "")
    param = field_path(first.get("loc", ()))
    where = f"{param}: " if param else ""
    message = first.get("msg", "invalid value").removeprefix("Value error, ")  # pydantic's word for a ValueError
    if first.get("type") == "extra_forbidden":
        name = str(first.get("loc", ("",))[-1])
        why = refusal(name) if param == name else None  # FIELDS are the bodies' own, not their parts'
        message = f"not supported by this server: {why}" if why else "not a field this server takes"
    return param or None, f"{where}{message}"


# --- Engine requests ---------------------------------------------------------------------------------

def sampling_params(body: GenerationFields, choice: int = 0) -> SamplingParams:
    """How a body's choice-th choice samples; choices of a seeded body get seed, seed + 1, ..."""
    # torch seeds modulo 2**64 (seed -1 draws as 2**64 - 1 does), so choices near the end wrap around.
    return SamplingParams(temperature=body.temperature, top_p=body.top_p,
                          seed=None if body.seed is None else (body.seed + choice) % 2**64,
                          repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
                          presence_penalty=body.presence_penalty, logit_bias=tuple((body.logit_bias or {}).items()),
                          top_k=body.top_k, min_p=body.min_p)


def engine_request(body: GenerationFields, prompt: list[int], max_tokens: int, stop_ids: frozenset[int],
                   alternatives: int | None, choice: int = 0, prompt_alternatives: int | None = None,
                   grammar: Compiled | None = None) -> Request:
    """The engine request of one choice: the tokenizer's stop_ids end it unless the body ignores EOS;
    prompt_alternatives not None scores the prompt too; grammar: what the answer must follow."""
    stops = frozenset() if body.ignore_eos else stop_ids
    return Request(prompt, max_tokens, sampling_params(body, choice), stops, body.stop_strings, alternatives,
                   prompt_alternatives, grammar)


# --- Responses ---------------------------------------------------------------------------------------

def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ResponseIds:
    """The id, creation time and model name every chunk of one response repeats."""

    def __init__(self, prefix: str, model: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; prompt_tokens_details.cached_tokens where a prompt's beginning was reused."""
    counts: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
    return {**counts, "prompt_tokens_details": {"cached_tokens": cached_tokens}} if cached_tokens else counts


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprob_entries(tokenizer: Tokenizer, logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob]
                         ) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: per token its text, bytes, log-probability and the likeliest ones."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]


def completion_logprobs(tokenizer: Tokenizer, logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob],
                        texts: list[str], text_offset: int) -> dict[str, Any]:
    """Legacy completions' `logprobs`: parallel lists of tokens (texts: each one's share of the text),
    their log-probabilities, the likeliest alternatives as {token: logprob}, and where each token's
    text starts."""
    offsets = []
    for text in texts:
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": list(texts), "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


def prompt_logprobs_legacy(tokenizer: Tokenizer, texts: list[str], scores: list[TokenLogprob | None] | tuple,
                           alternatives: int) -> dict[str, Any]:
    """An echoed prompt's part of legacy `logprobs`: its tokens' texts (which join into the prompt),
    their log-probabilities and alternatives, null for the first token, offsets from 0."""
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": list(texts), "token_logprobs": [None if s is None else s.logprob for s in scores],
            "top_logprobs": [None if s is None else {token_text(tokenizer, t): v for t, v in s.top[:alternatives]}
                             for s in scores],
            "text_offset": offsets}


def joined_logprobs(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Two parts of legacy `logprobs` (an echoed prompt's, the completion's) as one."""
    return {key: first[key] + then[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_chunk(ids: ResponseIds, index: int, delta: dict[str, Any], finish_reason: str | None,
               include_usage: bool, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk = {**ids.envelope("chat.completion.chunk"),
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    return {**chunk, "usage": None} if include_usage else chunk


def completion_chunk(ids: ResponseIds, index: int, text: str, finish_reason: str | None, include_usage: bool,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk = {**ids.envelope("text_completion"),
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    return {**chunk, "usage": None} if include_usage else chunk


def usage_chunk(ids: ResponseIds, obj: str, counts: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream that asked for usage (counts: usage()): no choices."""
    return {**ids.envelope(obj), "choices": [], "usage": counts}


def chat_response(ids: ResponseIds, choices: list[dict[str, Any]], counts: dict[str, Any]) -> dict[str, Any]:
    return {**ids.envelope("chat.completion"), "choices": choices, "usage": counts}


def completion_response(ids: ResponseIds, choices: list[dict[str, Any]], counts: dict[str, Any]) -> dict[str, Any]:
    return {**ids.envelope("text_completion"), "choices": choices, "usage": counts}


def is_final(out: Output) -> bool:
    return out.finish_reason is not None
