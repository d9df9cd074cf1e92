"""On a CUDA GPU: host-quantized layers reach the device as quantized bytes only, and compute correctly.
Skipped without CUDA (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.quantize import parse_quant_mode, quantized_weight_bytes
from llama_int8.quantized_layers import quantize_linear_on_host

pytestmark = pytest.mark.gpu

SHAPE = (4096, 4096)  # large enough that a 16-bit copy (32 MiB) stands out from allocator noise


@pytest.mark.parametrize("mode, max_error", [("int8", 0.02), ("nf4", 0.11), ("nf4-dq", 0.105), ("fp4", 0.145)])
def test_host_quantized_layer_on_cuda_without_a_16_bit_copy(mode, max_error):
    device = torch.device("cuda")
    weight = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.02
    cfg = parse_quant_mode(mode)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    layer = quantize_linear_on_host(weight, cfg, device, torch.bfloat16)
    torch.cuda.synchronize()
    quantized = quantized_weight_bytes(SHAPE[0], SHAPE[1], cfg)
    dense = weight.numel() * weight.element_size()
    held = torch.cuda.memory_allocated(device) - before
    peak = torch.cuda.max_memory_allocated(device) - before
    assert held <= quantized * 1.05 + (1 << 20), (held, quantized)
    assert peak < dense // 2, f"peak {peak} bytes while building: a 16-bit copy ({dense} bytes) was made"

    x = torch.randn(3, SHAPE[1], generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    with torch.inference_mode():
        out = layer(x).float()
    ref = x.float() @ weight.to(device).float().t()
    assert (out - ref).norm() / ref.norm() < max_error


def test_int8_model_on_cuda_matches_cpu_float32(tmp_path, sp_model):
    ref = tiny_hf_model(num_key_value_heads=2, hidden_size=256, intermediate_size=512)
    folder = write_hf_folder(ref, tmp_path / "m", tokenizer=sp_model)
    llm = Llama.build(folder, quant="int8", device="cuda", dtype="bfloat16", max_seq_len=64)
    tokens = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(tokens).logits
    ours = llm.model(tokens.cuda(), 0).cpu()
    assert (ours - expected).norm() / expected.norm() < 0.05
