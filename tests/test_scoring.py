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


# --- Through the server: echo, max_tokens 0, prompt_logprobs ------------------------------------------

@pytest.fixture(scope="module")
def server(llm):
    from llama_int8.server import ServerSettings, create_app
    from test_serve import running_server, wait_ready

    with running_server(create_app(ServerSettings(model_name="tiny"), lambda: llm)) as url:
        wait_ready(url)
        yield url


def complete(url: str, **body) -> dict:
    import httpx

    response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "temperature": 0, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def streamed(url: str, **body) -> list[dict]:
    import json

    import httpx

    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "temperature": 0, "stream": True,
                                                              **body}, timeout=60) as response:
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: {")]


def check_echo_shape(logprobs: dict, text: str) -> None:
    """Tokens re-join into the text, and each text_offset is where its token starts."""
    assert "".join(logprobs["tokens"]) == text
    at = 0
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"]):
        assert offset == at
        at += len(token)


def test_echo_with_max_tokens_zero_scores_the_prompt(server, llm, hf_model):
    prompt = "The quick brown fox jumps over the lazy dog."
    choice = complete(server, prompt=prompt, echo=True, logprobs=2, max_tokens=0)["choices"][0]
    tokens = llm.tokenizer.encode(prompt, bos=True, eos=False)
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    check_echo_shape(lp, prompt)
    assert len(lp["tokens"]) == len(tokens) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    reference = reference_scores(hf_model, tokens)
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), reference, atol=1e-4, rtol=0)
    assert all(len(top) <= 2 and max(top.values()) >= lp["token_logprobs"][k + 1] - 1e-6
               for k, top in enumerate(lp["top_logprobs"][1:]))


def test_echo_then_generated_tokens_and_streamed_the_same(server):
    prompt = "A journey of a thousand miles"
    whole = complete(server, prompt=prompt, echo=True, logprobs=1, max_tokens=5)["choices"][0]
    plain = complete(server, prompt=prompt, max_tokens=5, logprobs=1)["choices"][0]
    assert whole["text"] == prompt + plain["text"]
    lp = whole["logprobs"]
    check_echo_shape(lp, whole["text"])
    assert lp["tokens"][-5:] == plain["logprobs"]["tokens"] and lp["token_logprobs"][-5:] == plain["logprobs"][
        "token_logprobs"]
    chunks = [c["choices"][0] for c in streamed(server, prompt=prompt, echo=True, logprobs=1, max_tokens=5)]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    joined = {key: sum((c["logprobs"][key] for c in chunks), []) for key in lp}
    assert joined == lp
    echo_only = complete(server, prompt=[prompt, "Numbers"], echo=True, max_tokens=2)["choices"]
    assert [c["text"][:len(p)] for c, p in zip(echo_only, [prompt, "Numbers"])] == [prompt, "Numbers"]


def test_max_tokens_zero_without_scoring_is_refused(server):
    import httpx

    response = httpx.post(f"{server}/v1/completions", json={"prompt": "a", "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_prompt_logprobs_as_vllm_spells_them(server, llm, hf_model):
    import httpx

    prompt = "To be or not to be"
    tokens = llm.tokenizer.encode(prompt, bos=True, eos=False)
    choice = complete(server, prompt=prompt, max_tokens=1, prompt_logprobs=2)["choices"][0]
    scores = choice["prompt_logprobs"]
    assert len(scores) == len(tokens) and scores[0] is None
    reference = reference_scores(hf_model, tokens)
    for k, (token, entry) in enumerate(zip(tokens[1:], scores[1:])):
        own = entry[str(token)]
        assert abs(own["logprob"] - reference[k].item()) < 1e-4 and own["rank"] >= 1
        assert len(entry) in (2, 3) and all(e["rank"] in (1, 2) for t, e in entry.items() if t != str(token))
    chat = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                             "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


@pytest.mark.slow
def test_smollm2_echo_rejoins_multibyte_text_and_scores_as_transformers(smollm2_gguf, smollm2_reference):
    from llama_int8.server import ServerSettings, create_app
    from test_serve import running_server, wait_ready

    llm = Llama.build(smollm2_gguf, quant="none", dtype="float32", device="cpu", max_seq_len=256, max_batch_size=2)
    prompt = "Café au lait, 東京タワー, naïve 🙂 and ∑ x² — done."
    with running_server(create_app(ServerSettings(model_name="tiny"), lambda: llm)) as url:
        wait_ready(url)
        choice = complete(url, prompt=prompt, echo=True, logprobs=1, max_tokens=0)["choices"][0]
    assert choice["text"] == prompt
    check_echo_shape(choice["logprobs"], prompt)
    tokens = llm.tokenizer.encode(prompt, bos=True, eos=False)
    reference = reference_scores(smollm2_reference, tokens)
    ours = torch.tensor(choice["logprobs"]["token_logprobs"][1:])
    assert torch.allclose(ours, reference, atol=1e-4, rtol=0), (ours - reference).abs().max()
