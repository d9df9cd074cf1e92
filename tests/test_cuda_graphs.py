"""The decode step a CUDA graph captures (Transformer.decode_hidden), dry-run on the CPU: fixed
shapes, positions as a tensor, the same logits and tokens as forward's own steps; and what
Llama.build refuses. The capture and replay themselves run in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.cuda_graphs import capture_refusal
from llama_int8.quantize import parse_quant_mode

PROMPTS = [[5, 9, 17, 33, 2, 71], [40, 41, 8, 12, 90, 3]]
STEPS = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sp_model):
    root = tmp_path_factory.mktemp("graphs")
    llama = tiny_hf_model(seed=3, num_key_value_heads=2)
    mistral = tiny_hf_model(seed=4, model_type="mistral", sliding_window=5, num_key_value_heads=2)
    return {"llama": write_hf_folder(llama, root / "llama", tokenizer=sp_model),
            "mistral": write_hf_folder(mistral, root / "mistral", tokenizer=sp_model)}


def steps_through_decode_hidden(llm: Llama) -> list[int]:
    """Have forward take every decode step through decode_hidden, as a replayed graph does; returns
    the positions of the steps it takes, as they come."""
    positions = []

    def step(model, tokens: torch.Tensor, position: int) -> torch.Tensor:
        positions.append(position)
        return model.decode_hidden(tokens, torch.full((tokens.shape[0],), position, device=tokens.device))
    llm.model.decode_graph = step
    return positions


@pytest.mark.parametrize("model, kv_cache", [("llama", "model"), ("llama", "int8"), ("mistral", "model")],
                         ids=["cache", "int8-cache", "sliding-window"])
@pytest.mark.parametrize("batch", [1, 2])
def test_fixed_shape_decode_steps_give_forwards_tokens(folders, model, kv_cache, batch):
    """Attention over the whole cache, masked, with the position a tensor, gives forward's greedy
    tokens, and logits equal up to the order of attention's sums; a rolling cache (window 5, shorter
    than the text) and the int8 cache included."""
    settings = dict(quant="none", dtype="float32", device="cpu", max_seq_len=32, max_batch_size=2, kv_cache=kv_cache)
    eager, fixed = Llama.build(folders[model], **settings), Llama.build(folders[model], **settings)
    positions = steps_through_decode_hidden(fixed)
    prompts = PROMPTS[:batch]
    want = eager.generate(prompts, max_gen_len=STEPS, temperature=0, stop_ids=())
    assert fixed.generate(prompts, max_gen_len=STEPS, temperature=0, stop_ids=()) == want
    assert positions == list(range(len(PROMPTS[0]), len(PROMPTS[0]) + STEPS - 1))  # every step after the prefill
    with torch.inference_mode():
        tokens = torch.tensor([p + w for p, w in zip(prompts, want)])
        n = tokens.shape[1] - 1
        for llm in (eager, fixed):
            llm.model(tokens[:, :n - 1], 0)
        got, expected = fixed.model(tokens[:, n - 1:n], n - 1), eager.model(tokens[:, n - 1:n], n - 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_fixed_shape_step_reads_no_position_on_the_host(folders):
    """decode_hidden takes its positions as a tensor and never turns one into a Python number (a graph
    would record the number it saw at capture)."""
    llm = Llama.build(folders["llama"], quant="none", dtype="float32", device="cpu", max_seq_len=32)
    reads = []
    original = torch.Tensor.tolist, torch.Tensor.item
    try:
        torch.Tensor.tolist = lambda t: reads.append("tolist") or original[0](t)
        torch.Tensor.item = lambda t: reads.append("item") or original[1](t)
        with torch.inference_mode():
            llm.model.decode_hidden(torch.tensor([[7]]), torch.tensor([3]))
    finally:
        torch.Tensor.tolist, torch.Tensor.item = original
    assert reads == []


def test_build_refuses_a_cuda_graph_off_cuda_before_loading(folders, monkeypatch):
    import llama_int8.generation as generation

    monkeypatch.setattr(generation, "load_weights", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match="cuda_graph: CUDA graphs need a CUDA device; the model is on cpu"):
        Llama.build(folders["llama"], quant="none", device="cpu", cuda_graph=True)


@pytest.mark.parametrize("mode, n_experts, reason", [("int8", 0, "LLM.int8"), ("int8-0", 0, None),
                                                     ("nf4", 8, "mixture-of-experts"), ("nf4", 0, None),
                                                     ("none", 0, None), ("gguf", 0, None)])
def test_capture_refusal_names_what_waits_on_the_host(mode, n_experts, reason):
    """int8-0: LLM.int8() at outlier threshold 0, which looks for no outliers."""
    cfg = parse_quant_mode(mode.removesuffix("-0"), 0.0 if mode.endswith("-0") else 6.0)
    refusal = capture_refusal(torch.device("cuda"), cfg, n_experts)
    assert refusal is None if reason is None else reason in refusal
