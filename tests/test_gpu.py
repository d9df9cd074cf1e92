"""On a CUDA GPU: host-quantized layers reach the device as quantized bytes only and compute correctly;
they stay on the device they were built on and give their memory back at `del`; and what the README
(Quantization) says bitsandbytes does there: a host wait in every int8 layer with an outlier
threshold, int8 outputs written as float16, 4-bit prefill through a 16-bit copy of the weight.
Skipped without CUDA (see conftest.py); tests/test_devices.py checks the CPU side."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable

import pytest
import torch

from conftest import tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.quantize import parse_quant_mode, quantized_weight_bytes
from llama_int8.quantized_layers import quantize_linear_on_host

pytestmark = pytest.mark.gpu

SHAPE = (4096, 4096)  # large enough that a 16-bit copy (32 MiB) stands out from allocator noise
# What the caching allocator may add to the bytes a layer holds: rounding, and the quant state's
# few small tensors.
ALLOWANCE = 1 << 20


def random_weight(shape: tuple[int, int] = SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16) * 0.02


def random_input(rows: int, features: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)


def tiny_folder(tmp_path, sp_model):
    ref = tiny_hf_model(num_key_value_heads=2, hidden_size=256, intermediate_size=512)
    return ref, write_hf_folder(ref, tmp_path / "m", tokenizer=sp_model)


@pytest.mark.parametrize("mode, max_error", [("int8", 0.02), ("nf4", 0.11), ("nf4-dq", 0.105), ("fp4", 0.145)])
def test_host_quantized_layer_on_cuda_without_a_16_bit_copy(mode, max_error):
    device = torch.device("cuda")
    weight = random_weight()
    cfg = parse_quant_mode(mode)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    layer = quantize_linear_on_host(weight, cfg, device, torch.bfloat16)
    torch.cuda.synchronize()
    quantized = quantized_weight_bytes(SHAPE[0], SHAPE[1], cfg)
    held = torch.cuda.memory_allocated(device) - before
    peak = torch.cuda.max_memory_allocated(device) - before
    assert held <= quantized * 1.05 + ALLOWANCE, (held, quantized)
    # int8 holds half the 16-bit bytes itself: the bound is what is held, not a fraction of the 16-bit size.
    assert peak <= held + ALLOWANCE, f"peak {peak} bytes while building, {held} held: a transient copy was made"

    x = random_input(3, SHAPE[1])
    with torch.inference_mode():
        out = layer(x).float()
    ref = x.float() @ weight.to(device).float().t()
    assert (out - ref).norm() / ref.norm() < max_error


def test_int8_model_on_cuda_matches_cpu_float32(tmp_path, sp_model):
    ref, folder = tiny_folder(tmp_path, sp_model)
    llm = Llama.build(folder, quant="int8", device="cuda", dtype="bfloat16", max_seq_len=64)
    tokens = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(tokens).logits
    ours = llm.model(tokens.cuda(), 0).cpu()
    assert (ours - expected).norm() / expected.norm() < 0.05


# --- Staying where they were built, and leaving at `del` ------------------------------------------

@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_layers_refuse_to_change_device(mode):
    weight, cfg = random_weight((256, 128)), parse_quant_mode(mode)
    on_cpu = quantize_linear_on_host(weight, cfg, "cpu", torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"built on cpu and cannot be moved to cuda:0.*device='cuda:0'"):
        on_cpu.cuda()
    on_cuda = quantize_linear_on_host(weight, cfg, "cuda", torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"built on cuda:0 and cannot be moved to cpu"):
        on_cuda.cpu()
    assert on_cuda.to("cuda") is on_cuda and on_cuda.cuda() is on_cuda


@pytest.mark.parametrize("mode", ["int8", "nf4", "nf4-dq"])
def test_deleting_a_quantized_layer_returns_its_device_memory_at_once(mode):
    """No reference cycle keeps a layer alive until a garbage collection: rebuilding a model in one
    process does not need room for two."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layer = quantize_linear_on_host(random_weight(), parse_quant_mode(mode), "cuda", torch.bfloat16)
    with torch.inference_mode():
        layer(random_input(2, SHAPE[1]))  # after a forward: int8 moves its scales into its state then
    gc.collect()
    gc.disable()
    try:
        del layer
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - before <= ALLOWANCE
    finally:
        gc.enable()


# --- What bitsandbytes does on CUDA (README, Quantization) ----------------------------------------

def host_syncs(fn: Callable[[], object]) -> int:
    """How many times fn makes the host wait for the GPU (torch's sync debug mode counts them)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_int8_with_an_outlier_threshold_waits_for_the_gpu_in_every_layer(tmp_path, sp_model):
    weight = random_weight((512, 256))
    x = random_input(1, 256)
    calls = {}
    for threshold in (6.0, 0.0):
        layer = quantize_linear_on_host(weight, parse_quant_mode("int8", threshold), "cuda", torch.bfloat16)
        with torch.inference_mode():
            layer(x)  # the first call sets up handles
            calls[threshold] = host_syncs(lambda: layer(x))
    assert calls[6.0] >= 1 and calls[0.0] == 0, calls

    ref, folder = tiny_folder(tmp_path, sp_model)
    llm = Llama.build(folder, quant="int8", device="cuda", dtype="bfloat16", max_seq_len=16)
    token = torch.tensor([[5]], device="cuda")
    with torch.inference_mode():
        llm.model(token, 0)
        step = host_syncs(lambda: llm.model(token, 1))
    assert step >= 7 * ref.config.num_hidden_layers, step


def test_int8_on_cuda_writes_its_outputs_as_float16_so_beyond_65504_they_are_inf():
    """Where the CPU's output is 81920 (tests/test_devices.py)."""
    layer = quantize_linear_on_host(torch.full((64, 4096), 4.0), parse_quant_mode("int8"), "cuda", torch.bfloat16)
    x = torch.full((2, 4096), 5.0, device="cuda", dtype=torch.bfloat16)  # below the threshold: int8 path
    with torch.inference_mode():
        assert torch.isinf(layer(x)).all()


def test_4bit_prefill_dequantizes_the_whole_weight_to_16_bits_and_decode_does_not():
    out_features, in_features = 11008, 4096  # LLaMA-7B's w1
    layer = quantize_linear_on_host(random_weight((out_features, in_features)), parse_quant_mode("nf4"), "cuda",
                                    torch.bfloat16)
    sixteen_bit = out_features * in_features * 2

    def transient(rows: int) -> int:
        x = random_input(rows, in_features)
        with torch.inference_mode():
            layer(x)  # warm-up
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = layer(x)
            torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - held - out.numel() * out.element_size()

    decode, prefill = transient(1), transient(2048)
    assert decode < sixteen_bit // 8, decode
    assert prefill >= sixteen_bit, (prefill, sixteen_bit)


# --- Decode steps replayed from CUDA graphs (cuda_graphs.py; the CPU dry run is test_cuda_graphs.py) --

GRAPH_PROMPTS = [[5, 9, 17, 33, 2, 71], [40, 41, 8, 12, 90, 3]]


@pytest.mark.parametrize("mode, threshold", [("nf4", None), ("none", None), ("int8", 0.0)],
                         ids=["nf4", "none", "int8-threshold-0"])
@pytest.mark.parametrize("window", [None, 5], ids=["cache", "window-5"])
def test_cuda_graph_steps_give_the_eager_tokens(tmp_path, sp_model, mode, threshold, window):
    """One batch size, then another (a second capture while the cache holds a text); with a window of
    5 the capture's warm-up writes into a ring slot that holds a visible key, which must come back.
    LLM.int8() at threshold 0 looks for no outliers, so its layers should not wait on the host."""
    extra = dict(model_type="mistral", sliding_window=window) if window else {}
    ref = tiny_hf_model(num_key_value_heads=2, hidden_size=256, intermediate_size=512, **extra)
    folder = write_hf_folder(ref, tmp_path / "m", tokenizer=sp_model)
    settings = dict(quant=mode, int8_threshold=threshold, device="cuda", dtype="float32", max_seq_len=64,
                    max_batch_size=2)
    eager, graphed = Llama.build(folder, **settings), Llama.build(folder, cuda_graph=True, **settings)
    for prompts in (GRAPH_PROMPTS[:1], GRAPH_PROMPTS):
        want = eager.generate(prompts, max_gen_len=16, temperature=0, stop_ids=())
        assert graphed.generate(prompts, max_gen_len=16, temperature=0, stop_ids=()) == want
    graphs = graphed.model.decode_graph
    assert graphs.failure is None and sorted(graphs.steps) == [1, 2]


def test_cuda_graph_refused_for_int8(tmp_path, sp_model):
    _, folder = tiny_folder(tmp_path, sp_model)
    with pytest.raises(ValueError, match="cuda_graph: LLM.int8.. layers with an outlier threshold"):
        Llama.build(folder, quant="int8", device="cuda", cuda_graph=True)
