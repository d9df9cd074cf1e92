"""Prompt log-probabilities (scoring) in the engine, against transformers' log-softmax on a tiny
random float32 model: every position, chunked or not, alone or beside other requests."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.engine import Engine, InvalidRequest, Request
from llama_int8.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(seed=41, num_key_value_heads=2).eval()


@pytest.fixture(scope="module")
def llm(hf_model, sp_model, tmp_path_factory) -> Llama:
    folder = write_hf_folder(hf_model, tmp_path_factory.mktemp("scoring"), tokenizer=sp_model)
    return Llama.build(folder, quant="none", dtype="float32", device="cpu", max_seq_len=512, max_batch_size=4,
                       prefill_chunk=32)


def reference_scores(hf_model, prompt: list[int]) -> torch.Tensor:
    """transformers' log-probability of each prompt token after the ones before it, [len - 1]."""
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    return logprobs[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]


def prompt_of(n: int, seed: int) -> list[int]:
    return [1] + torch.randint(3, 128, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 300])  # one token, chunk edges, past SCORED_CHUNK
def test_prompt_logprobs_are_transformers_log_softmax(llm, hf_model, n):
    prompt = prompt_of(n, n)
    (done,) = Engine(llm.model, llm.tokenizer).run([Request(prompt, 0, GREEDY, prompt_logprobs=3)])
    assert done.tokens == [] and done.finish_reason == "length" and done.completion_tokens == 0
    assert len(done.prompt_logprobs) == n and done.prompt_logprobs[0] is None
    scored = done.prompt_logprobs[1:]
    assert [s.token for s in scored] == prompt[1:]
    if n > 1:
        ours = torch.tensor([s.logprob for s in scored])
        assert torch.allclose(ours, reference_scores(hf_model, prompt), atol=1e-4, rtol=0)
    for s in scored:  # the likeliest three, best first; the prompt's own token is never above the best
        assert len(s.top) == 3 and s.top[0][1] >= s.top[1][1] >= s.top[2][1] and s.top[0][1] >= s.logprob


def test_scoring_beside_other_requests_gives_the_same_scores_and_they_their_tokens(llm):
    prompts = [prompt_of(40, 1), prompt_of(70, 2), prompt_of(12, 3)]
    scored = Request(prompts[0], 4, GREEDY, prompt_logprobs=0)
    others = [Request(p, 20, GREEDY) for p in prompts[1:]]
    together = Engine(llm.model, llm.tokenizer).run([others[0], scored, others[1]])
    (alone,) = Engine(llm.model, llm.tokenizer).run([scored])
    assert [s and s.logprob for s in together[1].prompt_logprobs] == [s and s.logprob for s in alone.prompt_logprobs]
    assert together[1].tokens == alone.tokens and len(alone.tokens) == 4
    for request, result in zip(others, (together[0], together[2])):
        assert result.prompt_logprobs == []
        assert result.tokens == Engine(llm.model, llm.tokenizer).run([request])[0].tokens


def test_max_tokens_zero_is_for_scoring_only(llm):
    engine = Engine(llm.model, llm.tokenizer)
    with pytest.raises(InvalidRequest, match="max_tokens: expected >= 1"):
        engine.check(Request([1, 5, 9], 0, GREEDY))
    with pytest.raises(InvalidRequest, match="prompt_logprobs: expected 0..128"):
        engine.check(Request([1, 5, 9], 0, GREEDY, prompt_logprobs=129))
