"""Devices, on the CPU: the dtype chosen for the device asked for, quantized layers that stay on the
device they were built on (bitsandbytes leaves part of a layer behind when it is moved), CPU forwards
that serve host inputs only, memory returned at `del` without a garbage collection, and int8 outputs
beyond float16's range. tests/test_gpu.py checks the same things on a GPU."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import bitsandbytes as bnb
import pytest
import torch

from conftest import tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.loader import default_dtype
from llama_int8.quantize import parse_quant_mode
from llama_int8.quantized_layers import quantize_linear_on_host, takes_fast_path

MODES = ["int8", "nf4", "nf4-dq"]
# LLaMA-like sizes: bitsandbytes' CPU 4-bit kernels need out % 32 == 0 and in % 64 == 0.
IN, OUT = 128, 256


def host_layer(mode: str) -> torch.nn.Module:
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.02
    return quantize_linear_on_host(weight, parse_quant_mode(mode), "cpu", torch.float32)


def host_input(rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, IN, generator=torch.Generator().manual_seed(1))


@contextmanager
def no_garbage_collection() -> Iterator[None]:
    """Only reference counting frees objects inside: what a cycle holds stays held."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- The dtype for the device asked for -----------------------------------------------------------

@pytest.mark.parametrize("capability, expected", [((6, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_default_dtype_reads_the_compute_capability_of_the_device_asked_for(monkeypatch, capability, expected):
    """bfloat16 from compute capability 8.0 on, asked of the target device; never
    is_bf16_supported(), which is true on GPUs that only emulate bfloat16 (T4, V100) and looks at
    the current device instead."""
    asked = []

    def capability_of(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return capability

    def refuse(*args, **kwargs):
        raise AssertionError("is_bf16_supported() consulted")

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", refuse)
    assert default_dtype(torch.device("cuda:1")) is expected
    assert asked == [torch.device("cuda:1")]
    assert default_dtype(torch.device("cpu")) is torch.float32 and len(asked) == 1


# --- Quantized layers stay where they were built --------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_a_quantized_model_refuses_to_move_and_says_to_build_it_there(mode, tmp_path, sp_model):
    ref = tiny_hf_model(num_key_value_heads=2, hidden_size=IN, intermediate_size=OUT)
    llm = Llama.build(write_hf_folder(ref, tmp_path / "m", tokenizer=sp_model), quant=mode, device="cpu",
                      max_seq_len=16)
    with pytest.raises(RuntimeError, match=r"built on cpu and cannot be moved to meta.*device='meta'"):
        llm.model.to("meta")
    # Where torch has CUDA the layer refuses cuda:0; where it has none, torch's own failure becomes this.
    with pytest.raises(RuntimeError, match=r"built on cpu and cannot be moved .*Llama\.build\(\.\.\., device="):
        host_layer(mode).cuda()


@pytest.mark.parametrize("mode", MODES)
def test_calls_that_keep_a_layer_on_its_device_go_through_and_change_nothing(mode):
    layer = host_layer(mode)
    x = host_input()
    with torch.inference_mode():
        before = layer(x)
        assert layer.cpu() is layer and layer.to("cpu") is layer and layer.to(torch.float32) is layer
        assert torch.equal(layer(x), before)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_forwards_serve_only_host_inputs(mode):
    """The lean CPU forwards hand raw pointers to CPU kernels: an input elsewhere takes
    bitsandbytes' own forward, which dispatches on the input's device."""
    layer = host_layer(mode)
    assert takes_fast_path(layer, host_input())
    assert not takes_fast_path(layer, torch.empty(3, IN, device="meta"))
    assert not takes_fast_path(layer, host_input().requires_grad_())
    assert not takes_fast_path(layer.train(), host_input())


# --- Memory returned at `del` ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_a_deleted_layer_is_freed_at_once(mode):
    """No reference cycle holds a layer or its weight (bitsandbytes' from_prequantized(module=...)
    made one between the 4-bit parameter and its layer): `del` frees them without a collection."""
    layer = host_layer(mode)
    with torch.inference_mode():
        layer(host_input())  # a forward first: the state it sets up must not hold the layer either
    refs = [weakref.ref(layer), weakref.ref(layer.weight)]
    with no_garbage_collection():
        del layer
        assert [r() for r in refs] == [None, None]


@pytest.mark.parametrize("mode", MODES)
def test_a_deleted_llama_frees_its_quantized_weights_at_once(mode, tmp_path, sp_model):
    """Building a model again in the same process needs no room for two."""
    ref = tiny_hf_model(num_key_value_heads=2, hidden_size=IN, intermediate_size=OUT)
    llm = Llama.build(write_hf_folder(ref, tmp_path / "m", tokenizer=sp_model), quant=mode, device="cpu",
                      max_seq_len=16)
    llm.generate([[1, 5, 6, 7]], max_gen_len=3, temperature=0)
    weights = [weakref.ref(m.weight) for m in llm.model.modules()
               if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
    assert len(weights) == 7 * ref.config.num_hidden_layers + 1  # and the head, int8 by default
    with no_garbage_collection():
        del llm
        assert all(w() is None for w in weights)


# --- int8 beyond float16's range ------------------------------------------------------------------

def test_int8_outputs_beyond_float16_stay_finite_on_the_cpu():
    """LLM.int8() quantizes its input through float16 on every device; on the CPU the product is
    scaled in float32, so an output above 65504 stays finite (on CUDA bitsandbytes writes it as
    float16: tests/test_gpu.py)."""
    weight = torch.full((64, 4096), 4.0)
    layer = quantize_linear_on_host(weight, parse_quant_mode("int8"), "cpu", torch.float32)
    x = torch.full((2, 4096), 5.0)  # below the outlier threshold: every column takes the int8 path
    with torch.inference_mode():
        out = layer(x)
    torch.testing.assert_close(out, torch.full((2, 64), 4.0 * 5.0 * 4096), rtol=1e-2, atol=0)
