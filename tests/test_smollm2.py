"""Real weights: SmolLM2-135M-Instruct in float32 against transformers, from an HF folder and from the
same weights written as a Meta checkpoint (q/k rows un-permuted back to Meta's layout)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_to_meta_state
from llama_int8 import Llama

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAT = [{"role": "user", "content": "What is the tallest mountain in the world?"}]
STEPS = 40


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_reference, smollm2_hf, tmp_path_factory):
    """The reference weights as consolidated.00.pth + params.json, with the tokenizer beside them."""
    folder = tmp_path_factory.mktemp("smollm2-meta")
    cfg = smollm2_reference.config
    torch.save(hf_to_meta_state(smollm2_reference), folder / "consolidated.00.pth")
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "norm_eps": cfg.rms_norm_eps,
              "hidden_dim": cfg.intermediate_size, "rope_theta": 100000.0, "tie_word_embeddings": True}
    (folder / "params.json").write_text(json.dumps(params))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (folder / name).write_bytes((smollm2_hf / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def prompts(smollm2_hf) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    return [tok.encode(p) for p in PROMPTS] + [list(chat)]


def reference_greedy(model, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False, top_p=None, top_k=None,
                         temperature=None)[0, len(prompt):].tolist()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    return out[:next((i for i, t in enumerate(out) if t in stops), len(out))]


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_greedy_equals_transformers(layout, smollm2_hf, smollm2_meta, smollm2_reference, prompts):
    folder = smollm2_hf if layout == "hf" else smollm2_meta
    llm = Llama.build(folder, quant="none", dtype="float32", device="cpu", max_seq_len=128)
    tokens = torch.tensor([prompts[0]])
    with torch.no_grad():
        expected = smollm2_reference(tokens).logits
    torch.testing.assert_close(llm.model(tokens, 0), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    for prompt in prompts:
        ours = llm.generate([prompt], max_gen_len=STEPS, temperature=0)[0]
        assert ours == reference_greedy(smollm2_reference, prompt)


def test_chat_answer_is_sensible(smollm2_hf, prompts):
    llm = Llama.build(smollm2_hf, quant="none", dtype="float32", device="cpu", max_seq_len=128)
    answer = llm.tokenizer.decode(llm.generate([prompts[3]], max_gen_len=STEPS, temperature=0)[0])
    assert "Everest" in answer
