"""The generator: cached decoding, batching, sampling, stopping and streaming."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.sampling import apply_repetition_penalty, cut, sample


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, sp_model) -> Llama:
    folder = write_hf_folder(tiny_hf_model(num_key_value_heads=2), tmp_path_factory.mktemp("gen"), tokenizer=sp_model)
    return Llama.build(folder, quant="none", dtype="float32", device="cpu", max_seq_len=96, max_batch_size=3)


def test_cached_decoding_equals_full_recomputation(tiny_llm):
    tokens = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    full = tiny_llm.model(tokens, 0)
    steps = [tiny_llm.model(tokens[:, :12], 0)]
    steps += [tiny_llm.model(tokens[:, p:p + 1], p) for p in range(12, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_batch_equals_prompts_one_by_one(tiny_llm):
    prompts = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55, 56, 57], [1, 60]]
    batched = tiny_llm.generate(prompts, max_gen_len=20, temperature=0, stop_ids=())
    single = [tiny_llm.generate([p], max_gen_len=20, temperature=0, stop_ids=())[0] for p in prompts]
    assert batched == single
    assert all(len(seq) == 20 for seq in batched)


def test_sampling_is_reproducible_with_a_seed(tiny_llm):
    prompt = [[1, 30, 31, 32]]
    a = tiny_llm.generate(prompt, max_gen_len=16, temperature=1.0, top_p=0.95, seed=7, stop_ids=())
    b = tiny_llm.generate(prompt, max_gen_len=16, temperature=1.0, top_p=0.95, seed=7, stop_ids=())
    c = tiny_llm.generate(prompt, max_gen_len=16, temperature=1.0, top_p=0.95, seed=8, stop_ids=())
    assert a == b
    assert a != c


def test_generation_stops_at_a_stop_token(tiny_llm):
    prompt = [[1, 30, 31, 32]]
    free = tiny_llm.generate(prompt, max_gen_len=12, temperature=0, stop_ids=())[0]
    stop = free[5]
    first = free.index(stop)
    stopped = tiny_llm.generate(prompt, max_gen_len=12, temperature=0, stop_ids={stop})[0]
    assert stopped == free[:first]


def test_streaming_equals_text_completion(tiny_llm):
    prompt = "The quick brown fox"
    whole = tiny_llm.text_completion([prompt], temperature=0, max_gen_len=24)[0]["generation"]
    streamed = "".join(tiny_llm.stream_completion(prompt, temperature=0, max_gen_len=24))
    assert streamed == whole


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(probs, 0.75, g)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    assert {int(sample(probs, 0.0, g)) for _ in range(20)} == {0}


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.05),
                                               (20, 0.9, 0.0), (20, 0.9, 0.1), (-1, 0.7, 0.02), (1, 1.0, 0.0)])
def test_cuts_keep_the_tokens_transformers_keeps(top_k, top_p, min_p):
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(top_k + 7)) * 3
    reference = logits.clone()
    if top_k > 0:
        reference = TopKLogitsWarper(top_k)(None, reference)
    if top_p < 1:
        reference = TopPLogitsWarper(top_p)(None, reference)
    if min_p > 0:
        reference = MinPLogitsWarper(min_p)(None, reference)
    weights, ids = cut(torch.softmax(logits, dim=-1), top_p, top_k, min_p)
    kept = torch.zeros_like(logits, dtype=torch.bool)
    if ids is None:
        kept = weights > 0
    else:
        kept.scatter_(1, ids, weights > 0)
    assert torch.equal(kept, reference.isfinite())
    if top_k > 0:
        assert (kept.sum(-1) <= top_k).all()


def test_a_draw_comes_only_from_the_kept_tokens():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample(probs, 1.0, g, top_k=2)) for _ in range(300)} == {0, 1}
    assert {int(sample(probs, 1.0, g, min_p=0.4)) for _ in range(300)} == {0, 1, 2}  # 0.2 >= 0.4 * 0.4
    assert {int(sample(probs, 1.0, g)) for _ in range(2000)} == {0, 1, 2, 3, 4}


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    history = torch.tensor([[3, 7, 7, 20], [0, 49, 5, 6]])
    seen = torch.zeros(2, 50, dtype=torch.bool)
    seen[torch.arange(2)[:, None], history] = True
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_too_long_prompt_is_refused(tiny_llm):
    with pytest.raises(ValueError, match="prompt 0 has 96 tokens; max_seq_len=96"):
        tiny_llm.generate([[1] * 96], max_gen_len=4)


def test_too_many_prompts_are_refused(tiny_llm):
    with pytest.raises(ValueError, match="4 prompts exceed max_batch_size=3"):
        tiny_llm.generate([[1, 2]] * 4, max_gen_len=4)


def test_empty_prompt_is_refused(tiny_llm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny_llm.generate([[1, 2], []], max_gen_len=4)


def test_forward_beyond_the_cache_is_refused(tiny_llm):
    with pytest.raises(ValueError, match="exceed the cache"):
        tiny_llm.model(torch.ones(1, 10, dtype=torch.long), 90)


def test_repetition_penalty_steers_greedy_decoding(tiny_llm):
    """With a prohibitive penalty, greedy decoding on this tiny model stops repeating what it has seen."""
    prompt = [[1, 30, 31, 32]]
    free = tiny_llm.generate(prompt, max_gen_len=24, temperature=0, stop_ids=())[0]
    assert len(set(free)) < len(free)  # left alone, it repeats itself
    penalized = tiny_llm.generate(prompt, max_gen_len=24, temperature=0, repetition_penalty=1e4, stop_ids=())[0]
    history = prompt[0] + penalized
    repeats = sum(t in history[:i] for i, t in enumerate(history) if i >= len(prompt[0]))
    assert repeats < len(free) - len(set(free))
