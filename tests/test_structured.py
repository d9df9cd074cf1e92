"""Structured output through the real server on 127.0.0.1: response_format (json_object,
json_schema) and structured_outputs (regex, Lark grammar, choice) on SmolLM2 and on a tiny random
model. Every answer that finishes parses and validates (jsonschema); a schema that cannot be
enforced is a 400 naming it; streamed text equals the whole answer; a constrained greedy request
gets the same tokens alone as among 7 others; the batch runner's lines validate too."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from llama_int8 import Llama
from llama_int8.engine import Engine
from llama_int8.openai_api import StructuredOutputs, grammar_of
from llama_int8.sampling import SamplingParams
from llama_int8.server import ServerSettings, create_app
from conftest import running_server, tiny_hf_model, wait_ready, write_hf_folder
from test_batch import read_results, run_batch_cli, write_lines
from test_serve import MODEL, assert_openai_error, build_tiny

# Twenty schemas of the shapes applications send: nested objects, arrays, enums, required fields,
# bounded numbers, patterned strings. Strings and arrays are bounded so that a random model's
# answers end within the token budget.
NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -10, "maximum": 10}, "y": {"type": "integer", "minimum": -10, "maximum": 10}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"],
     "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}},
     "required": ["price"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                      "count": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["id", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "event"}, "day": {"enum": ["mon", "tue", "wed"]}},
     "required": ["kind", "day"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, NAME]}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"people": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"name": NAME}, "required": ["name"], "additionalProperties": False}}},
     "required": ["people"], "additionalProperties": False},
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 10}}, "required": ["note"],
     "additionalProperties": False},
    {"type": "object", "$defs": {"leaf": {"type": "integer", "minimum": 0, "maximum": 5}},
     "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
     "required": ["left", "right"], "additionalProperties": False},
    {"type": "object", "properties": {"title": NAME, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                                      "draft": {"type": "boolean"}},
     "required": ["title", "rating"], "additionalProperties": False},
    {"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [NAME, {"type": "integer", "minimum": 0,
                                                                                      "maximum": 9}],
                                               "items": False}}, "required": ["pair"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "minimum": 1, "maximum": 3}, "labels": {
        "type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}, "required": ["level", "labels"],
     "additionalProperties": False},
    {"type": "object", "properties": {"email": {"type": "string", "format": "email", "maxLength": 30}},
     "required": ["email"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
     "required": ["score"], "additionalProperties": False},
]


def schema_format(i: int) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"schema_{i}", "schema": SCHEMAS[i], "strict": True}}


def completion_body(fmt: dict, seed: int) -> dict:
    return {"model": MODEL, "prompt": "The answer as JSON:", "max_tokens": 200, "temperature": 1.0, "seed": seed,
            "response_format": fmt}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_hf: Path) -> Path:
    """A tiny random model with SmolLM2's tokenizer (byte-level BPE: it can spell any text)."""
    folder = write_hf_folder(tiny_hf_model(seed=5, vocab_size=49152), tmp_path_factory.mktemp("structured"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((smollm2_hf / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def tiny_llm(tiny_folder: Path) -> Llama:
    return build_tiny(tiny_folder, slots=8)


@pytest.fixture(scope="module")
def tiny_server(tiny_llm) -> Iterator[str]:
    with running_server(create_app(ServerSettings(model_name=MODEL, max_queue=64), lambda: tiny_llm)) as url:
        wait_ready(url)
        yield url


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{route}", json=body, timeout=120)


async def post_all(url: str, route: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(timeout=300) as client:
        responses = await asyncio.gather(*(client.post(f"{url}{route}", json=b) for b in bodies))
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses]


# --- A tiny random model: whatever it draws, the grammar holds --------------------------------------

def test_every_schema_answer_validates_on_a_random_model(tiny_server):
    bodies = [completion_body(schema_format(i), seed) for i in range(len(SCHEMAS)) for seed in (1, 2)]
    for body, answer in zip(bodies, asyncio.run(post_all(tiny_server, "/v1/completions", bodies))):
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), body["response_format"]["json_schema"]["schema"])


def test_json_object_always_parses_to_an_object(tiny_server):
    bodies = [completion_body({"type": "json_object"}, seed) | {"max_tokens": 400} for seed in range(8)]
    finished = 0
    for answer in asyncio.run(post_all(tiny_server, "/v1/completions", bodies)):
        choice = answer["choices"][0]
        if choice["finish_reason"] == "stop":
            finished += 1
            assert isinstance(json.loads(choice["text"]), dict)
        else:  # the budget ended first: a prefix of JSON, never anything else
            assert choice["text"].lstrip().startswith("{")
    assert finished >= 4


@pytest.mark.parametrize("regex", [r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", r"(cat|dog)s? [a-z]{1,8}!", r"[A-Z][a-z]{2,6}"])
def test_a_regex_constraint_always_matches(tiny_server, regex):
    bodies = [{"model": MODEL, "prompt": "Say:", "max_tokens": 40, "temperature": 1.0, "seed": seed,
               "structured_outputs": {"regex": regex}} for seed in range(6)]
    for answer in asyncio.run(post_all(tiny_server, "/v1/completions", bodies)):
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop" and re.fullmatch(regex, choice["text"]), choice


def test_a_lark_grammar_and_a_choice_hold(tiny_server):
    grammar = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
    for seed in range(4):
        body = {"model": MODEL, "prompt": "Sum:", "max_tokens": 60, "temperature": 1.0, "seed": seed}
        text = post(tiny_server, "/v1/completions", body | {"structured_outputs": {"grammar": grammar}}).json()
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text["choices"][0]["text"]), text
        choices = ["yes", 'no, "never"', "déjà vu"]
        picked = post(tiny_server, "/v1/completions", body | {"structured_outputs": {"choice": choices}}).json()
        assert picked["choices"][0]["text"] in choices


@pytest.mark.parametrize("fmt,param,words", [
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string", "pattern": "(?=a)b"}}},
     "response_format.json_schema.schema", "look-around"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "wrong"}}},
     "response_format.json_schema.schema", "not supported"),
    ({"type": "json_schema", "json_schema": {"name": "s"}}, "response_format.json_schema.schema", "Field required"),
    ({"type": "json_object", "json_schema": {"name": "s", "schema": {}}}, "response_format", "json_schema"),
    ({"type": "xml"}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
])
def test_what_cannot_be_enforced_is_a_400_naming_it(tiny_server, fmt, param, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "response_format": fmt}
    error = assert_openai_error(post(tiny_server, "/v1/chat/completions", body), 400, param)
    assert words in error["message"]


def test_structured_outputs_take_exactly_one_kind(tiny_server):
    body = {"model": MODEL, "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}
    assert_openai_error(post(tiny_server, "/v1/completions", body), 400, "structured_outputs")
    body = {"model": MODEL, "prompt": "x", "structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}
    assert_openai_error(post(tiny_server, "/v1/completions", body), 400, "structured_outputs")


def test_a_constrained_greedy_request_is_the_same_alone_and_among_seven_others(tiny_llm):
    specs = [grammar_of(StructuredOutputs.model_validate(s)) for s in (
        {"json": SCHEMAS[0]}, {"json": SCHEMAS[7]}, {"regex": r"[a-z]{3,9}"}, {"json": SCHEMAS[12]},
        {"choice": ["alpha", "beta"]}, {"json": SCHEMAS[15]}, {"regex": r"\d{2,5}"}, {"json": SCHEMAS[3]})]
    engine = tiny_llm.engine()
    prompts = [tiny_llm.tokenizer.encode(p, bos=True, eos=False)
               for p in ("JSON:", "The list", "A word", "People", "Pick", "Review", "Digits", "Where")]
    requests = [engine_request(tiny_llm, engine, p, s) for p, s in zip(prompts, specs)]
    together = engine.run(requests)
    for request, got in zip(requests, together):
        (alone,) = tiny_llm.engine().run([request])
        assert (got.tokens, got.text, got.finish_reason) == (alone.tokens, alone.text, alone.finish_reason)
        assert got.finish_reason == "stop"


def engine_request(llm: Llama, engine: Engine, prompt: list[int], spec):
    from llama_int8.engine import Request

    return Request(prompt, 150, SamplingParams(temperature=0.0), llm.tokenizer.stop_ids,
                   grammar=engine.grammars.compile(spec))


def test_two_hundred_batch_lines_with_a_schema_each_all_validate(tiny_folder, tmp_path):
    lines = [{"id": f"r{i}", "prompt": f"Record {i}:", "max_tokens": 150, "temperature": 1.0, "seed": i,
              "response_format": schema_format(i % len(SCHEMAS))} for i in range(200)]
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    run_batch_cli(tiny_folder, requests, results)
    got = read_results(results)
    assert len(got) == 200
    for result in got:
        i = int(result["id"][1:])
        assert result["finish_reason"] == "stop", result
        jsonschema.validate(json.loads(result["text"]), SCHEMAS[i % len(SCHEMAS)])


# --- SmolLM2: a real chat model answers in the shape asked -----------------------------------------

QUESTIONS = ["Describe a person.", "Describe a city.", "Give me a product review.", "Describe the weather today."]


@pytest.mark.slow
def test_smollm2_chat_answers_follow_every_schema(smollm2_server):
    bodies = [{"model": "smollm2", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] +
                                                 " Answer in JSON."}],
               "max_tokens": 120, "temperature": 0.7, "seed": i, "response_format": schema_format(i)}
              for i in range(len(SCHEMAS))]
    for body, answer in zip(bodies, asyncio.run(post_all(smollm2_server, "/v1/chat/completions", bodies))):
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), body["response_format"]["json_schema"]["schema"])


@pytest.mark.slow
def test_smollm2_streams_the_text_it_answers_whole(smollm2_server):
    client = openai.OpenAI(base_url=f"{smollm2_server}/v1", api_key="unused", max_retries=0)
    ask = dict(model="smollm2", messages=[{"role": "user", "content": "Describe a person in JSON."}],
               max_tokens=80, temperature=0, response_format=schema_format(0))
    whole = client.chat.completions.create(**ask).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                       if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), SCHEMAS[0])
    question = [{"role": "user", "content": 'Reply with a JSON object: {"answer": ...}. What is 2 + 2?'}]
    json_object = client.chat.completions.create(**{**ask, "messages": question,
                                                    "response_format": {"type": "json_object"}}).choices[0]
    assert json_object.finish_reason == "stop" and isinstance(json.loads(json_object.message.content), dict)
