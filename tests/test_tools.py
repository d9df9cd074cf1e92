"""Tool calls through the real server on 127.0.0.1: the openai SDK's round trip (call, tool result,
answer) on SmolLM2 with tool_choice required and named, streamed calls reassembling to the whole
answer's, enforced calls whose arguments always follow the function's parameters on a random
model, the batch runner's lines, and every refusal."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from llama_int8.tool_use import describe_tools, tool_use_of
from test_batch import read_results, run_batch_cli, write_lines
from test_serve import MODEL, assert_openai_error
from test_structured import post_all, tiny_folder, tiny_llm, tiny_server

__all__ = ["tiny_folder", "tiny_llm", "tiny_server"]  # fixtures used through pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "The sum of two whole numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                                    "b": {"type": "integer", "minimum": -999, "maximum": 999}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


# --- SmolLM2 and the openai SDK ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_client(smollm2_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_server}/v1", api_key="unused", max_retries=0)


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", named("get_weather")])
def test_the_sdk_round_trip_call_result_answer(smollm2_client, choice):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = smollm2_client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, tool_choice=choice,
                                                   parallel_tool_calls=False, temperature=0, max_tokens=60)
    answer = first.choices[0]
    assert answer.finish_reason == "tool_calls"
    call = answer.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS["get_weather"])
    assert arguments["city"] == "Paris"

    messages += [answer.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    final = smollm2_client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS,
                                                   temperature=0, max_tokens=60).choices[0]
    assert final.finish_reason == "stop" and not final.message.tool_calls
    assert final.message.content


def streamed_and_whole(client: openai.OpenAI, ask: dict) -> None:
    """The answer to ask streamed reassembles to the whole answer: content, calls, finish reason."""
    whole = client.chat.completions.create(**ask).choices[0]
    calls: dict[int, dict] = {}
    content, reasons = "", []
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasons += [choice.finish_reason] if choice.finish_reason else []
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] = (delta.function.name if delta.function else None) or call["name"]
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert reasons == [whole.finish_reason]
    assert content == (whole.message.content or "")
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert all(c["id"] and c["id"].startswith("call_") for c in calls.values())


@pytest.mark.slow
def test_smollm2_streams_the_call_it_answers_whole(smollm2_client):
    streamed_and_whole(smollm2_client, dict(
        model="smollm2", messages=[{"role": "user", "content": "What is 2 plus 40?"}], tools=TOOLS,
        tool_choice=named("add"), temperature=0, max_tokens=60))


def test_streamed_calls_of_a_random_model_reassemble(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0)
    for seed, choice in enumerate(["required", "auto", "required", named("add")]):
        streamed_and_whole(client, {**chat_body(choice, seed), "max_tokens": 100})


# --- A random model: enforced calls always follow the parameters ------------------------------------

def chat_body(choice, seed: int, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Do something."}], "tools": TOOLS,
            "tool_choice": choice, "temperature": 1.0, "seed": seed, "max_tokens": 150, **extra}


@pytest.mark.parametrize("choice", ["required", named("add")])
def test_enforced_calls_always_parse_and_follow_the_parameters(tiny_server, choice):
    bodies = [chat_body(choice, seed, parallel_tool_calls=seed % 2 == 0) for seed in range(8)]
    for body, answer in zip(bodies, asyncio.run(post_all(tiny_server, "/v1/chat/completions", bodies))):
        message, reason = answer["choices"][0]["message"], answer["choices"][0]["finish_reason"]
        assert reason == "tool_calls", answer
        assert len(message["tool_calls"]) == 1 or body["parallel_tool_calls"]
        for call in message["tool_calls"]:
            name = call["function"]["name"]
            assert isinstance(choice, str) or name == "add"
            jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[name])


def test_tool_choice_none_leaves_the_answer_as_text(tiny_server):
    answer = httpx.post(f"{tiny_server}/v1/chat/completions", json=chat_body("none", 1, max_tokens=8), timeout=60)
    assert answer.status_code == 200
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]


@pytest.mark.parametrize("change,param,words", [
    ({"tool_choice": named("divide")}, "tool_choice", "'divide' is none of the tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "no tools to choose from"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "leaves no room"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "pattern"),
    ({"functions": [{"name": "f"}]}, "functions", "deprecated"),
])
def test_tool_requests_that_cannot_be_served_are_400_naming_the_field(tiny_server, change, param, words):
    response = httpx.post(f"{tiny_server}/v1/chat/completions", json={**chat_body("auto", 0), **change}, timeout=60)
    assert words in assert_openai_error(response, 400, param)["message"]


def test_tool_messages_need_the_call_they_answer(tiny_server):
    messages = [{"role": "user", "content": "Add."},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                      "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
                {"role": "tool", "tool_call_id": "call_9", "content": "3"}]
    response = httpx.post(f"{tiny_server}/v1/chat/completions", json={**chat_body("auto", 0), "messages": messages})
    assert "names none of the assistant's tool_calls" in assert_openai_error(response, 400, "messages")["message"]
    messages[-1]["tool_call_id"] = "call_1"
    assert httpx.post(f"{tiny_server}/v1/chat/completions", json={**chat_body("auto", 0), "messages": messages},
                      timeout=60).status_code == 200


def test_batch_lines_call_tools_as_the_server_does(tiny_folder, tmp_path):
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": chat_body(named("get_weather"), i, max_tokens=120)} for i in range(6)]
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    run_batch_cli(tiny_folder, requests, results, "--max_seq_len", "640")  # room for the tools' description
    for result in read_results(results):
        choice = result["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "tool_calls", result
        jsonschema.validate(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]),
                            PARAMETERS["get_weather"])


# --- How the tools reach the prompt -------------------------------------------------------------------

def test_a_template_without_tools_gets_them_in_its_system_message():
    use = tool_use_of(TOOLS, None, None, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert (use.parser, use.in_template, use.choice, use.template_tools()) == ("hermes", False, "auto", None)
    with_system = use.prompt_dialog([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert with_system[0]["content"] == "Be brief.\n\n" + describe_tools(TOOLS) and len(with_system) == 2
    alone = use.prompt_dialog([{"role": "user", "content": "Hi"}])
    assert alone[0] == {"role": "system", "content": describe_tools(TOOLS)}
    assert all(json.dumps(t["function"]) in describe_tools(TOOLS) for t in TOOLS)


def test_a_template_that_takes_tools_renders_them_and_names_its_format():
    template = "{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}[TOOL_CALLS]"
    use = tool_use_of(TOOLS, "auto", None, template)
    assert (use.parser, use.in_template, use.template_tools()) == ("mistral", True, TOOLS)
    assert use.prompt_dialog([{"role": "user", "content": "Hi"}]) == [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="enforced for the hermes and llama3_json call formats"):
        tool_use_of(TOOLS, "required", None, template).grammar()


def test_a_parser_named_on_the_command_line_wins_over_the_template():
    template = "{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}<tool_call>"
    assert tool_use_of(TOOLS, "auto", None, template).parser == "hermes"
    assert tool_use_of(TOOLS, "auto", None, template, parser="llama3_json").parser == "llama3_json"
    grammar = tool_use_of(TOOLS, named("add"), None, template, parser="llama3_json").grammar()
    assert grammar.kind == "json_schema" and json.loads(grammar.source)["properties"]["name"] == {"const": "add"}
