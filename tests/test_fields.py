"""Every field of the OpenAI requests is honoured, a no-op or refused, as openai_api.FIELDS and the
README's table say: the table against the code, each refused field a 400 naming it, each no-op
changing no answer, and each honoured field doing what the table says, on the real server."""

from __future__ import annotations

import math
import re
from pathlib import Path

import httpx
import pytest

from llama_int8 import openai_api as api
from llama_int8.engine import Engine, Request
from llama_int8.sampling import SamplingParams
from test_serve import CHAT, MODEL, PROMPTS, assert_openai_error, headers, server, tiny_folder, tiny_llm

__all__ = ["server", "tiny_folder", "tiny_llm"]  # fixtures used through pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BODY_MODELS = {"chat": api.ChatCompletionRequest, "completions": api.CompletionRequest}
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def fields_of(endpoint: str) -> set[str]:
    return set(BODY_MODELS[endpoint].model_fields)


def taken_on(where: str) -> list[str]:
    return ["chat", "completions"] if where == "both" else [where]


def post(server: str, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{ROUTES[endpoint]}", json={"model": MODEL, **body}, headers=headers(), timeout=60)


def base_body(endpoint: str) -> dict:
    if endpoint == "chat":
        return {"messages": CHAT, "max_tokens": 8, "temperature": 0}
    return {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


# --- The table against the code ----------------------------------------------------------------------

def test_every_field_the_bodies_declare_is_in_the_table_where_it_is_taken():
    declared = fields_of("chat") | fields_of("completions")
    taken = {name for name, (_, what, _) in api.FIELDS.items() if what != api.REFUSED}
    assert taken <= declared and declared - taken <= {"suffix"}  # suffix is parsed to refuse it by name
    for name, (where, what, _) in api.FIELDS.items():
        if what == api.REFUSED:
            continue
        for endpoint in ("chat", "completions"):
            assert (name in fields_of(endpoint)) == (endpoint in taken_on(where)), (name, endpoint)


def test_the_readme_table_is_the_code_table():
    rows = re.findall(r"^\| `([a-z_]+)` \| (chat|completions|both) \| (honoured|no-op|refused) \| (.+) \|$",
                      README.read_text(), flags=re.MULTILINE)
    assert {name: (where, what, why) for name, where, what, why in rows} == api.FIELDS
    assert len(rows) == len(api.FIELDS)


# --- Refused and no-op fields ------------------------------------------------------------------------

REFUSED_VALUES = {"suffix": "the end", "tools": [{"type": "function", "function": {"name": "f"}}],
                  "tool_choice": "auto", "functions": [{"name": "f"}], "function_call": "auto",
                  "audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"},
                  "reasoning_effort": "low", "verbosity": "low", "web_search_options": {}}


@pytest.mark.parametrize("name", [n for n, (_, what, _) in api.FIELDS.items() if what == api.REFUSED])
def test_a_refused_field_is_a_400_naming_it_and_saying_why(server, name):
    where, _, why = api.FIELDS[name]
    for endpoint in taken_on(where):
        error = assert_openai_error(post(server, endpoint, {**base_body(endpoint), name: REFUSED_VALUES[name]}),
                                    400, name)
        assert why in error["message"]


NO_OP_VALUES = {"user": "someone", "store": False, "metadata": {"project": "x"}, "service_tier": "auto",
                "prompt_cache_key": "k", "safety_identifier": "s", "parallel_tool_calls": True,
                "modalities": ["text"]}


@pytest.mark.parametrize("name", [n for n, (_, what, _) in api.FIELDS.items() if what == api.NO_OP])
def test_a_no_op_field_changes_no_answer(server, name):
    where, _, _ = api.FIELDS[name]
    for endpoint in taken_on(where):
        assert text_of(post(server, endpoint, {**base_body(endpoint), name: NO_OP_VALUES[name]})) == \
            text_of(post(server, endpoint, base_body(endpoint)))


def test_a_no_op_field_is_refused_where_it_would_ask_for_more(server):
    error = assert_openai_error(post(server, "chat", {**base_body("chat"), "modalities": ["text", "audio"]}), 400,
                                "modalities[1]")
    assert "'text'" in error["message"]


def test_unknown_fields_anywhere_are_refused_by_name(server):
    body = {**base_body("chat"), "messages": [{"role": "user", "content": "hi", "colour": "red"}]}
    error = assert_openai_error(post(server, "chat", body), 400, "messages[0].colour")
    assert "not a field this server takes" in error["message"]
    assert_openai_error(post(server, "chat", {**base_body("chat"), "temprature": 0.5}), 400, "temprature")


# --- Honoured fields that the other tests do not cover ---------------------------------------------

def sampled(server: str, extra: dict, seed: int) -> list[dict]:
    """The logprobs entries of a sampled completion at temperature 1: each token and the likeliest 5."""
    body = {"prompt": PROMPTS[seed % len(PROMPTS)], "max_tokens": 12, "temperature": 1.0, "seed": seed,
            "logprobs": 5, **extra}
    logprobs = post(server, "completions", body).json()["choices"][0]["logprobs"]
    return [{"token": t, "logprob": lp, "top": sorted(top.values(), reverse=True)}
            for t, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"])]


def test_top_k_draws_only_among_the_k_likeliest(server):
    for seed in range(4):
        for step in sampled(server, {"top_k": 2}, seed):
            assert step["logprob"] >= step["top"][1] - 1e-6  # the token is first or second
    assert all(s["logprob"] == pytest.approx(s["top"][0], abs=1e-6) for s in sampled(server, {"top_k": 1}, 0))
    # Without the cut, tokens past the second are drawn: the test can see it.
    assert any(s["logprob"] < s["top"][1] - 1e-6 for seed in range(4) for s in sampled(server, {}, seed))


def test_min_p_drops_what_is_less_likely_than_min_p_times_the_likeliest(server):
    drawn_below = 0
    for seed in range(4):
        for step in sampled(server, {"min_p": 0.9}, seed):
            assert step["logprob"] >= math.log(0.9) + step["top"][0] - 1e-6
        drawn_below += sum(s["logprob"] < math.log(0.9) + s["top"][0] for s in sampled(server, {}, seed))
    assert drawn_below > 0  # without min_p such tokens are drawn: the test can see the cut


def test_best_of_equal_to_n_is_taken_and_anything_else_refused(server):
    body = {**base_body("completions"), "n": 2}
    assert len(post(server, "completions", {**body, "best_of": 2}).json()["choices"]) == 2
    assert_openai_error(post(server, "completions", {**body, "best_of": 3}), 400, "best_of")


def test_top_logprobs_without_logprobs_is_refused(server):
    error = assert_openai_error(post(server, "chat", {**base_body("chat"), "top_logprobs": 2}), 400, "top_logprobs")
    assert "needs logprobs: true" in error["message"]


def test_a_chat_ending_with_an_assistant_message_is_continued(server, tiny_llm):
    begun = [*CHAT, {"role": "assistant", "content": "It jumps"}]
    prompt = tiny_llm.encode_dialog(begun, continue_final=True)
    (expected,) = Engine(tiny_llm.model, tiny_llm.tokenizer).run(
        [Request(prompt, 8, SamplingParams(temperature=0.0), tiny_llm.tokenizer.stop_ids)])
    body = {**base_body("chat"), "messages": begun}
    assert text_of(post(server, "chat", body)) == expected.text
    assert text_of(post(server, "chat", {**body, "continue_final_message": True})) == expected.text
    assert_openai_error(post(server, "chat", {**body, "continue_final_message": False}), 400,
                        "continue_final_message")
    assert_openai_error(post(server, "chat", {**base_body("chat"), "continue_final_message": True}), 400,
                        "continue_final_message")


def test_a_model_is_described_by_its_own_route(server):
    response = httpx.get(f"{server}/v1/models/{MODEL}", headers=headers())
    assert response.status_code == 200
    assert response.json() == httpx.get(f"{server}/v1/models", headers=headers()).json()["data"][0]
    assert_openai_error(httpx.get(f"{server}/v1/models/gpt-4", headers=headers()), 404, "model", "model_not_found")
    assert httpx.get(f"{server}/v1/models/{MODEL}", headers=headers("wrong")).status_code == 401
