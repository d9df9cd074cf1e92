"""Quant mode gguf: a GGUF file's Q4_0 / Q4_1 block weights served as stored, through torch's int4pack
kernel (llama_int8/int4pack.py). The weights the kernel computes with against gguf's own dequantized
values, bit for bit in float32; whole models against the float32 load of the same file (tiny llama,
Qwen2, Qwen3 and Mixtral GGUFs written here) and the real SmolLM2 against transformers; the errors.

Measured here (2-core AVX-512 host, torch 2.13 CPU): every one of SmolLM2-135M-Instruct.Q4_1's 210
block weights, applied by the kernel to the identity, equals gguf.quants.dequantize bit for bit (0 of
3,317,760 blocks with an inexact m + 8d); that takes 145 s through the float32 kernel's scalar loop,
so the suite applies the kernel to two blocks' weights and checks the scales and zeros of all of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_logits_close, tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.formats.gguf_file import GGUFCheckpoint
from llama_int8.int4pack import (BLOCK_BYTES, Int4PackLinear, int4pack_linear, int4pack_product, int4pack_weight,
                                 pack_for_cpu, unpack_q4_blocks)
from llama_int8.loader import expected_weight_bytes
from llama_int8.memory import weight_bytes
from llama_int8.model import Linear, empty_model
from llama_int8.quantize import parse_quant_mode, quantize_weight
from test_gguf import write_tiny_gguf
from test_mixtral import tiny_mixtral, write_mixtral_gguf
from test_qwen import PROMPT, qwen_tokenizer, tiny_qwen, write_qwen_gguf  # noqa: F401  (qwen_tokenizer: a fixture)

Q4_KINDS = tuple(BLOCK_BYTES)
GGUF_BLOCK_LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down)(_exps)?)\.weight")
GREEDY_STEPS = 8


def ggml_blocks(weight: torch.Tensor, kind: str) -> np.ndarray:
    """weight [out, in] quantized by gguf's own quantizer: uint8 [out, in / 32 * bytes per block]."""
    import gguf

    return gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[kind])


def dequantized(blocks: np.ndarray, kind: str) -> torch.Tensor:
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]))


def random_weight(out_features: int = 192, in_features: int = 160, seed: int = 0) -> torch.Tensor:
    """A weight whose blocks have offsets of their own (Q4_1's minimum far from 0 in some)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.05 + torch.randn(out_features, 1, generator=g) * 0.1


# --- One layer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", Q4_KINDS)
def test_the_kernel_computes_with_ggufs_weights_bit_for_bit(kind):
    blocks = ggml_blocks(random_weight(), kind)
    layer = int4pack_linear(blocks, kind, "cpu", torch.float32)
    assert (layer.in_features, layer.out_features) == (160, 192)
    assert torch.equal(int4pack_weight(layer), dequantized(blocks, kind))


@pytest.mark.parametrize("kind", Q4_KINDS)
def test_forward_takes_any_leading_shape_adds_the_bias_and_returns_the_inputs_dtype(kind):
    blocks = ggml_blocks(random_weight(), kind)
    layer = int4pack_linear(blocks, kind, "cpu", torch.float32)
    x = torch.randn(2, 3, 160)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    layer.bias = torch.nn.Parameter(torch.randn(192), requires_grad=False)
    expected = x @ dequantized(blocks, kind).T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_scales_round_the_weights_to_bfloat16():
    """The CPU's fast kernel: scales and zeros in bfloat16, weights close to gguf's, not equal."""
    blocks = ggml_blocks(random_weight(), "Q4_1")
    layer = int4pack_linear(blocks, "Q4_1", "cpu", torch.bfloat16)
    assert layer.scales_and_zeros.dtype == torch.bfloat16
    reference = dequantized(blocks, "Q4_1")
    error = (int4pack_weight(layer).float() - reference).abs().max() / reference.abs().max()
    assert 0 < error < 2 ** -7


def test_packing_is_row_local_in_blocks_of_64_rows():
    """What fusing layers that share an input needs: the packed rows of two weights one after the other
    are the packed rows of the two weights stacked, where the first has a multiple of 64 rows (the
    AVX-512 packing block; 32 elsewhere); their scales and zeros stack along dim 1, which is not
    contiguous per layer, so a fused [groups, rows, 2] tensor's column slices need .contiguous()."""
    q = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(pack_for_cpu(q), torch.cat([pack_for_cpu(q[:64]), pack_for_cpu(q[64:])]))
    scales_and_zeros = torch.rand(3, 192, 2)
    x = torch.randn(2, 96)
    whole = int4pack_product(x, pack_for_cpu(q), scales_and_zeros)
    part = int4pack_product(x, pack_for_cpu(q[64:]), scales_and_zeros[:, 64:].contiguous())
    assert torch.equal(part, whole[:, 64:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_sharing_an_input_share_one_product(dtype):
    """fused_product makes one Int4PackProduct of q/k/v-like layers (bias included): its columns are
    what each layer computes alone, each layer's weight a view of the fused rows (no byte twice),
    and each layer called alone after fusing still computes its own numbers."""
    from llama_int8.int4pack import Int4PackProduct
    from llama_int8.quantized_layers import fused_product

    layers = [int4pack_linear(ggml_blocks(random_weight(n, 160, seed=n), kind), kind, "cpu", dtype)
              for n, kind in ((128, "Q4_0"), (64, "Q4_1"), (64, "Q4_1"))]
    for i, layer in enumerate(layers):
        layer.bias = torch.nn.Parameter(torch.randn(layer.out_features, dtype=dtype), requires_grad=False)
    x = torch.randn(3, 160, dtype=dtype)
    with torch.inference_mode():
        alone = [layer(x) for layer in layers]
        product = fused_product(layers)
        assert isinstance(product, Int4PackProduct)
        assert layers[1].weight.data_ptr() == product.packed[128:].data_ptr()
        assert torch.equal(product(x), torch.cat(alone, dim=1))
        assert all(torch.equal(layer(x), want) for layer, want in zip(layers, alone))


def test_layers_whose_rows_do_not_fill_packing_blocks_are_left_apart():
    from llama_int8.quantized_layers import fused_product

    layers = [int4pack_linear(ggml_blocks(random_weight(n, 160), "Q4_0"), "Q4_0", "cpu", torch.float32) for n in (48, 64)]
    assert fused_product(layers) is None


def test_the_layer_stays_on_its_device():
    layer = int4pack_linear(ggml_blocks(random_weight(), "Q4_0"), "Q4_0", "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="packed for cpu's int4pack kernel"):
        layer.to("meta")


def test_a_weight_the_kernel_cannot_take_is_refused_by_its_size():
    with pytest.raises(ValueError, match="24 rows.*multiple of 16"):
        int4pack_linear(ggml_blocks(random_weight(24, 64), "Q4_0"), "Q4_0", "cpu", torch.float32)
    with pytest.raises(ValueError, match="Q4_0 and Q4_1 blocks, not Q8_0"):
        int4pack_linear(ggml_blocks(random_weight(32, 64), "Q8_0"), "Q8_0", "cpu", torch.float32)


# --- Whole tiny models: the gguf load against the float32 load of the same file --------------------

def with_block_weights_as(source: Path, target: Path, kind_of: Callable[[str, str], str]) -> Path:
    """source's GGUF written again, metadata as it is, each tensor stored as kind_of(its GGUF name,
    its ggml type) from its dequantized values."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType[kind_of(t.name, t.tensor_type.name)]
        writer.add_tensor(t.name, gguf.quants.quantize(gguf.quants.dequantize(t.data, t.tensor_type), kind),
                          raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def block_linears_as(kind: str) -> Callable[[str, str], str]:
    """Block linear weights in kind, every other tensor as it is stored."""
    return lambda name, stored: kind if GGUF_BLOCK_LINEAR.fullmatch(name) else stored


def mixed_types(name: str, stored: str) -> str:
    """Attention Q4_0, gate/up Q4_1, the first down projection F16 (kept float in mode gguf), the other
    Q4_1, the embedding and head Q8_0, the norms as they are."""
    if name == "blk.0.ffn_down.weight":
        return "F16"
    if GGUF_BLOCK_LINEAR.fullmatch(name):
        return "Q4_0" if ".attn_" in name else "Q4_1"
    return "Q8_0" if name in ("token_embd.weight", "output.weight") else stored


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory, qwen_tokenizer, sp_model) -> dict[str, Path]:
    """A tiny llama (grouped-query attention, untied head) in mixed types, Qwen2 and Qwen3 (half-split
    q/k rows, q/k/v biases or q/k norms) in Q4_1 and Q4_0, and a Mixtral in Q4_0."""
    root = tmp_path_factory.mktemp("native")
    float_llama = write_tiny_gguf(root / "llama-f32.gguf", tiny_hf_model(num_key_value_heads=2))
    made = {"llama": with_block_weights_as(float_llama, root / "llama.gguf", mixed_types)}
    for kind, q4 in (("qwen2", "Q4_1"), ("qwen3", "Q4_0")):
        source = write_qwen_gguf(tiny_qwen(kind), root / f"{kind}-f32.gguf", qwen_tokenizer)
        made[kind] = with_block_weights_as(source, root / f"{kind}.gguf", block_linears_as(q4))
    hf_mixtral = write_hf_folder(tiny_mixtral(seed=1), root / "mixtral-hf", tokenizer=sp_model)
    made["mixtral"] = write_mixtral_gguf(root / "mixtral.gguf", hf_mixtral, qtype="Q4_0")
    return made


def logits(llm: Llama, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model(torch.tensor([tokens]), 0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mixtral"])
def test_gguf_load_equals_the_float32_load_of_the_same_file(kind, tiny_ggufs, sp_model, one_torch_thread, caplog):
    tokenizer = None if kind.startswith("qwen") else sp_model  # the Qwen files hold their vocabulary
    build = dict(device="cpu", dtype="float32", max_seq_len=64, tokenizer_path=tokenizer)
    with caplog.at_level(logging.WARNING, logger="llama_int8"):
        ours = Llama.build(tiny_ggufs[kind], quant="gguf", quantize_head=False, **build)
    reference = Llama.build(tiny_ggufs[kind], quant="none", **build)
    layers = ours.model.layers
    feed_forward = layers[1].feed_forward.experts[0] if kind == "mixtral" else layers[1].feed_forward
    assert all(isinstance(m, Int4PackLinear) for m in (layers[0].attention.wq, layers[1].attention.wk, feed_forward.w2))
    kept_float = [r.getMessage() for r in caplog.records if "not stored Q4_0/Q4_1" in r.getMessage()]
    if kind == "llama":  # its first down projection is F16
        assert type(layers[0].feed_forward.w2) is Linear and "1 block linear weights" in kept_float[0]
    else:
        assert not kept_float
    if kind == "qwen2":
        assert layers[0].attention.wq.bias is not None
    tokens = PROMPT[:12] if kind.startswith("qwen") else [1, 17, 42, 99, 7, 3, 64, 12, 80, 33, 100, 9]
    assert_logits_close(logits(ours, tokens), logits(reference, tokens))


def test_the_memory_check_counts_what_loads_packed_and_what_stays_float(tiny_ggufs, sp_model, one_torch_thread):
    """The tiny llama file keeps one block weight F16: the check before loading counts it as float32,
    the others as packed, and so matches what loading holds."""
    from llama_int8.formats import open_checkpoint
    from llama_int8.loader import gguf_packed_weights

    cfg = parse_quant_mode("gguf", quantize_head=False)
    packed = gguf_packed_weights(open_checkpoint(tiny_ggufs["llama"]), cfg)
    assert "layers.0.feed_forward.w2.weight" not in packed and "layers.0.attention.wq.weight" in packed
    llm = Llama.build(tiny_ggufs["llama"], quant="gguf", quantize_head=False, device="cpu", dtype="float32",
                      max_seq_len=16, tokenizer_path=sp_model)
    expected = expected_weight_bytes(empty_model(llm.model.args), cfg, torch.device("cpu"), torch.float32, packed)
    assert weight_bytes(llm.model) == expected


def test_the_head_is_int8_by_default(tiny_ggufs, sp_model, one_torch_thread):
    import bitsandbytes as bnb

    llm = Llama.build(tiny_ggufs["llama"], quant="gguf", device="cpu", dtype="float32", max_seq_len=32,
                      tokenizer_path=sp_model)
    assert isinstance(llm.model.output, bnb.nn.Linear8bitLt)
    assert isinstance(llm.model.layers[0].attention.wq, Int4PackLinear)


# --- The real SmolLM2-135M-Instruct.Q4_1 --------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_q4_weights(smollm2_gguf) -> list:
    weights = list(GGUFCheckpoint(smollm2_gguf).q4_linear_weights())
    assert len(weights) == 30 * 7 and {w.kind for w in weights} == {"Q4_1"}
    return weights


@pytest.mark.slow
def test_every_smollm2_block_weight_has_ggufs_values_in_the_kernels_terms(smollm2_q4_weights):
    """(q - 8) * scale + zero, one rounding as the kernel rounds it, is gguf's dequantized weight."""
    for w in smollm2_q4_weights:
        q, scale, zero = unpack_q4_blocks(w.blocks, w.kind)
        groups = w.shape[1] // 32
        kernel_terms = (q.view(w.shape[0], groups, 32).float() - 8) * scale[..., None] + zero[..., None]
        assert torch.equal(kernel_terms.view(w.shape), dequantized(w.blocks, w.kind)), w.name


@pytest.mark.slow
def test_smollm2_block_weights_through_the_kernel_equal_ggufs_bit_for_bit(smollm2_q4_weights):
    """The first and the last block's seven weights, through the kernel (see the module docstring)."""
    for w in smollm2_q4_weights[:7] + smollm2_q4_weights[-7:]:
        layer = int4pack_linear(w.blocks, w.kind, "cpu", torch.float32)
        assert torch.equal(int4pack_weight(layer), dequantized(w.blocks, w.kind)), w.name


@pytest.fixture(scope="module")
def smollm2_native(smollm2_gguf) -> Llama:
    """Mode gguf with the head float32, as transformers holds it."""
    return Llama.build(smollm2_gguf, quant="gguf", quantize_head=False, device="cpu", dtype="float32",
                       max_seq_len=64)


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_transformers(smollm2_native, smollm2_reference):
    prompt = smollm2_native.tokenizer.encode("The capital of France is", bos=False, eos=False)
    got = smollm2_native.generate([prompt], max_gen_len=GREEDY_STEPS, temperature=0.0, stop_ids=[])[0]
    with torch.inference_mode():
        ours = smollm2_native.model(torch.tensor([prompt]), 0)
        ref = smollm2_reference(torch.tensor([prompt])).logits
        expected = smollm2_reference.generate(torch.tensor([prompt]), max_new_tokens=GREEDY_STEPS, do_sample=False)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert got == expected[0, len(prompt):].tolist()


@pytest.mark.slow
def test_smollm2_weight_bytes_match_the_expected_footprint(smollm2_gguf):
    cfg = parse_quant_mode("gguf", quantize_head=None)
    llm = Llama.build(smollm2_gguf, quant="gguf", device="cpu", dtype="float32", max_seq_len=16)
    expected = expected_weight_bytes(empty_model(llm.model.args), cfg, torch.device("cpu"), torch.float32)
    assert weight_bytes(llm.model) == expected


# --- Errors ----------------------------------------------------------------------------------------

def test_gguf_mode_refuses_a_checkpoint_that_is_not_gguf(tmp_path, sp_model):
    folder = write_hf_folder(tiny_hf_model(), tmp_path / "hf", tokenizer=sp_model)
    with pytest.raises(ValueError, match=r"quant='gguf' .* is a hf checkpoint: pass a \.gguf file"):
        Llama.build(folder, quant="gguf", device="cpu", max_seq_len=16)


def test_gguf_mode_keeps_ggmls_block_size_and_quantizes_nothing():
    assert parse_quant_mode("gguf").blocksize == 32
    with pytest.raises(ValueError, match="keeps ggml's 32-weight blocks, got 64"):
        parse_quant_mode("gguf", blocksize=64)
    with pytest.raises(ValueError, match="cannot be pre-baked or exported"):
        quantize_weight(torch.randn(32, 32), parse_quant_mode("gguf"))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", Q4_KINDS)
def test_cuda_layer_computes_with_ggufs_weights_in_bfloat16(kind):
    """CUDA's kernel takes bfloat16 scales only: the weights are gguf's rounded to bfloat16 (8 bits)."""
    blocks = ggml_blocks(random_weight(256, 512), kind)
    layer = int4pack_linear(blocks, kind, "cuda", torch.float32)
    assert layer.scales_and_zeros.dtype == torch.bfloat16 and layer.weight.device.type == "cuda"
    reference = dequantized(blocks, kind)
    weights = int4pack_weight(layer).float().cpu()
    assert (weights - reference).abs().max() <= 2 ** -7 * reference.abs().max()
    x = torch.randn(3, 5, 512, device="cuda")
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 256)
    torch.testing.assert_close(out.cpu(), x.cpu() @ reference.T, rtol=0.02, atol=0.02 * out.abs().max().item())
