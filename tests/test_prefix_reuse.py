"""Prefix reuse: a prompt that begins with tokens a cache row already holds (a finished request's,
or a running one's) starts after them. Greedy float32 tokens are the same with and without reuse,
for a plain cache, a sliding window's ring (a prefix longer than the window included) and an int8
cache; the reuse is reported as usage.prompt_tokens_details.cached_tokens and counted in /metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from conftest import tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.engine import Completion, Engine, Request
from llama_int8.sampling import SamplingParams
from llama_int8.server import ServerSettings, create_app
from test_serve import running_server, wait_ready

GREEDY = SamplingParams(temperature=0.0)
VOCAB = 128


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def build(folder: Path, kv_cache: str = "model", max_seq_len: int = 256) -> Llama:
    return Llama.build(folder, quant="none", dtype="float32", device="cpu", max_seq_len=max_seq_len, max_batch_size=4,
                       prefill_chunk=32, kv_cache=kv_cache)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, sp_model) -> Llama:
    folder = write_hf_folder(tiny_hf_model(seed=41, num_key_value_heads=2), tmp_path_factory.mktemp("prefix"),
                             tokenizer=sp_model)
    return build(folder)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, sp_model) -> Llama:
    model = tiny_hf_model(seed=42, model_type="mistral", sliding_window=24, num_key_value_heads=2)
    return build(write_hf_folder(model, tmp_path_factory.mktemp("prefix_window"), tokenizer=sp_model))


def run(llm: Llama, engine: Engine, prompt: list[int], max_tokens: int = 12) -> Completion:
    (done,) = engine.run([Request(prompt, max_tokens, GREEDY)])
    return done


def without_reuse(llm: Llama, prompt: list[int], max_tokens: int = 12) -> list[int]:
    return run(llm, Engine(llm.model, llm.tokenizer, prefix_reuse=False), prompt, max_tokens).tokens


@pytest.mark.parametrize("cache", ["plain", "windowed"])
def test_a_shared_system_prompt_is_computed_once_and_changes_no_token(cache, request):
    llm = request.getfixturevalue(cache)
    engine = llm.engine()
    system = tokens(70, 0)
    first = run(llm, engine, system + tokens(9, 1))
    second = run(llm, engine, system + tokens(5, 2))
    assert first.cached_tokens == 0
    # A ring has overwritten the system prompt's start by then: it keeps a prefix only up to its window.
    expected = 64 if cache == "plain" else 0
    assert second.cached_tokens == expected
    assert second.tokens == without_reuse(llm, system + tokens(5, 2))


@pytest.mark.parametrize("cache", ["plain", "windowed"])
def test_the_next_turn_of_a_chat_resumes_where_the_last_one_stopped(cache, request):
    """The next prompt is the last prompt, its answer and more: all of it held, even past a window."""
    llm = request.getfixturevalue(cache)
    engine = llm.engine()
    prompt = tokens(40, 3)
    answer = run(llm, engine, prompt, 20)
    follow_up = prompt + answer.tokens + tokens(6, 4)
    held = len(prompt) + len(answer.tokens) - 1  # the last token sampled was never fed back
    got = run(llm, engine, follow_up)
    assert got.cached_tokens == held
    assert got.tokens == without_reuse(llm, follow_up)


def test_a_running_requests_prefix_is_copied_to_another_row(plain):
    engine = plain.engine()
    shared = tokens(48, 5)
    prompts = [shared + tokens(4, 6), shared + tokens(7, 7), tokens(20, 8)]
    done = engine.run([Request(p, 10, GREEDY) for p in prompts])
    assert [d.cached_tokens for d in done] == [0, 48, 0]
    assert [d.tokens for d in done] == [without_reuse(plain, p, 10) for p in prompts]


def test_an_int8_cache_reuses_as_a_float_one_does(tmp_path, sp_model):
    llm = build(write_hf_folder(tiny_hf_model(seed=43), tmp_path, tokenizer=sp_model), kv_cache="int8")
    engine = llm.engine()
    system = tokens(50, 9)
    run(llm, engine, system + tokens(3, 10))
    second = run(llm, engine, system + tokens(8, 11))
    assert second.cached_tokens == 48
    assert second.tokens == without_reuse(llm, system + tokens(8, 11))


def test_a_scored_prompt_is_computed_whole(plain):
    engine = plain.engine()
    prompt = tokens(60, 12)
    run(plain, engine, prompt)
    (scored,) = engine.run([Request(prompt, 0, GREEDY, prompt_logprobs=0)])
    (alone,) = Engine(plain.model, plain.tokenizer, prefix_reuse=False).run([Request(prompt, 0, GREEDY,
                                                                                      prompt_logprobs=0)])
    assert scored.cached_tokens == 0 and scored.prompt_logprobs == alone.prompt_logprobs


def test_the_server_reports_cached_tokens_and_counts_them(plain):
    with running_server(create_app(ServerSettings(model_name="tiny"), lambda: plain)) as url:
        wait_ready(url)
        prompt = tokens(40, 13)
        bodies = [{"prompt": prompt + tokens(3, 14 + i), "max_tokens": 4, "temperature": 0} for i in range(2)]
        first, second = (httpx.post(f"{url}/v1/completions", json=b, timeout=60).json()["usage"] for b in bodies)
        assert "prompt_tokens_details" not in first
        assert second["prompt_tokens_details"] == {"cached_tokens": 32}
        metrics = httpx.get(f"{url}/metrics").text
        assert "llama_int8_prompt_tokens_cached_total 32.0" in metrics
