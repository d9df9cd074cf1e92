"""Tool calls read from answers written as each family's documented format shows them, whole and
streamed in random pieces, and the format chosen from a chat template's text."""

from __future__ import annotations

import json
import random
import re

import pytest

from llama_int8.tool_calls import PARSERS, StreamingToolParser, ToolCall, parse_tool_calls, parser_for_template


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


WEATHER = call("get_weather", city="Paris", unit="celsius")
TIME = call("get_time", timezone="Europe/Paris")
NO_ARGUMENTS = call("get_time")

# (parser, answer, content, calls): content None when the answer is calls only.
ANSWERS = {
    # Hermes: <tool_call> blocks of {"name", "arguments"}, after optional text.
    "hermes one call": ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                                  '"unit": "celsius"}}\n</tool_call>', None, [WEATHER]),
    "hermes two calls": ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                                   '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
                                   '"arguments": {"timezone": "Europe/Paris"}}\n</tool_call>', None, [WEATHER, TIME]),
    "hermes text before": ("hermes", "I will look it up.\n\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": "
                                     "{}}\n</tool_call>", "I will look it up.", [NO_ARGUMENTS]),
    "hermes no call": ("hermes", "Paris is the capital of France. Use <tools> or <tool> tags? ", None, []),
    "hermes malformed": ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n'
                                   '</tool_call>', None, []),
    "hermes unclosed at the end": ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {}}', None,
                                   [NO_ARGUMENTS]),
    "hermes one good one malformed": ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
                                                '<tool_call>\n{"name": get_weather}\n</tool_call>',
                                      '<tool_call>\n{"name": get_weather}\n</tool_call>', [NO_ARGUMENTS]),
    "hermes escapes and arguments as text": ("hermes", '<tool_call>{"name": "say", "arguments": "{\\"text\\": '
                                                       '\\"caf\\\\u00e9 \\\\\\"ok\\\\\\"\\"}"}</tool_call>',
                                             None, [call("say", text='café "ok"')]),
    "hermes text between and after": ("hermes", 'First.\n<tool_call>{"name": "get_time"}</tool_call>\nThen. '
                                                '<tool_call>{"name": "get_time"}</tool_call> Done.',
                                      "First.\nThen.\nDone.", [NO_ARGUMENTS, NO_ARGUMENTS]),
    # Llama 3.1/3.2: the answer is {"name", "parameters"}, maybe after <|python_tag|>; ";" between calls.
    "llama3 one call": ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
                        None, [WEATHER]),
    "llama3 python tag": ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {"timezone": '
                                         '"Europe/Paris"}}', None, [TIME]),
    "llama3 two calls": ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                                        '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}', None,
                         [WEATHER, TIME]),
    "llama3 text before the tag": ("llama3_json", 'Let me check.\n<|python_tag|>{"name": "get_time", '
                                                  '"parameters": {}}', "Let me check.", [NO_ARGUMENTS]),
    "llama3 no call": ("llama3_json", "The capital of France is Paris.", None, []),
    "llama3 JSON that is no call": ("llama3_json", '{"capital": "Paris"}', None, []),
    "llama3 braces that are no JSON": ("llama3_json", "{x} is a set", None, []),
    "llama3 malformed": ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"', None, []),
    "llama3 text after": ("llama3_json", '{"name": "get_time", "parameters": {}} I called it.', "I called it.",
                          [NO_ARGUMENTS]),
    # Llama 3.2 pythonic: a list of calls with keyword arguments in Python literals.
    "pythonic one call": ("pythonic", '[get_weather(city="Paris", unit="celsius")]', None, [WEATHER]),
    "pythonic two calls": ("pythonic", "[get_weather(city='Paris', unit='celsius'), "
                                       'get_time(timezone="Europe/Paris")]', None, [WEATHER, TIME]),
    "pythonic literals": ("pythonic", '[search(query="a ] b", limit=3, exact=True, tags=["x", (1, 2)], '
                                      'filters={"lang": "fr"}, cutoff=None, scale=-1.5), web.get_time()]', None,
                          [call("search", query="a ] b", limit=3, exact=True, tags=["x", [1, 2]],
                                filters={"lang": "fr"}, cutoff=None, scale=-1.5), call("web.get_time")]),
    "pythonic no call": ("pythonic", "Sure: Paris.", None, []),
    "pythonic markdown link": ("pythonic", "[Paris](https://en.wikipedia.org/wiki/Paris) is the capital.", None, []),
    "pythonic unclosed": ("pythonic", '[get_weather(city="Paris"', None, []),
    "pythonic positional argument": ("pythonic", '[get_weather("Paris")]', None, []),
    "pythonic code is not evaluated": ("pythonic", '[get_weather(city=__import__("os").system("ls"))]', None, []),
    "pythonic set is no JSON": ("pythonic", "[get_weather(city={'Paris'})]", None, []),
    "pythonic text after": ("pythonic", "[get_time()]\nDone.", "Done.", [NO_ARGUMENTS]),
    # Mistral: [TOOL_CALLS] and a JSON list, or [TOOL_CALLS]name[ARGS]{...}.
    "mistral one call": ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", '
                                    '"unit": "celsius"}}]', None, [WEATHER]),
    "mistral two calls": ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
                                     '"celsius"}, "id": "abcDEF123"}, {"name": "get_time", "arguments": '
                                     '{"timezone": "Europe/Paris"}}]', None, [WEATHER, TIME]),
    "mistral named": ("mistral", '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}', None, [TIME]),
    "mistral two named": ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
                                     '[TOOL_CALLS]get_time[ARGS]{}', None, [WEATHER, NO_ARGUMENTS]),
    "mistral text before": ("mistral", 'Checking. [TOOL_CALLS][{"name": "get_time", "arguments": {}}]', "Checking.",
                            [NO_ARGUMENTS]),
    "mistral no call": ("mistral", "Paris. [TOOL", None, []),
    "mistral malformed list": ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {}', None, []),
    "mistral malformed name": ("mistral", "[TOOL_CALLS]get time[ARGS]{}", None, []),
}


def expected_content(answer: str, content: str | None, calls: list[ToolCall]) -> str | None:
    return content if calls else answer  # an answer without a call is all content


@pytest.mark.parametrize("name", list(ANSWERS))
def test_answers_parse_to_their_calls(name):
    parser, answer, content, calls = ANSWERS[name]
    assert parse_tool_calls(parser, answer) == (expected_content(answer, content, calls), calls)


def stream(parser: str, pieces: list[str]) -> tuple[str, list[ToolCall], list[str]]:
    """The content and calls a client assembles from a stream of pieces, and the calls' ids."""
    streaming = StreamingToolParser(parser)
    outputs = [streaming.push(piece) for piece in pieces] + [streaming.finish()]
    content = "".join(text for text, _ in outputs)
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    ids = []
    for delta in (delta for _, deltas in outputs for delta in deltas):
        index = delta["index"]
        if index not in names:  # the first entry of a call names it
            assert index == len(names), "calls are numbered in order from 0"
            assert delta["type"] == "function" and delta["function"]["arguments"] == ""
            names[index], arguments[index] = delta["function"]["name"], ""
            ids.append(delta["id"])
        else:
            assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
            arguments[index] += delta["function"]["arguments"]
    return content, [ToolCall(names[i], arguments[i]) for i in sorted(names)], ids


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, len(text) // 2))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("name", list(ANSWERS))
def test_streamed_answers_reassemble_to_the_parsed_ones(name):
    parser, answer, content, calls = ANSWERS[name]
    rng = random.Random(name)
    for pieces in [list(answer), [answer], *(random_pieces(answer, rng) for _ in range(8))]:
        streamed_content, streamed_calls, ids = stream(parser, pieces)
        assert streamed_content == (expected_content(answer, content, calls) or "")
        assert streamed_calls == calls
        assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == len(ids)


# Calls of every format and pieces of them, mixed at random into answers well- and ill-formed.
CALL_TEXTS = ['<tool_call>\n{"name": "f", "arguments": {"a": [1, "]"]}}\n</tool_call>',
              '{"name": "f", "parameters": {}}', "[get_time(zone='UTC', n=[1])]",
              '[TOOL_CALLS][{"name": "f", "arguments": {"a": "}"}}]', '[TOOL_CALLS]f[ARGS]{"a": "}"}']
PIECES = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", '{"name": "f", ', "}", "{",
          "[", "]", "get_time(", ")", ";", ", ", " ", "\n", "Paris", '"', "<tool", "[TOOL"]


@pytest.mark.parametrize("parser", list(PARSERS))
def test_streams_of_random_answers_match_their_parse(parser):
    rng = random.Random(parser)
    for _ in range(300):
        answer = "".join(rng.choices(CALL_TEXTS * 3 + PIECES, k=rng.randint(1, 6)))
        content, calls = parse_tool_calls(parser, answer)
        assert stream(parser, random_pieces(answer, rng))[:2] == (content or "", calls), answer


def test_content_is_held_back_only_while_it_may_begin_a_call():
    streaming = StreamingToolParser("hermes")
    assert streaming.push("Checking <tool_") == ("Checking", [])  # the space goes if a call follows it
    content, deltas = streaming.push('call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert content == "" and [d["index"] for d in deltas] == [0, 0]  # sent before the answer ends
    assert deltas[0]["function"]["name"] == "get_time" and deltas[1]["function"]["arguments"] == "{}"
    assert streaming.finish() == ("", [])

    markdown = StreamingToolParser("pythonic")
    assert markdown.push("[Par") == ("", [])
    assert markdown.push("is] is") == ("[Paris] is", [])  # a link, not a call: shown at once

    llama = StreamingToolParser("llama3_json")
    assert llama.push(' {"na') == ("", [])
    assert llama.push("me") == ("", [])
    assert llama.finish() == (' {"name', [])


def test_a_call_is_sent_once_its_text_is_complete():
    streaming = StreamingToolParser("pythonic")
    assert streaming.push('[get_weather(city="Paris", unit="celsius")') == ("", [])
    content, deltas = streaming.push("]")
    assert content == "" and deltas[0]["function"]["name"] == "get_weather"
    assert deltas[1]["function"]["arguments"] == WEATHER.arguments
    assert streaming.finish() == ("", [])


@pytest.mark.parametrize("parser, answer", [
    ("hermes", "<tool_call>" + "[" * 100_000 + "</tool_call>"),
    ("llama3_json", '{"name": "f", "parameters": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("mistral", "[TOOL_CALLS]" + "[" * 100_000),
    ("pythonic", "[f(a=" + "[" * 1000 + "]" * 1000 + ")]"),
    ("pythonic", "[f(a=" + "-" * 100_000 + "1)]"),
])
def test_deeply_nested_answers_are_content_not_errors(parser, answer):
    assert parse_tool_calls(parser, answer) == (answer, [])


def test_tool_call_in_openai_shape():
    assert WEATHER.openai("call_1") == {"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}


def test_unknown_parser_is_named():
    with pytest.raises(ValueError, match="tool call parser 'qwen': expected one of llama3_json, pythonic, hermes"):
        parse_tool_calls("qwen", "Hi")
    with pytest.raises(ValueError, match="tool call parser 'qwen'"):
        StreamingToolParser("qwen")


# --- The parser a chat template asks for -------------------------------------------------------------

TEMPLATE_SNIPPETS = {
    "hermes": """{%- if tools %}{{- '<|im_start|>system\\nYou may call functions. Functions:\\n<tools>' }}
{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}
{{- '</tools>\\nWrite each call as <tool_call>\\n{"name": <name>, "arguments": <object>}\\n</tool_call>' }}
{%- endif %}""",
    "mistral": """{%- for message in messages %}{%- if message.tool_calls %}{{- '[TOOL_CALLS][' }}
{%- for call in message.tool_calls %}{{- call.function | tojson }}{%- endfor %}{{- ']' + eos_token }}
{%- endif %}{%- endfor %}""",
    "llama3_json": """{%- if tool_call.name in builtin_tools %}{{- '<|python_tag|>' + tool_call.name + '.call(' }}
{%- else %}{{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}' }}
{%- endif %}""",
    "pythonic": """{{- 'To call functions, reply only with a list of calls such as '
'[func_name(param_name=value, other_param=value), other_func(param=value)]' }}
{%- if message.role == 'ipython' %}{{- '<|python_tag|>' }}{%- endif %}""",
}


@pytest.mark.parametrize("parser", list(TEMPLATE_SNIPPETS))
def test_parser_chosen_from_template_markers(parser):
    assert parser in PARSERS
    assert parser_for_template(TEMPLATE_SNIPPETS[parser]) == parser


def test_templates_without_tool_format_have_no_parser():
    assert parser_for_template(None) is None
    assert parser_for_template("{% for m in messages %}<|turn|>{{ m.role }}\n{{ m['content'] }}{% endfor %}") is None


def test_smollm2_template_shows_no_tool_format(smollm2_hf):
    from llama_int8.tokenizer import load_tokenizer

    assert parser_for_template(load_tokenizer(smollm2_hf / "tokenizer.json").chat_template) is None
