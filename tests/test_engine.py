"""The continuous-batching engine: requests alone against requests among others (token for token,
log-probabilities bit for bit), against transformers, slots, queue, cancellation, stop strings."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.engine import ContextLengthExceeded, Engine, Output, QueueFull, Request
from llama_int8.sampling import SamplingParams, apply_frequency_presence_penalty, apply_logit_bias

SLOTS = 8
PROMPT_LENGTHS = (3, 21, 9, 40, 2, 15, 30, 6)  # some span several prefill chunks
ARRIVAL_STEPS = (0, 0, 1, 3, 4, 4, 9, 12)
NEW_TOKENS = (24, 10, 30, 16, 28, 8, 20, 12)
WINDOW = 8


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def llama_llm(tmp_path_factory, sp_model):
    ref = tiny_hf_model(seed=11, num_key_value_heads=2)
    folder = write_hf_folder(ref, tmp_path_factory.mktemp("engine"), tokenizer=sp_model)
    llm = Llama.build(folder, quant="none", dtype="float32", device="cpu", max_seq_len=96, max_batch_size=SLOTS,
                      prefill_chunk=8)
    return llm, ref


@pytest.fixture(scope="module")
def mistral_llm(tmp_path_factory, sp_model):
    """Sliding window of 8: prompts and completions run several windows long."""
    ref = tiny_hf_model(seed=12, model_type="mistral", sliding_window=WINDOW, num_key_value_heads=1)
    folder = write_hf_folder(ref, tmp_path_factory.mktemp("engine-mistral"), tokenizer=sp_model)
    llm = Llama.build(folder, quant="none", dtype="float32", device="cpu", max_seq_len=96, max_batch_size=SLOTS)
    return llm, ref


def greedy_requests(logprobs: int | None = None, **sampling) -> list[Request]:
    params = SamplingParams(**{"temperature": 0.0, **sampling})
    return [Request(random_prompt(n, seed=i), max_tokens=m, sampling=params, logprobs=logprobs)
            for i, (n, m) in enumerate(zip(PROMPT_LENGTHS, NEW_TOKENS))]


def run_staggered(engine: Engine, requests: list[Request], arrivals: tuple[int, ...]) -> list[list[Output]]:
    """Submit request i at step arrivals[i] and step until all are done; each one's outputs."""
    outputs: list[list[Output]] = [[] for _ in requests]
    step = 0
    while step <= max(arrivals) or engine.has_work():
        for i, at in enumerate(arrivals):
            if at == step:
                engine.submit([requests[i]], lambda _, out, i=i: outputs[i].append(out))
        engine.step()
        step += 1
    return outputs


def run_alone(llm: Llama, request: Request) -> list[Output]:
    return run_staggered(Engine(llm.model, llm.tokenizer), [request], (0,))[0]


def tokens_of(outputs: list[Output]) -> list[int]:
    return [t for out in outputs for t in out.tokens]


@pytest.mark.parametrize("model", ["llama", "mistral-window"])
def test_greedy_alone_equals_among_eight_concurrent(model, llama_llm, mistral_llm):
    llm, ref = llama_llm if model == "llama" else mistral_llm
    requests = greedy_requests(logprobs=2)
    together = run_staggered(Engine(llm.model, llm.tokenizer), requests, ARRIVAL_STEPS)
    for request, outs in zip(requests, together):
        alone = run_alone(llm, request)
        assert tokens_of(outs) == tokens_of(alone)
        # Stronger than the tokens: the log-probabilities, computed from the logits, agree bit for bit.
        assert [lp for o in outs for lp in o.logprobs] == [lp for o in alone for lp in o.logprobs]
        assert tokens_of(outs) == hf_greedy(ref, list(request.prompt), request.max_tokens)
        assert outs[-1].finish_reason == "length"


def test_seeded_sampling_is_reproducible_per_request(llama_llm):
    llm, _ = llama_llm
    sampled = [Request(random_prompt(n, seed=i), max_tokens=20,
                       sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i,
                                               repetition_penalty=1.2 if i % 2 else 1.0,
                                               frequency_penalty=0.5 if i % 3 == 0 else 0.0))
               for i, n in enumerate(PROMPT_LENGTHS)]
    together = run_staggered(Engine(llm.model, llm.tokenizer), sampled, ARRIVAL_STEPS)
    alone = [tokens_of(run_alone(llm, r)) for r in sampled]
    assert [tokens_of(o) for o in together] == alone
    reseeded = Request(sampled[0].prompt, 20, SamplingParams(temperature=1.0, top_p=0.9, seed=999))
    assert tokens_of(run_alone(llm, reseeded)) != alone[0]


def test_logprobs_match_transformers(llama_llm):
    llm, ref = llama_llm
    request = Request(random_prompt(12, seed=3), max_tokens=6, sampling=SamplingParams(temperature=0.0), logprobs=3)
    outs = run_alone(llm, request)
    ids = torch.tensor([list(request.prompt) + tokens_of(outs)])
    with torch.no_grad():
        expected = torch.log_softmax(ref(ids).logits[0, len(request.prompt) - 1:-1], dim=-1)  # [6, vocab]
    got = [lp for o in outs for lp in o.logprobs]
    for row, lp in zip(expected, got):
        assert lp.logprob == pytest.approx(row[lp.token].item(), abs=1e-4)
        top = row.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_a_finished_request_frees_its_slot_for_the_next(llama_llm):
    llm, _ = llama_llm
    engine = Engine(llm.model, llm.tokenizer)
    short = Request(random_prompt(4, 1), max_tokens=3, sampling=SamplingParams(temperature=0.0))
    long = Request(random_prompt(4, 2), max_tokens=30, sampling=SamplingParams(temperature=0.0))
    finished_at: dict[int, int] = {}
    admitted_at = None
    step = 0

    def on_output(i: int, out: Output) -> None:
        if out.finish_reason is not None:
            finished_at[i] = step

    engine.submit([short] + [long] * SLOTS, on_output)
    while engine.has_work():
        engine.step()
        assert engine.running <= SLOTS
        if engine.queued == 0 and admitted_at is None:
            admitted_at = step
        step += 1
    assert admitted_at == finished_at[0] + 1  # the step after the short request ended
    assert sorted(finished_at) == list(range(SLOTS + 1))


def test_cancelling_frees_the_slot_at_the_next_step(llama_llm):
    llm, _ = llama_llm
    engine = Engine(llm.model, llm.tokenizer)
    outs: list[Output] = []
    (handle,) = engine.submit([Request(random_prompt(5, 4), max_tokens=50)], lambda _, o: outs.append(o))
    engine.step()
    engine.step()
    assert engine.running == 1
    generated = outs[-1].completion_tokens
    handle.cancel()
    engine.step()
    assert engine.running == 0 and not engine.has_work()
    assert outs[-1].finish_reason == "cancelled" and outs[-1].completion_tokens == generated


def test_long_prompt_prefills_in_chunks_while_others_decode(llama_llm):
    llm, _ = llama_llm
    engine = Engine(llm.model, llm.tokenizer, prefill_chunk=8)
    running: list[Output] = []
    engine.submit([Request(random_prompt(3, 5), max_tokens=40)], lambda _, o: running.append(o))
    engine.step()
    long_outs: list[Output] = []
    engine.submit([Request(random_prompt(64, 6), max_tokens=2)], lambda _, o: long_outs.append(o))
    steps_until_first = 0
    while not long_outs:
        before = len(running)
        engine.step()
        assert len(running) == before + 1  # the running stream got its token in every step
        steps_until_first += 1
    assert steps_until_first == 64 // 8  # one chunk of the prompt per step


def test_full_queue_is_refused(llama_llm):
    llm, _ = llama_llm
    engine = Engine(llm.model, llm.tokenizer, max_queue=2)
    request = Request([1, 2, 3], max_tokens=4)
    engine.submit([request] * (SLOTS + 1), lambda *_: None)
    with pytest.raises(QueueFull, match="queue of 2 is full"):
        engine.submit([request] * 2, lambda *_: None)  # all or none
    assert engine.queued == SLOTS + 1
    engine.submit([request], lambda *_: None)


def test_prompt_that_does_not_fit_is_refused(llama_llm):
    llm, _ = llama_llm
    engine = Engine(llm.model, llm.tokenizer)
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 96 tokens.*100 tokens"):
        engine.submit([Request([1] * 90, max_tokens=10)], lambda *_: None)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([Request([1, 2], max_tokens=0)], lambda *_: None)
    with pytest.raises(ValueError, match="prompt"):
        engine.submit([Request([1, 500], max_tokens=1)], lambda *_: None)
    with pytest.raises(ValueError, match="logit_bias"):
        engine.submit([Request([1], 1, SamplingParams(logit_bias=((128, 1.0),)))], lambda *_: None)


def test_stop_string_ends_the_text_and_is_never_shown(llama_llm):
    llm, _ = llama_llm
    prompt = llm.tokenizer.encode("The quick brown fox", bos=True, eos=False)
    free = run_alone(llm, Request(prompt, max_tokens=30, sampling=SamplingParams(temperature=0.0)))
    text = "".join(o.text for o in free)
    stop = text[len(text) // 2:len(text) // 2 + 3]  # a piece from the middle, likely spanning tokens
    assert len(stop.strip()) > 0
    outs = run_alone(llm, Request(prompt, 30, SamplingParams(temperature=0.0), stop_strings=("zzzz", stop)))
    pieces = [o.text for o in outs]
    assert "".join(pieces) == text[:text.index(stop)]
    assert outs[-1].finish_reason == "stop"


def test_stop_token_ends_the_completion_without_showing_it(llama_llm):
    llm, _ = llama_llm
    prompt = random_prompt(6, 7)
    free = tokens_of(run_alone(llm, Request(prompt, 20, SamplingParams(temperature=0.0))))
    stop = free[5]
    outs = run_alone(llm, Request(prompt, 20, SamplingParams(temperature=0.0), stop_ids=frozenset({stop})))
    assert tokens_of(outs) == free[:free.index(stop)]
    assert outs[-1].finish_reason == "stop"


def test_run_drives_more_requests_than_slots_and_queue(llama_llm):
    llm, _ = llama_llm
    requests = [Request(random_prompt(4 + i, i), 5, SamplingParams(temperature=0.0)) for i in range(SLOTS + 4)]
    results = Engine(llm.model, llm.tokenizer, max_queue=1).run(requests)
    assert [r.tokens for r in results] == [tokens_of(run_alone(llm, r)) for r in requests]
    assert all(r.finish_reason == "length" and r.completion_tokens == 5 for r in results)


def test_logit_bias_steers_each_request_alone(llama_llm):
    llm, _ = llama_llm
    prompt = random_prompt(5, 8)
    greedy = SamplingParams(temperature=0.0)
    free = tokens_of(run_alone(llm, Request(prompt, 8, greedy)))
    forced = SamplingParams(temperature=0.0, logit_bias=((77, 100.0),))
    banned = SamplingParams(temperature=0.0, logit_bias=((free[0], -100.0),))
    results = Engine(llm.model, llm.tokenizer).run([Request(prompt, 8, forced), Request(prompt, 8, banned),
                                                    Request(prompt, 8, greedy)])
    assert results[0].tokens == [77] * 8
    assert results[1].tokens[0] != free[0]
    assert results[2].tokens == free


def test_penalties_and_bias_follow_openais_formulas():
    """OpenAI's documented formula: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty,
    with c[j] the times token j was generated; logit_bias adds its value to the token's logit."""
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([[0, 1, 3, 0, 0, 2], [5, 0, 0, 0, 1, 0]], dtype=torch.float32)
    got = apply_frequency_presence_penalty(logits, counts, 0.5, 0.25)
    for row in range(2):
        for j in range(6):
            c = counts[row, j].item()
            assert got[row, j].item() == pytest.approx(logits[row, j].item() - c * 0.5 - (c > 0) * 0.25)
    biased = apply_logit_bias(logits, torch.tensor([1, 4]), torch.tensor([2.0, -100.0]))
    expected = logits.clone()
    expected[:, 1] += 2.0
    expected[:, 4] -= 100.0
    torch.testing.assert_close(biased, expected)


def test_a_lone_request_on_a_quantized_model_runs_as_llama_generate(tmp_path, sp_model):
    """Quantized rows depend on the batch anyway: a lone decode row is not paired, and gets exactly
    the tokens of the static-batch generator at batch 1."""
    folder = write_hf_folder(tiny_hf_model(seed=13, num_key_value_heads=2), tmp_path / "m", tokenizer=sp_model)
    llm = Llama.build(folder, quant="int8", dtype="float32", device="cpu", max_seq_len=64, max_batch_size=2)
    engine = Engine(llm.model, llm.tokenizer)
    assert not engine.pair_lone_rows
    prompt = random_prompt(7, 9)
    (result,) = engine.run([Request(prompt, 20, SamplingParams(temperature=0.0))])
    assert result.tokens == llm.generate([prompt], max_gen_len=20, temperature=0, stop_ids=())[0]


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_rows_decoded_together_give_each_its_tokens(quant, tmp_path, sp_model):
    """A quantized model's decode steps attend all their rows in one masked call (model.DecodeRows):
    8 requests of different lengths arriving at different times, some of them several windows long,
    each gets the greedy tokens it gets alone."""
    ref = tiny_hf_model(seed=14, model_type="mistral", sliding_window=WINDOW, num_key_value_heads=2)
    folder = write_hf_folder(ref, tmp_path / "m", tokenizer=sp_model)
    llm = Llama.build(folder, quant=quant, dtype="float32", device="cpu", max_seq_len=96, max_batch_size=SLOTS)
    assert not llm.model.batch_invariant
    requests = greedy_requests()
    together = run_staggered(Engine(llm.model, llm.tokenizer), requests, ARRIVAL_STEPS)
    assert [tokens_of(outs) for outs in together] == [tokens_of(run_alone(llm, r)) for r in requests]


# --- Real weights ------------------------------------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "Explain in one sentence why the sky is blue.", "What is 12 times 12?",
             "Give a tip for staying healthy.", "Who wrote Hamlet?", "Translate 'good morning' into French."]


@pytest.mark.slow
def test_smollm2_greedy_alone_equals_among_eight_concurrent(smollm2_gguf):
    llm = Llama.build(smollm2_gguf, quant="none", dtype="float32", device="cpu", max_seq_len=256,
                      max_batch_size=SLOTS, prefill_chunk=32)
    text = " ".join(["The lighthouse keeper climbed the stairs every evening to light the lamp."] * 5)
    prompts = [llm.encode_dialog([{"role": "user", "content": f"{text} {q}" if i % 3 == 1 else q}])
               for i, q in enumerate(QUESTIONS)]  # three of them span several prefill chunks
    requests = [Request(p, max_tokens=m, sampling=SamplingParams(temperature=0.0), stop_ids=llm.tokenizer.stop_ids)
                for p, m in zip(prompts, (10, 8, 12, 10, 6, 8, 6, 12))]
    together = run_staggered(Engine(llm.model, llm.tokenizer), requests, ARRIVAL_STEPS)
    for i, (request, outs) in enumerate(zip(requests, together)):
        assert tokens_of(outs) == tokens_of(run_alone(llm, request)), f"request {i}"
    assert "Paris" in "".join(o.text for o in together[0])
