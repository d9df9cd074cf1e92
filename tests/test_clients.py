"""Real clients against the real server on 127.0.0.1 with SmolLM2-135M: instructor (JSON and TOOLS
modes) and langchain-openai (with_structured_output by json_schema and by function_calling,
bind_tools with tool_choice required, named and auto, streamed, and a tool's result sent back) get
valid objects. Greedy answers, a small token budget and no client retries: a failure shows at once.
The clients are test-only dependencies (requirements-test.txt)."""

from __future__ import annotations

import openai
import pytest
from pydantic import BaseModel, Field


instructor = pytest.importorskip("instructor")
langchain_openai = pytest.importorskip("langchain_openai")
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402

pytestmark = pytest.mark.slow

MAX_TOKENS = 60  # one call is about 30 tokens; a longer answer is cut, not waited for


class Person(BaseModel):
    name: str
    age: int


class City(BaseModel):
    name: str
    country: str


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="The city's name")


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"Sunny in {city}"


WEATHER_QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def openai_client(smollm2_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def chat(smollm2_server):
    return langchain_openai.ChatOpenAI(base_url=f"{smollm2_server}/v1", api_key="unused", model="smollm2",
                                       temperature=0, max_tokens=MAX_TOKENS, max_retries=0)


def assert_person(person) -> None:
    assert isinstance(person, Person), person
    assert isinstance(person.name, str) and person.name.strip(), person
    assert isinstance(person.age, int) and 0 <= person.age <= 150, person


def assert_city(city) -> None:
    assert isinstance(city, City), city
    assert isinstance(city.name, str) and city.name.strip(), city
    assert isinstance(city.country, str) and city.country.strip(), city


def assert_weather_call(call: dict, name: str) -> None:
    """A langchain ToolCall: the tool's name and its arguments parsed to a dict."""
    assert call["name"] == name, call
    assert isinstance(call["args"], dict) and isinstance(call["args"].get("city"), str), call
    assert call["args"]["city"].strip() and call["id"], call


# --- instructor --------------------------------------------------------------------------------------

def test_instructor_json_mode_gets_a_person(openai_client):
    # JSON mode sends response_format json_object (JSON enforced, not the schema) and the schema in a
    # system message: a 135M model needs the object's shape shown in the question.
    client = instructor.from_openai(openai_client, mode=instructor.Mode.JSON)
    person, completion = client.chat.completions.create_with_completion(
        model="smollm2", response_model=Person, max_retries=0, temperature=0, max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": 'Reply with a JSON object: {"name": ..., "age": ...}. '
                                              "Alice is 30 years old."}])
    assert_person(person)
    assert completion.choices[0].finish_reason == "stop"


def test_instructor_tools_mode_gets_a_city(openai_client):
    # TOOLS mode names the model's function in tool_choice: the server enforces the call by a grammar.
    client = instructor.from_openai(openai_client, mode=instructor.Mode.TOOLS)
    city, completion = client.chat.completions.create_with_completion(
        model="smollm2", response_model=City, max_retries=0, temperature=0, max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": "Paris is the capital of France. Extract the city."}])
    assert_city(city)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert [call.function.name for call in choice.message.tool_calls] == ["City"]


# --- langchain-openai: with_structured_output ----------------------------------------------------------

@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_gets_the_model(chat, method):
    structured = chat.with_structured_output(City, method=method, include_raw=True)
    got = structured.invoke("Paris is the capital of France. Extract the city.")
    assert got["parsing_error"] is None, got
    assert_city(got["parsed"])


# --- langchain-openai: bind_tools ----------------------------------------------------------------------

@pytest.mark.parametrize("tool,choice,strict,name", [
    (get_weather, "get_weather", None, "get_weather"),  # a function, named in tool_choice
    (GetWeather, "any", True, "GetWeather"),  # a pydantic model; "any" is langchain's word for "required"
    (GetWeather, "any", None, "GetWeather"),  # not strict: the server admits no argument the tool does not list
], ids=["function-named", "pydantic-required-strict", "pydantic-required"])
def test_langchain_bind_tools_forced_call(chat, tool, choice, strict, name):
    # One call: with parallel calls allowed SmolLM2 repeats its call until the token budget ends.
    message = chat.bind_tools([tool], tool_choice=choice, parallel_tool_calls=False,
                              strict=strict).invoke(WEATHER_QUESTION)
    assert isinstance(message, AIMessage)
    assert len(message.tool_calls) == 1 and not message.invalid_tool_calls, message
    assert_weather_call(message.tool_calls[0], name)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert not message.content, message.content


@pytest.fixture(scope="module")
def required_with_parallel_calls(chat) -> AIMessage:
    """tool_choice "required" as bind_tools sends it by default: parallel calls allowed."""
    return chat.bind_tools([get_weather], tool_choice="required").invoke(WEATHER_QUESTION)


def test_langchain_bind_tools_required_with_parallel_calls(required_with_parallel_calls):
    message = required_with_parallel_calls
    assert message.tool_calls and not message.invalid_tool_calls, message
    for call in message.tool_calls:
        assert_weather_call(call, "get_weather")
    assert message.response_metadata["finish_reason"] in ("tool_calls", "length")


def test_langchain_bind_tools_required_cut_answer_has_no_tag_in_content(required_with_parallel_calls):
    assert "tool_call" not in (required_with_parallel_calls.content or ""), required_with_parallel_calls.content


def test_langchain_bind_tools_auto(chat):
    # A 135M model may answer in text: only a call it makes is checked.
    short = chat.model_copy(update={"max_tokens": 40})
    message = short.bind_tools([get_weather], tool_choice="auto").invoke(WEATHER_QUESTION)
    assert isinstance(message, AIMessage) and not message.invalid_tool_calls, message
    if message.tool_calls:
        for call in message.tool_calls:
            assert_weather_call(call, "get_weather")
    else:
        assert isinstance(message.content, str) and message.content.strip(), message


def test_langchain_bind_tools_streams_the_call(chat):
    chunks = list(chat.bind_tools([get_weather], tool_choice="get_weather").stream(WEATHER_QUESTION))
    assert len(chunks) > 1
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert len(whole.tool_calls) == 1 and not whole.invalid_tool_calls, whole
    assert_weather_call(whole.tool_calls[0], "get_weather")
    assert whole.response_metadata.get("finish_reason") == "tool_calls"


def test_langchain_tool_result_goes_back(chat):
    # An assistant's call and its result (a ToolMessage) in the history: the server takes both.
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    history = [HumanMessage(WEATHER_QUESTION), AIMessage("", tool_calls=[call]),
               ToolMessage(get_weather("Paris"), tool_call_id="call_1")]
    short = chat.model_copy(update={"max_tokens": 30})
    answer = short.bind_tools([get_weather]).invoke(history)
    assert isinstance(answer, AIMessage) and not answer.invalid_tool_calls, answer
    assert answer.tool_calls or (isinstance(answer.content, str) and answer.content.strip()), answer
