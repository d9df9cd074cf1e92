"""The OpenAI-compatible server on 127.0.0.1, driven by the official openai client (sync, async,
streaming) and raw HTTP: answers against the engine's, the SSE framing, and every failure answer."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from conftest import running_server, tiny_hf_model, wait_ready, write_hf_folder
from llama_int8 import Llama
from llama_int8.engine import Engine, Request
from llama_int8.sampling import SamplingParams
from llama_int8 import serve
from llama_int8.server import DEFAULT_MAX_BODY_BYTES, DEFAULT_SHUTDOWN_GRACE, ServerSettings, create_app

KEY = "sk-test-key"
MODEL = "tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
PROMPTS = ["The quick brown fox", "Paris is the capital of", "To be or not to be", "All that glitters",
           "A journey of a thousand miles", "Numbers: 0 1 2"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, sp_model) -> Path:
    return write_hf_folder(tiny_hf_model(seed=21, num_key_value_heads=2), tmp_path_factory.mktemp("serve"),
                           tokenizer=sp_model)


def build_tiny(folder: Path, slots: int = 4, max_seq_len: int = 512) -> Llama:
    return Llama.build(folder, quant="none", dtype="float32", device="cpu", max_seq_len=max_seq_len,
                       max_batch_size=slots, prefill_chunk=16)


@pytest.fixture(scope="module")
def tiny_llm(tiny_folder) -> Llama:
    return build_tiny(tiny_folder)


@pytest.fixture(scope="module")
def server(tiny_llm) -> Iterator[str]:
    app = create_app(ServerSettings(model_name=MODEL, api_key=KEY, max_queue=16, max_body_bytes=64_000),
                     lambda: tiny_llm)
    with running_server(app) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def engine_text(llm: Llama, prompt: list[int], max_tokens: int, stop_strings: tuple[str, ...] = ()) -> tuple[str, str]:
    """Greedy text and finish reason of one request run alone on a fresh engine: the reference."""
    (result,) = Engine(llm.model, llm.tokenizer).run(
        [Request(prompt, max_tokens, SamplingParams(temperature=0.0), llm.tokenizer.stop_ids, stop_strings)])
    return result.text, result.finish_reason


def headers(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sse_events(url: str, body: dict) -> list[str]:
    """The data lines of a stream, checked to be framed as `data: ...` followed by a blank line."""
    with httpx.stream("POST", url, json=body, headers=headers(), timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    data = [b for b in blocks if not b.startswith(":")]  # comment lines are keep-alive pings
    assert all(re.fullmatch(r"data: [^\n]+", b) for b in data), data
    assert raw.endswith("data: [DONE]\n\n")
    return [b.removeprefix("data: ") for b in data]


# --- Answers -----------------------------------------------------------------------------------------

def test_chat_answer_is_the_engines_through_the_chat_format(client, tiny_llm):
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    prompt = tiny_llm.encode_dialog(CHAT)
    text, reason = engine_text(tiny_llm, prompt, 20)
    assert answer.choices[0].message.content == text
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == reason
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_stream_as_openai_clients_expect(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, last_choice, usage = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert all(c.choices[0].finish_reason is None for c in content)
    assert last_choice.choices[0].delta.content is None and last_choice.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 24
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_sse_framing(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse_events(f"{server}/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    without = [json.loads(e) for e in sse_events(f"{server}/v1/completions", {**body, "stream_options": None})[:-1]]
    assert all("usage" not in c for c in without) and without[-1]["choices"]


def test_concurrent_async_clients_get_what_each_gets_alone(server, tiny_llm):
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)

    async def complete(prompt: str, stream: bool) -> str:
        if not stream:
            answer = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
            return answer.choices[0].text
        pieces = [c.choices[0].text async for c in await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True)]
        return "".join(pieces)

    async def all_at_once() -> list[str]:
        return await asyncio.gather(*(complete(p, stream=i % 2 == 0) for i, p in enumerate(PROMPTS)))

    together = asyncio.run(all_at_once())
    alone = [engine_text(tiny_llm, tiny_llm.tokenizer.encode(p, bos=True, eos=False), 16)[0] for p in PROMPTS]
    assert together == alone


def test_stop_string_is_never_sent(client):
    free = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    streamed = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30,
                                                                temperature=0, stop=[stop, "never"], stream=True)]
    assert "".join(c.text for c in streamed) == free[:free.index(stop)]
    assert streamed[-1].finish_reason == "stop"


def test_logprobs(client):
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens == 5
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob for e in entries)  # greedy
    assert "".join(e.token for e in entries) .strip() != ""
    legacy = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


def test_n_choices_with_a_seed_are_reproducible(client):
    def sample() -> list[str]:
        answer = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=1.0, seed=5,
                                           n=3, frequency_penalty=0.5, presence_penalty=0.2,
                                           extra_body={"repetition_penalty": 1.1})
        assert [c.index for c in answer.choices] == [0, 1, 2]
        return [c.text for c in answer.choices]

    first = sample()
    assert sample() == first
    assert len(set(first)) > 1  # each choice draws with its own seed


def test_max_completion_tokens_and_multiple_prompts(client):
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, temperature=0)
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"
    legacy = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=2, temperature=0)
    assert len(legacy.choices) == 2 and legacy.usage.completion_tokens == 4


def test_tokenize_detokenize_models_and_metrics(server, tiny_llm):
    tokens = httpx.post(f"{server}/tokenize", json={"prompt": PROMPTS[0]}, headers=headers()).json()
    assert tokens["tokens"] == tiny_llm.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    chat = httpx.post(f"{server}/tokenize", json={"messages": CHAT}, headers=headers()).json()
    assert chat["tokens"] == tiny_llm.encode_dialog(CHAT)
    text = httpx.post(f"{server}/detokenize", json={"tokens": tokens["tokens"]}, headers=headers()).json()
    assert text["prompt"] == tiny_llm.tokenizer.decode(tokens["tokens"])
    models = httpx.get(f"{server}/v1/models", headers=headers()).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    metrics = httpx.get(f"{server}/metrics", headers=headers()).text
    for name in ("llama_int8_requests_running", "llama_int8_requests_waiting", "llama_int8_prompt_tokens_total",
                 "llama_int8_generation_tokens_total", "llama_int8_time_to_first_token_seconds_count",
                 "llama_int8_inter_token_latency_seconds_count"):
        assert re.search(rf"^{name} ", metrics, re.M), name
    assert metric(metrics, "llama_int8_generation_tokens_total") > 0


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# --- Failures ----------------------------------------------------------------------------------------

def assert_openai_error(response: httpx.Response, status: int, param: str | None = None,
                        code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    return error


@pytest.mark.parametrize("change,param", [
    ({"temperature": 5}, "temperature"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),  # the chat format refuses it
    ({"logit_bias": {"5": 300}}, "logit_bias.5"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),  # beyond the vocabulary: the engine refuses it
])
def test_bad_field_answers_400_naming_it(server, change, param):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, **change}
    error = assert_openai_error(httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers()), 400, param)
    assert error["type"] == "invalid_request_error"


def test_broken_json_answers_400(server):
    response = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={**headers(),
                                                                                   "content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


@pytest.mark.parametrize("extra,param,words", [
    ({"frobnicate": 1}, "frobnicate", "not a field this server takes"),
    ({"stream_options": {"x": 2}}, "stream_options.x", "not a field this server takes"),
    ({"suffix": "the end"}, "suffix", "fills in the middle"),
    ({"best_of": 3, "n": 2}, "best_of", "choices are not ranked"),
])
def test_fields_this_server_does_not_take_are_refused_by_name(server, extra, param, words):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 2, **extra}
    error = assert_openai_error(httpx.post(f"{server}/v1/completions", json=body, headers=headers()), 400, param)
    assert words in error["message"]


def test_prompt_that_does_not_fit_answers_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=" ".join(["fox"] * 600), max_tokens=4)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=600)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 512" in e.value.message


def test_api_key_is_required_except_for_health(server):
    body = {"model": MODEL, "prompt": "a", "max_tokens": 1}
    for h in ({}, headers("sk-wrong"), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        error = assert_openai_error(httpx.post(f"{server}/v1/completions", json=body, headers=h), 401,
                                    code="invalid_api_key")
        assert error["type"] == "authentication_error"
    assert httpx.get(f"{server}/metrics").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_body_over_the_limit_answers_413(server):
    body = {"model": MODEL, "prompt": "x" * 70_000}
    assert_openai_error(httpx.post(f"{server}/v1/completions", json=body, headers=headers()), 413,
                        code="request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(70):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{server}/v1/completions", content=chunks(),
                          headers={**headers(), "content-type": "application/json"})
    assert_openai_error(response, 413, code="request_too_large")


def test_unknown_model_and_route_answer_404(server):
    body = {"model": "gpt-9", "prompt": "a", "max_tokens": 1}
    assert_openai_error(httpx.post(f"{server}/v1/completions", json=body, headers=headers()), 404, "model",
                        "model_not_found")
    assert_openai_error(httpx.get(f"{server}/v1/nothing", headers=headers()), 404)


def test_client_that_disconnects_frees_its_slot(server):
    def running() -> float:
        return metric(httpx.get(f"{server}/metrics", headers=headers()).text, "llama_int8_requests_running")

    before = metric(httpx.get(f"{server}/metrics", headers=headers()).text, "llama_int8_generation_tokens_total")
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 480, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers()) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert running() == 1
    deadline = time.monotonic() + 5
    while running() != 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.01)
    generated = metric(httpx.get(f"{server}/metrics", headers=headers()).text, "llama_int8_generation_tokens_total")
    assert generated - before < 480  # it stopped early


def test_full_queue_answers_429(tiny_folder):
    llm = build_tiny(tiny_folder, slots=1, max_seq_len=8192)  # a long request holds the slot for seconds
    app = create_app(ServerSettings(model_name=MODEL, max_queue=0), lambda: llm)
    with running_server(app) as url:
        wait_ready(url)
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # the first request holds the only slot
            second = httpx.post(f"{url}/v1/completions", json={**body, "stream": False})
            assert_openai_error(second, 429, code="queue_full")
        with pytest.raises(openai.RateLimitError):  # the openai client raises its own error for it
            with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
                lines = response.iter_lines()
                next(lines)
                openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0).completions.create(
                    model=MODEL, prompt="a", max_tokens=1)


def test_health_is_503_while_the_model_loads(tiny_llm):
    loaded = threading.Event()

    def slow_load() -> Llama:
        loaded.wait(30)
        return tiny_llm

    app = create_app(ServerSettings(model_name=MODEL), slow_load)
    with running_server(app) as url:
        assert httpx.get(f"{url}/health").status_code == 503
        assert_openai_error(httpx.post(f"{url}/v1/completions", json={"prompt": "a"}), 503, code="model_loading")
        loaded.set()
        wait_ready(url)


# --- The command line, in a process of its own ------------------------------------------------------

@contextmanager
def server_process(args: list[str]) -> Iterator[tuple[subprocess.Popen, str]]:
    # One thread: on a machine busy with other work, two threads' barriers cost a tiny model 10x.
    env = {**os.environ, "LLAMA_INT8_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llama_int8.serve", *args, "--port", "0"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "Serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before serving"
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_sigterm_finishes_what_is_in_flight_and_exits_0(tiny_folder):
    args = ["--ckpt_dir", str(tiny_folder), "--quant", "none", "--dtype", "float32", "--max_batch_size", "2",
            "--max_seq_len", "512", "--shutdown_grace", "20"]
    with server_process(args) as (proc, url):
        wait_ready(url, timeout=120)
        body = {"model": tiny_folder.name, "prompt": PROMPTS[0], "max_tokens": 300, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers(), timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert "data: [DONE]" in rest  # the stream in flight was finished
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")


def test_a_bad_flag_is_refused_before_torch_is_imported(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch was imported to check a flag')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent.parent)])}
    done = subprocess.run([sys.executable, "-m", "llama_int8.serve", "--port", "http"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "--port: expected an integer" in done.stderr and "torch" not in done.stderr


def test_command_line_defaults_are_the_servers():
    from llama_int8.engine import DEFAULT_MAX_QUEUE

    settings = ServerSettings(model_name=MODEL)
    assert serve.DEFAULT_MAX_QUEUE == DEFAULT_MAX_QUEUE == settings.max_queue
    assert serve.DEFAULT_MAX_BODY_BYTES == DEFAULT_MAX_BODY_BYTES == settings.max_body_bytes
    assert serve.DEFAULT_SHUTDOWN_GRACE == DEFAULT_SHUTDOWN_GRACE == settings.shutdown_grace
