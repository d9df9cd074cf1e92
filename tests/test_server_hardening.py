"""Hostile and faulty requests against the server on 127.0.0.1: each gets its exact status, error
shape and param, costs no other request anything, and leaves the server healthy; shutdown ends every
answer in flight visibly; a property test over request bodies finds no 500 and no request left
unanswered."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from conftest import tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.engine import Engine, Request
from llama_int8.sampling import SamplingParams, next_tokens
from llama_int8.server import ServerSettings, create_app
from test_serve import KEY, MODEL, PROMPTS, build_tiny, engine_text, headers, running_server, server_process, \
    tiny_folder, wait_ready  # noqa: F401 (tiny_folder is a fixture)

SLOTS, QUEUE = 4, 16
CHAT = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def tiny_llm(tiny_folder):
    return build_tiny(tiny_folder, slots=SLOTS)


@pytest.fixture(scope="module")
def server(tiny_llm):
    app = create_app(ServerSettings(model_name=MODEL, api_key=KEY, max_queue=QUEUE, max_body_bytes=64_000),
                     lambda: tiny_llm)
    with running_server(app) as url:
        wait_ready(url)
        yield url


def post_raw(url: str, body: dict | str, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    """POST a body as JSON with escapes for what UTF-8 cannot hold (lone surrogates), as clients send them."""
    data = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(url, content=data.encode(), timeout=timeout,
                      headers={"content-type": "application/json", **(headers(key) if key else {})})


def openai_error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def greedy_stream(url: str, prompt: str, max_tokens: int) -> tuple[str, str | None]:
    """The streamed text and finish reason of a greedy completion."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    text, reason = "", None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers(), timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    return text, reason


def alone(llm, prompt: str, max_tokens: int) -> tuple[str, str]:
    return engine_text(llm, llm.tokenizer.encode(prompt, bos=True, eos=False), max_tokens)


# --- One request's bad parameter fails nobody else ----------------------------------------------------

@pytest.mark.parametrize("change,param", [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 10**30}, "seed"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),  # > 0, but 0 in float32
    ({"top_p": 1e-300}, "top_p"),
    ({"logit_bias": {str(2**70): 1}}, "logit_bias"),
    ({"max_tokens": 2**70}, "messages"),  # context_length_exceeded
])
def test_values_beyond_what_the_engine_computes_in_answer_400_naming_them(server, change, param):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, **change}
    openai_error(post_raw(f"{server}/v1/chat/completions", body), 400, param)
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_seeds_at_both_ends_of_the_range_are_served(server):
    """torch seeds modulo 2**64: -1 draws as 2**64 - 1, and the choices past the end wrap to 0, 1, ..."""
    def texts(seed: int, n: int) -> list[str]:
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "seed": seed, "n": n}
        response = post_raw(f"{server}/v1/completions", body)
        assert response.status_code == 200, response.text
        return [c["text"] for c in response.json()["choices"]]

    assert texts(2**64 - 1, 3) == texts(-1, 3)
    assert texts(2**64 - 1, 3)[1:] == texts(0, 2)
    assert texts(-(2**63), 1) == texts(2**63, 1)


def test_a_bad_request_beside_running_streams_leaves_their_answers_untouched(server, tiny_llm):
    async def run() -> list:
        async with httpx.AsyncClient(timeout=120) as client:
            async def stream(prompt: str) -> str:
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}
                text = ""
                async with client.stream("POST", f"{server}/v1/completions", json=body, headers=headers()) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text

            async def hostile(change: dict) -> int:
                await asyncio.sleep(0.05)
                body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "temperature": 1, **change}
                return (await client.post(f"{server}/v1/completions", content=json.dumps(body),
                                          headers={**headers(), "content-type": "application/json"})).status_code

            return await asyncio.gather(*(stream(p) for p in PROMPTS[:3]),
                                        hostile({"seed": 2**64}), hostile({"repetition_penalty": 1e-300}))

    *texts, seed_status, penalty_status = asyncio.run(run())
    assert (seed_status, penalty_status) == (400, 400)
    assert texts == [alone(tiny_llm, p, 40)[0] for p in PROMPTS[:3]]


def test_a_row_whose_sampling_fails_ends_alone_and_its_neighbours_finish(tiny_llm, monkeypatch, caplog):
    doomed = tiny_llm.tokenizer.encode(PROMPTS[1], bos=True, eos=False)
    choose = Engine.choose

    def failing_choose(seq, logits):
        if list(seq.request.prompt) == doomed and seq.generated == 3:
            raise RuntimeError("injected sampling failure")
        return choose(seq, logits)

    monkeypatch.setattr(Engine, "choose", staticmethod(failing_choose))
    prompts = [tiny_llm.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:4]]
    requests = [Request(p, 12, SamplingParams(temperature=0.0)) for p in prompts]
    results = Engine(tiny_llm.model, tiny_llm.tokenizer).run(requests)
    assert results[1].finish_reason == "error" and len(results[1].tokens) == 3
    monkeypatch.setattr(Engine, "choose", staticmethod(choose))
    for i in (0, 2, 3):
        (reference,) = Engine(tiny_llm.model, tiny_llm.tokenizer).run([requests[i]])
        assert (results[i].tokens, results[i].finish_reason) == (reference.tokens, "length")
    assert "injected sampling failure" in caplog.text


def test_a_request_whose_setup_fails_ends_alone(tiny_llm, monkeypatch):
    from llama_int8 import engine

    real = engine.ActiveRequest.__init__

    def failing_setup(self, handle, *args):
        if handle.request.sampling.seed == 123:
            raise RuntimeError("injected setup failure")
        real(self, handle, *args)

    monkeypatch.setattr(engine.ActiveRequest, "__init__", failing_setup)
    prompt = tiny_llm.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    results = Engine(tiny_llm.model, tiny_llm.tokenizer).run(
        [Request(prompt, 5, SamplingParams(temperature=0.0)), Request(prompt, 5, SamplingParams(seed=123)),
         Request(prompt, 5, SamplingParams(temperature=0.0, seed=7))])
    assert [r.finish_reason for r in results] == ["length", "error", "length"]
    assert results[0].tokens == results[2].tokens


def test_a_penalty_that_overflows_float32_samples_instead_of_failing():
    logits = torch.tensor([[3.0, 2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # 1e-40 is a float32 (subnormal): 3 / 1e-40 is beyond float32's range
        token = next_tokens(logits, 1.0, 1.0, 1e-40, seen, generator).item()
        assert token in (0, 1)  # the two seen tokens' logits became the largest, and tie


# --- Text that is not valid Unicode ------------------------------------------------------------------

@pytest.mark.parametrize("route,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": ["ok", "\ud800"]}, "stop[1]"),
    ("/v1/completions", {"prompt": "caf\udce9"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "\ud83d"]}, "prompt[1]"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
])
def test_text_that_is_not_valid_unicode_answers_400_naming_the_field(server, route, body, param):
    error = openai_error(post_raw(f"{server}{route}", {"model": MODEL, "max_tokens": 2, **body}), 400, param)
    assert "lone surrogate" in error["message"] and error["type"] == "invalid_request_error"


def test_ids_a_padded_model_has_but_its_tokenizer_lacks_are_refused(tmp_path, sp_model):
    padded = write_hf_folder(tiny_hf_model(seed=3, vocab_size=160), tmp_path / "padded", tokenizer=sp_model)
    llm = Llama.build(padded, quant="none", dtype="float32", device="cpu", max_seq_len=64, max_batch_size=2)
    with running_server(create_app(ServerSettings(model_name=MODEL), lambda: llm)) as url:
        wait_ready(url)
        error = openai_error(post_raw(f"{url}/v1/completions", {"prompt": [[1, 150]], "max_tokens": 2}), 400, "prompt")
        assert "[0, 128)" in error["message"]
        openai_error(post_raw(f"{url}/detokenize", {"tokens": [5, 150]}), 400, "tokens")
        assert post_raw(f"{url}/v1/completions", {"prompt": [[1, 127]], "max_tokens": 2}).status_code == 200


# --- Limits and statuses -----------------------------------------------------------------------------

def test_one_stop_string_of_any_length_is_one_stop_string(server):
    response = post_raw(f"{server}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2,
                                                      "stop": "a stop string well over sixteen characters"})
    assert response.status_code == 200, response.text
    error = openai_error(post_raw(f"{server}/v1/completions", {"model": MODEL, "prompt": "a", "stop": ["x"] * 17}),
                         400, "stop")
    assert "at most 16" in error["message"]


def test_more_completions_than_the_server_can_ever_hold_answer_400_not_429(server):
    too_many = SLOTS + QUEUE + 1
    openai_error(post_raw(f"{server}/v1/completions", {"model": MODEL, "prompt": ["a"] * too_many, "max_tokens": 1}),
                 400, "prompt")
    openai_error(post_raw(f"{server}/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "n": 16,
                                                       "max_tokens": 1}), 400, "n")
    fits = post_raw(f"{server}/v1/completions", {"model": MODEL, "prompt": ["a"] * (SLOTS + QUEUE), "max_tokens": 1})
    assert fits.status_code == 200 and len(fits.json()["choices"]) == SLOTS + QUEUE


def test_the_api_key_is_checked_before_the_body_is_read(server):
    for body in ("{not json", json.dumps({"model": MODEL, "messages": "nope"})):
        for key in (None, "sk-wrong"):
            openai_error(post_raw(f"{server}/v1/chat/completions", body, key=key), 401, None, "invalid_api_key")
    openai_error(post_raw(f"{server}/v1/nothing", "{}", key=None), 401, None, "invalid_api_key")


@pytest.mark.parametrize("change,param", [
    ({"stream": "maybe"}, "stream"),
    ({"stream_options": {"include_usage": "yes please"}}, "stream_options.include_usage"),
    ({"stream_options": 3}, "stream_options"),
])
def test_errors_on_stream_fields_name_them(server, change, param):
    openai_error(post_raw(f"{server}/v1/chat/completions", {"model": MODEL, "messages": CHAT, **change}), 400, param)


def test_a_json_syntax_error_names_no_field_and_says_where(server):
    error = openai_error(post_raw(f"{server}/v1/completions", '{"model": "tiny", "prompt": "a",,}'), 400, None)
    assert "not valid JSON at character" in error["message"]


# --- Shutdown ----------------------------------------------------------------------------------------

def read_stream(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_shutdown_ends_every_answer_in_flight_with_an_error_after_the_grace(tiny_folder):
    grace = 1.0
    args = ["--ckpt_dir", str(tiny_folder), "--quant", "none", "--dtype", "float32", "--max_batch_size", "2",
            "--max_seq_len", "8192", "--prefill_chunk", "16", "--shutdown_grace", str(grace)]
    long = {"model": tiny_folder.name, "prompt": PROMPTS[0], "max_tokens": 8000, "ignore_eos": True}
    with server_process(args) as (proc, url):
        wait_ready(url, timeout=120)
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", f"{url}/v1/completions", json={**long, "stream": True},
                               headers=headers()) as stream:
                lines = stream.iter_lines()
                next(lines)  # generating
                results: dict[str, httpx.Response] = {}
                plain = threading.Thread(target=lambda: results.update(plain=httpx.post(
                    f"{url}/v1/completions", json=long, headers=headers(), timeout=120)))
                plain.start()
                time.sleep(0.5)  # the plain request is in its slot
                signalled = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                events = [line[6:] for line in lines if line.startswith("data: ")]
                ended = time.monotonic() - signalled
            plain.join(60)
        error = json.loads(events[-1])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
        assert "[DONE]" not in events  # a client must not take the cut answer as complete
        assert grace <= ended < grace + 5
        openai_error(results["plain"], 503, None, "shutting_down")
        assert proc.wait(30) == 0



# --- Eight clients streaming while hostile requests arrive, then SIGTERM ----------------------------

GOOD_PROMPTS = [*PROMPTS, "Once upon a time", "The rain in Spain"]
FAULT_FLAGS = ["--quant", "none", "--dtype", "float32", "--max_batch_size", "8", "--max_seq_len", "2048",
               "--prefill_chunk", "16", "--max_queue", "8"]
HOSTILE = [  # (body or raw text, with the key?, status, param): one of every class the server can meet
    ({"prompt": "x", "max_tokens": 4, "seed": 2**64}, True, 400, "seed"),
    ({"prompt": "x", "max_tokens": 4, "seed": -(2**63) - 1}, True, 400, "seed"),
    ({"prompt": "x", "max_tokens": 4, "temperature": 1, "repetition_penalty": 1e-300}, True, 400, "repetition_penalty"),
    ({"prompt": "x\ud800", "max_tokens": 4}, True, 400, "prompt"),
    ({"prompt": "x", "stop": ["s"] * 17}, True, 400, "stop"),
    ({"prompt": ["x"] * 17, "max_tokens": 1}, True, 400, "prompt"),
    ({"prompt": ["x", "y"], "n": 9, "max_tokens": 1}, True, 400, "n"),
    ('{"prompt": "x",,}', False, 401, None),
    ('{"prompt": "x",,}', True, 400, None),
    ({"prompt": "x", "stream": "maybe"}, True, 400, "stream"),
    ({"prompt": "x", "max_tokens": 10**9}, True, 400, "prompt"),
    ({"prompt": [[10**20]], "max_tokens": 1}, True, 400, "prompt"),
]


def build_like_the_fault_server(folder: Path):
    """The model the fault test's server loads, built the same way, for the answers alone."""
    return Llama.build(folder, quant="none", dtype="float32", device="cpu", max_seq_len=2048, max_batch_size=8,
                       prefill_chunk=16)


async def stream_to_end(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, list[dict], float]:
    """(text, parsed events, seconds) of a stream, read to its end whatever the end is."""
    started, text, events = time.monotonic(), "", []
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers()) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append({"done": True} if line == "data: [DONE]" else json.loads(line[6:]))
                if "choices" in events[-1] and events[-1]["choices"]:
                    text += events[-1]["choices"][0]["text"]
    return text, events, time.monotonic() - started


async def hostile_request(client: httpx.AsyncClient, url: str, body: dict | str, keyed: bool) -> httpx.Response:
    await asyncio.sleep(0.05)
    data = body if isinstance(body, str) else json.dumps(body)
    return await client.post(f"{url}/v1/completions", content=data.encode(),
                             headers={"content-type": "application/json", **(headers() if keyed else {})})


def test_eight_streams_beside_hostile_requests_then_sigterm(tiny_folder):
    reference = build_like_the_fault_server(tiny_folder)
    grace = 2.0
    with server_process(["--ckpt_dir", str(tiny_folder), *FAULT_FLAGS, "--shutdown_grace", str(grace)]) as (proc, url):
        wait_ready(url, timeout=120)

        async def good_and_hostile():
            async with httpx.AsyncClient(timeout=120) as client:
                good = [stream_to_end(client, url, {"prompt": p, "max_tokens": 48, "temperature": 0, "stream": True})
                        for p in GOOD_PROMPTS]
                bad = [hostile_request(client, url, body, keyed) for body, keyed, _, _ in HOSTILE]
                return await asyncio.gather(*good, *bad)

        results = asyncio.run(good_and_hostile())
        streams, answers = results[:len(GOOD_PROMPTS)], results[len(GOOD_PROMPTS):]
        for (body, _, status, param), response in zip(HOSTILE, answers):
            openai_error(response, status, param)
        for prompt, (text, events, _) in zip(GOOD_PROMPTS, streams):
            assert events[-1] == {"done": True}
            assert (text, events[-2]["choices"][0]["finish_reason"]) == alone(reference, prompt, 48)
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}

        async def in_flight_at_sigterm():
            async with httpx.AsyncClient(timeout=120) as client:
                short = [stream_to_end(client, url, {"prompt": p, "max_tokens": 8, "stream": True})
                         for p in GOOD_PROMPTS[:4]]
                long = [stream_to_end(client, url, {"prompt": p, "max_tokens": 1900, "ignore_eos": True,
                                                    "stream": True}) for p in GOOD_PROMPTS[4:]]
                tasks = [asyncio.ensure_future(s) for s in short + long]
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        ends = asyncio.run(in_flight_at_sigterm())
        for text, events, seconds in ends:
            finished = events[-1] == {"done": True}
            cut = events[-1].get("error", {}).get("code") == "shutting_down"
            assert finished or cut, events[-1]
            assert seconds < 0.3 + grace + 5
        assert any(events[-1] == {"done": True} for _, events, _ in ends[:4])
        assert all("error" in events[-1] for _, events, _ in ends[4:])  # 1900 tokens outlast the grace
        assert proc.wait(30) == 0



# --- Any body: no 500, the server healthy after each, every request answered ------------------------

@pytest.fixture(scope="module")
def short_server(tiny_folder):
    """A server whose context is short, so that bodies asking for no limit finish quickly."""
    llm = build_tiny(tiny_folder, slots=SLOTS, max_seq_len=64)
    app = create_app(ServerSettings(model_name=MODEL, api_key=KEY, max_queue=QUEUE, max_body_bytes=64_000),
                     lambda: llm)
    with running_server(app) as url:
        wait_ready(url)
        yield url


SCALARS = (st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats()
           | st.text(max_size=12) | st.sampled_from(["\ud800", "a\udfffb"]))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3), max_leaves=6)
EDGE_NUMBERS = st.floats() | st.integers(-(2**70), 2**70) | st.sampled_from([1e-300, 1e-40, -0.0, 2.0000001, 5e-324])


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """valid nine times in ten, else anything JSON holds or a number at float32's edges: bodies that
    are wrong in one place beside bodies the server must answer."""
    return st.integers(0, 9).flatmap(lambda k: valid if k else ANY_JSON | EDGE_NUMBERS)


TEXT = st.text(max_size=30) | st.sampled_from(["\ud800", "caf\udce9", ""])
TOKENS = st.lists(st.integers(0, 999), min_size=1, max_size=20)
MESSAGE = st.fixed_dictionaries({
    "role": mostly(st.sampled_from(["system", "developer", "user", "assistant"])),
    "content": mostly(TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2))})
DIALOG = st.tuples(st.lists(MESSAGE, max_size=2), st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}))
SAMPLING = {
    "model": mostly(st.just(MODEL)), "max_tokens": mostly(st.integers(1, 40)),
    "temperature": mostly(st.floats(0, 2)), "top_p": mostly(st.floats(0, 1, exclude_min=True)),
    "seed": mostly(st.integers(-(2**63), 2**64 - 1)), "n": mostly(st.integers(1, 4)),
    "stop": mostly(TEXT | st.lists(TEXT, max_size=3)), "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "frequency_penalty": mostly(st.floats(-2, 2)), "presence_penalty": mostly(st.floats(-2, 2)),
    "repetition_penalty": mostly(st.floats(0.5, 2)),
    "logit_bias": mostly(st.dictionaries(st.integers(0, 999).map(str), st.floats(-100, 100), max_size=3)),
    "ignore_eos": mostly(st.booleans()), "user": mostly(TEXT), "frobnicate": ANY_JSON,
}
CHAT_BODY = st.fixed_dictionaries({"messages": mostly(DIALOG.map(lambda d: [*d[0], d[1]]))}, optional={
    **SAMPLING, "logprobs": mostly(st.booleans()), "top_logprobs": mostly(st.integers(0, 20)),
    "max_completion_tokens": mostly(st.integers(1, 40))})
COMPLETION_BODY = st.fixed_dictionaries({"prompt": mostly(TEXT | st.lists(TEXT, min_size=1, max_size=3) | TOKENS
                                                          | st.lists(TOKENS, min_size=1, max_size=3))}, optional={
    **SAMPLING, "logprobs": mostly(st.integers(0, 5)), "suffix": ANY_JSON})
TOKENIZE_BODY = st.one_of(st.fixed_dictionaries({"prompt": mostly(TEXT)}, optional={"add_special_tokens": mostly(st.booleans())}),
                          st.fixed_dictionaries({"messages": mostly(DIALOG.map(lambda d: [*d[0], d[1]]))}))
BODIES = (st.tuples(st.just("/v1/chat/completions"), CHAT_BODY) | st.tuples(st.just("/v1/completions"), COMPLETION_BODY)
          | st.tuples(st.just("/tokenize"), TOKENIZE_BODY)
          | st.tuples(st.just("/detokenize"), st.fixed_dictionaries({"tokens": mostly(TOKENS)})))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODIES)
def test_no_body_gets_a_500_or_goes_unanswered(short_server, route_and_body):
    route, body = route_and_body
    data = json.dumps(body)  # NaN and Infinity as Python writes them: clients do send them
    with httpx.stream("POST", f"{short_server}{route}", content=data.encode(), timeout=60,
                      headers={"content-type": "application/json", **headers()}) as response:
        raw = response.read().decode()
    event(f"{route} {response.status_code}")
    assert response.status_code in (200, 400, 404), (response.status_code, raw)
    if response.status_code != 200:
        assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert raw.endswith("data: [DONE]\n\n"), raw[-300:]
    else:
        json.loads(raw)
    assert httpx.get(f"{short_server}/health").json() == {"status": "ok"}


# --- The batch runner meets the same lines ----------------------------------------------------------

def test_batch_lines_with_values_beyond_the_engine_get_errors_and_the_run_goes_on(tiny_folder, tiny_llm, tmp_path):
    from llama_int8 import batch
    from llama_int8.flags import run_cli

    lines = [{"id": "good", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0},
             {"id": "seed", "prompt": "x", "seed": 2**64},
             {"id": "penalty", "prompt": "x", "repetition_penalty": 1e-300, "temperature": 1},
             {"id": "text", "prompt": "x\ud800"},
             {"id": "stops", "prompt": "x", "stop": ["s"] * 17},
             {"id": "also-good", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}]
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    flags = ["--ckpt_dir", str(tiny_folder), "--quant", "none", "--dtype", "float32", "--max_seq_len", "512",
             "--max_batch_size", str(SLOTS), "--prefill_chunk", "16", "--input", str(requests), "--output", str(results)]
    for _ in range(2):  # the rerun skips what is answered: no line kills it
        run_cli(batch.build_parser(), batch.main, flags)
        answered = {r["id"]: r for r in map(json.loads, results.read_text().splitlines())}
        assert len(answered) == len(lines)
    params = {i: answered[i]["error"]["param"] for i in ("seed", "penalty", "text", "stops")}
    assert params == {"seed": "seed", "penalty": "repetition_penalty", "text": "prompt", "stops": "stop"}
    for i, prompt in (("good", PROMPTS[0]), ("also-good", PROMPTS[1])):
        assert answered[i]["text"] == alone(tiny_llm, prompt, 6)[0]
