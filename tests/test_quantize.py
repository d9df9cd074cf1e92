"""Host quantization: mode parsing, chunked quantization against bitsandbytes' own, quantized layers
against dense ones, memory accounting, greedy output of real weights, and peak host memory of a load.

Error bounds below were measured on this code (2-core AVX512-BF16 host, bitsandbytes 0.50.2, random
N(0, 0.02) weights, N(0, 1) inputs, 5 seeds x 3 LLaMA-like shapes): relative error of a layer's
output against the float32 nn.Linear was int8 0.0086-0.0122, nf4 0.091-0.094, nf4-dq (blocksize 32)
0.086-0.091, fp4 0.120-0.126, fp4-dq (blocksize 32) 0.111-0.118, the same in float32 and bfloat16.
The bounds leave ~15% headroom; a lower bound checks that something was quantized at all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F

from llama_int8 import Llama, quantize, quantized_layers
from llama_int8.formats import NamedTensor
from llama_int8.loader import fill_model
from llama_int8.memory import weight_bytes
from llama_int8.model import Linear, ModelArgs, empty_model
from llama_int8.quantize import (QUANT_MODES, QuantConfig, expected_quantized_tensors, parse_quant_mode,
                                 quantize_weight, quantized_layer_names, quantized_weight_bytes)
from llama_int8.quantized_layers import make_linear_hook, quantize_linear_on_host, quantized_linear

FOUR_BIT_MODES = ("nf4", "nf4-dq", "fp4", "fp4-dq")
QUANTIZED_MODES = ("int8", *FOUR_BIT_MODES)
# (lower, upper) bounds on ||layer(x) - linear(x)|| / ||linear(x)||, from the measurements above.
ERROR_BOUNDS = {"int8": (0.004, 0.015), "nf4": (0.05, 0.11), "nf4-dq": (0.05, 0.105),
                "fp4": (0.07, 0.145), "fp4-dq": (0.07, 0.135)}
# LLaMA-like shapes the CPU 4-bit kernel accepts (out % 32 == 0, in % 64 == 0): q/k/v/o, gate/up, down.
LAYER_SHAPES = ((256, 128), (384, 128), (128, 384))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads made these small ops up
    to 100x slower (spinning at barriers while the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


# --- Parsing modes -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,kind,double_quant,blocksize", [
    ("int8", "int8", False, 64), ("nf4", "nf4", False, 64), ("nf4-dq", "nf4", True, 32),
    ("fp4", "fp4", False, 64), ("fp4-dq", "fp4", True, 32), ("none", "none", False, 64),
])
def test_parse_quant_mode_accepts_every_mode_and_litgpt_names(mode, kind, double_quant, blocksize):
    for spelling in (mode, f"bnb.{mode}"):
        cfg = parse_quant_mode(spelling)
        assert (cfg.mode, cfg.double_quant, cfg.blocksize) == (kind, double_quant, blocksize)
        assert cfg.name == mode
        assert cfg.enabled == (mode != "none")
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad", ["int4", "NF4", "bnb.int4", "nf4-dq-dq", "", "bnb."])
def test_parse_quant_mode_rejects_unknown_modes_listing_the_choices(bad):
    with pytest.raises(ValueError) as info:
        parse_quant_mode(bad)
    message = str(info.value)
    assert repr(bad) in message
    for choice in QUANT_MODES:
        assert choice in message


def test_parse_quant_mode_checks_its_settings():
    assert parse_quant_mode("nf4", blocksize=128).blocksize == 128
    assert parse_quant_mode("int8", int8_threshold=0).int8_threshold == 0.0
    with pytest.raises(ValueError, match="blocksize 100"):
        parse_quant_mode("nf4", blocksize=100)
    with pytest.raises(ValueError, match="int8_threshold"):
        parse_quant_mode("int8", int8_threshold=-1)
    with pytest.raises(ValueError, match="double quantization"):
        QuantConfig.from_dict({"mode": "int8", "double_quant": True})


# --- Chunked host quantization equals bitsandbytes' own, bit for bit ----------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of ~1000 elements, so that small weights are cut into many chunks, at odd row counts."""
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 1000)


@pytest.mark.parametrize("shape", [(256, 128), (128, 96), (100, 200)])
@pytest.mark.parametrize("mode", FOUR_BIT_MODES)
def test_chunked_4bit_equals_bitsandbytes_on_the_whole_tensor(small_chunks, shape, mode):
    cfg = parse_quant_mode(mode)
    assert quantize.chunk_rows(*shape, cfg.blocksize) < shape[0]  # really chunked
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = (torch.randn(shape) * 0.02).to(dtype)
        ours = quantize_weight(w, cfg)
        packed, state = bnbf.quantize_4bit(w, blocksize=cfg.blocksize, compress_statistics=cfg.double_quant,
                                           quant_type=cfg.mode)
        theirs = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        assert set(ours) == set(theirs)
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), f"{mode} {dtype} {shape}: {key} differs"


@pytest.mark.parametrize("shape", [(256, 128), (100, 200)])
def test_chunked_int8_equals_bitsandbytes_vectorwise_quant(small_chunks, shape):
    cfg = parse_quant_mode("int8")
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    w[3, 5] = 0.9  # an outlier weight: its row's scale must be its own
    # bitsandbytes quantizes 16-bit weights through float16 (Int8Params casts to it first); bf16 and
    # fp16 values are exact in float32, so ours, computed in float32, must agree bit for bit.
    for dtype in (torch.float16, torch.bfloat16):
        source = w.to(dtype)
        ours = quantize_weight(source, cfg)
        cb, scb, _ = bnbf.int8_vectorwise_quant(source.to(torch.float16))
        assert torch.equal(ours["weight"], cb), dtype
        assert torch.equal(ours["SCB"], scb), dtype
    # A float32 source keeps its precision: the same formula as bitsandbytes', applied in float32.
    ours = quantize_weight(w, cfg)
    cb, scb, _ = bnbf.int8_vectorwise_quant(w.clone())
    assert torch.equal(ours["weight"], cb) and torch.equal(ours["SCB"], scb)


def test_quantization_does_not_modify_the_source():
    w = torch.randn(128, 64, dtype=torch.bfloat16)
    before = w.clone()
    for mode in QUANTIZED_MODES:
        quantize_weight(w, parse_quant_mode(mode))
    assert torch.equal(w, before)


@pytest.mark.parametrize("mode", QUANTIZED_MODES)
def test_expected_quantized_tensors_describes_quantize_weight(mode):
    cfg = parse_quant_mode(mode)
    out = quantize_weight(torch.randn(384, 128), cfg)
    want = expected_quantized_tensors(384, 128, cfg)
    assert set(out) == set(want)
    for key, (shape, dtype) in want.items():
        assert out[key].dtype == dtype, key
        if shape is not None:
            assert tuple(out[key].shape) == shape, key
    measured = sum(t.numel() * t.element_size() for key, t in out.items() if want[key][0] is not None)
    assert measured == quantized_weight_bytes(384, 128, cfg)


def test_quantize_weight_rejects_what_is_not_a_host_float_matrix():
    cfg = parse_quant_mode("int8")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(8), cfg)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_weight(torch.ones(8, 8, dtype=torch.int32), cfg)
    with pytest.raises(ValueError, match="host"):
        quantize_weight(torch.empty(8, 8, device="meta"), cfg)
    with pytest.raises(ValueError, match="does not quantize"):
        quantize_weight(torch.randn(8, 8), parse_quant_mode("none"))


# --- Quantized layers against dense ones ---------------------------------------------------------

@pytest.mark.parametrize("mode", QUANTIZED_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_layer_is_close_to_dense(mode, dtype):
    cfg = parse_quant_mode(mode)
    low, high = ERROR_BOUNDS[mode]
    for seed, (n, k) in enumerate(LAYER_SHAPES):
        torch.manual_seed(seed)
        w = torch.randn(n, k) * 0.02
        x = torch.randn(2, 5, k)
        layer = quantize_linear_on_host(w, cfg, "cpu", dtype)
        assert not layer.training
        with torch.inference_mode():
            y = layer(x.to(dtype))
        assert y.shape == (2, 5, n) and y.dtype == dtype
        err = relative_error(y, F.linear(x, w))
        assert low < err < high, f"{mode} {dtype} {n}x{k}: relative error {err:.4f} not in ({low}, {high})"


@pytest.mark.parametrize("mode", FOUR_BIT_MODES)
def test_4bit_layer_computes_with_the_dequantized_weight(mode):
    """The layer uses exactly the weights bitsandbytes dequantizes from our tensors (up to bf16 rounding
    in the CPU kernel: measured 0.28-0.31%)."""
    cfg = parse_quant_mode(mode)
    torch.manual_seed(0)
    w, x = torch.randn(256, 128) * 0.02, torch.randn(4, 128)
    tensors = quantize_weight(w, cfg)
    state = bnbf.QuantState.from_dict({k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"},
                                      device="cpu")
    dequantized = bnbf.dequantize_4bit(tensors["weight"], state).float()
    layer = quantized_linear(tensors, 128, 256, cfg, "cpu", torch.float32)
    with torch.inference_mode():
        assert relative_error(layer(x), F.linear(x, dequantized)) < 0.006


def test_double_quantized_blocksize_32_is_more_accurate_than_nf4():
    """The documented choice behind the -dq modes' default blocksize: fewer bits and less error."""
    for seed, (n, k) in enumerate(LAYER_SHAPES):
        torch.manual_seed(seed)
        w, x = torch.randn(n, k) * 0.02, torch.randn(8, k)
        ref = F.linear(x, w)
        with torch.inference_mode():
            errors = {m: relative_error(quantize_linear_on_host(w, parse_quant_mode(m), "cpu", torch.float32)(x), ref)
                      for m in ("nf4", "nf4-dq")}
        assert errors["nf4-dq"] < errors["nf4"], errors
    assert quantized_weight_bytes(4096, 4096, parse_quant_mode("nf4-dq")) < quantized_weight_bytes(
        4096, 4096, parse_quant_mode("nf4"))


def test_int8_threshold_keeps_outlier_features_in_16_bit():
    """LLM.int8(): with a planted outlier feature, threshold 6 is far more accurate than threshold 0."""
    torch.manual_seed(0)
    w, x = torch.randn(256, 128) * 0.02, torch.randn(16, 128)
    x[:, 7] = 40.0
    ref = F.linear(x, w)
    errors = {}
    for threshold in (0.0, 6.0):
        layer = quantize_linear_on_host(w, parse_quant_mode("int8", int8_threshold=threshold), "cpu", torch.float32)
        with torch.inference_mode():
            errors[threshold] = relative_error(layer(x), ref)
    assert errors[6.0] < 0.02 < errors[0.0], errors


# --- The loader hook and memory accounting -------------------------------------------------------

TINY_ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=384)


def random_tensors(args: ModelArgs, dtype: torch.dtype = torch.bfloat16):
    torch.manual_seed(0)
    for name, p in empty_model(args).named_parameters():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        yield NamedTensor(name, (torch.randn(p.shape) * 0.02).to(dtype), "random")


def quantized_tiny_model(cfg: QuantConfig, dtype: torch.dtype = torch.bfloat16):
    """TINY_ARGS filled with random weights of dtype on the CPU, its block linears quantized by cfg."""
    model = empty_model(TINY_ARGS)
    fill_model(model, random_tensors(TINY_ARGS, dtype), torch.device("cpu"), dtype,
               make_linear_hook(cfg, "cpu", dtype))
    return model


@pytest.mark.parametrize("mode, threshold", [("int8", 6.0), ("int8", 0.0), ("nf4", 0.0), ("fp4", 0.0),
                                             ("nf4-dq", 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7])
def test_cpu_fast_forward_equals_bitsandbytes_forward(mode, threshold, dtype, rows):
    """The lean eval forwards on the CPU compute bitsandbytes' numbers bit for bit, outliers included."""
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = quantized_layers.quantize_linear_on_host(w, parse_quant_mode(mode, threshold), "cpu", dtype)
    x = torch.randn(1, rows, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[..., 3] = 9.0  # an outlier feature, above LLM.int8()'s threshold
    bitsandbytes_forward = bnb.nn.Linear8bitLt.forward if mode == "int8" else bnb.nn.Linear4bit.forward
    with torch.inference_mode():
        assert torch.equal(layer(x), bitsandbytes_forward(layer, x))


@pytest.mark.parametrize("mode, threshold", [("int8", 6.0), ("int8", 0.05), ("nf4", 0.0), ("fp4", 0.0)])  # 0.05: outliers
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_products_compute_bitsandbytes_numbers(mode, threshold, batch, seq, dtype, monkeypatch):
    """fused_product gives each block one product for wq/wk/wv, one for w1/w3 and one for each other
    layer (int8: one matrix holding the members' rows, each layer's weight a view of it, no byte
    twice); the model's logits, prefill and decode, equal those of bitsandbytes' own forward in every
    layer, bit for bit, in a float32 model and in a bfloat16 one (q and k rotated inside the product
    there too)."""
    model = quantized_tiny_model(parse_quant_mode(mode, threshold), dtype)
    model.fuse_projections(quantized_layers.fused_product)
    model.setup_caches(batch, 16, dtype, "cpu")
    kind = quantized_layers.Int8Product if mode == "int8" else quantized_layers.Gemv4bitProduct
    for block in model.layers:
        attention, ffn = block.attention, block.feed_forward
        for product in (attention.qkv_product, attention.out_product, ffn.gate_up_product, ffn.down_product):
            assert isinstance(product, kind)
        if mode == "int8":
            for product, members in ((attention.qkv_product, (attention.wq, attention.wk, attention.wv)),
                                     (ffn.gate_up_product, (ffn.w1, ffn.w3))):
                assert torch.equal(product.cb, torch.cat([m.weight.data for m in members]))
                assert all(m.weight.data.untyped_storage().data_ptr() == product.cb.untyped_storage().data_ptr()
                           for m in members)
    tokens = torch.randint(0, TINY_ARGS.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(2))
    # Random weights this small leave attention near uniform, so the logits hardly see a rotation:
    # q, k and v are compared too, at positions where the rotation is far from the identity.
    x = torch.randn(batch, seq, TINY_ARGS.dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    rotation, attention = model.rope[7:7 + seq, None], model.layers[0].attention
    with torch.inference_mode():
        ours = [model(tokens, 0), model(tokens[:, :1], seq), *attention.fused_qkv(x, rotation)]
        model.fuse_projections(lambda layers: None)  # the layers themselves, through bitsandbytes' forwards
        monkeypatch.setattr(quantized_layers.DeviceBoundLinear8bitLt, "forward", bnb.nn.Linear8bitLt.forward)
        monkeypatch.setattr(quantized_layers.DeviceBoundLinear4bit, "forward", bnb.nn.Linear4bit.forward)
        reference = [model(tokens, 0), model(tokens[:, :1], seq), *attention.separate_qkv(x, rotation)]
    for got, want in zip(ours, reference):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", QUANTIZED_MODES)
def test_hook_quantizes_every_block_linear_and_keeps_the_head_16_bit(mode):
    cfg = parse_quant_mode(mode)
    model = quantized_tiny_model(cfg)
    quantized = set(quantized_layer_names(TINY_ARGS.n_layers, quantize_head=False))
    for name, module in model.named_modules():
        if name in quantized:
            assert isinstance(module, bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit), name
    assert type(model.output) is Linear and model.output.weight.dtype == torch.bfloat16
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert make_linear_hook(parse_quant_mode("none"), "cpu", torch.float32) is None


def sixteen_bit_bytes(args: ModelArgs, dtype: torch.dtype, quantize_head: bool = False) -> int:
    model = empty_model(args)
    quantized = {f"{n}.weight" for n in quantized_layer_names(args.n_layers, quantize_head)}
    return sum(p.numel() * dtype.itemsize for name, p in model.named_parameters() if name not in quantized)


def expected_weight_bytes(args: ModelArgs, cfg: QuantConfig, dtype: torch.dtype) -> int:
    """Blocks in cfg's mode, an (untied) quantized head in int8, the rest in dtype."""
    model = empty_model(args)
    head = QuantConfig(mode="int8")
    quantized = sum(quantized_weight_bytes(model.get_submodule(n).out_features, model.get_submodule(n).in_features,
                                           head if n == "output" else cfg)
                    for n in quantized_layer_names(args.n_layers, cfg.quantize_head))
    return quantized + sixteen_bit_bytes(args, dtype, cfg.quantize_head)


@pytest.mark.parametrize("mode", QUANTIZED_MODES)
def test_weight_bytes_of_a_quantized_model_match_the_expected_footprint(mode):
    cfg = parse_quant_mode(mode)
    model = quantized_tiny_model(cfg)
    model.setup_caches(1, 16, torch.bfloat16, "cpu")
    measured, expected = weight_bytes(model), expected_weight_bytes(TINY_ARGS, cfg, torch.bfloat16)
    if mode == "int8":
        assert measured == expected  # int8 bytes + one float32 scale per row, nothing else
    else:
        # On an AVX512-BF16 host the first CPU forward repacks 4-bit layers: block scales become bf16
        # (double-quantized ones are expanded), so the bytes move by a few percent either way.
        assert abs(measured - expected) < 0.05 * expected, (measured, expected)
    dense = sixteen_bit_bytes(TINY_ARGS, torch.bfloat16) + sum(
        p.numel() * 2 for n in quantized_layer_names(TINY_ARGS.n_layers, False)
        for p in empty_model(TINY_ARGS).get_submodule(n).parameters())
    assert measured < dense


# --- Real weights: greedy int8 against float32 ---------------------------------------------------

# Measured on SmolLM2-135M-Instruct (float32 export of the Q4_1 GGUF), batch 1, threshold 6, 12 greedy
# tokens: int8 equals float32 for the first 9 tokens of "The capital of France is" and "Water boils at a
# temperature of", 11 of "The largest planet in the solar system is", all 12 of "def fibonacci(n):".
# It parts earlier where float32 itself hesitates: "Once upon a time, there was a" at token 3 (float32's
# top two logits 0.28 apart), "The three primary colors are" at token 4 (0.04), "My favourite food is"
# at token 5 (0.67). Across prompts int8's logits differ from float32's by 15-30% (relative L2, as
# transformers + bitsandbytes' int8 does on the same weights: 17-41%).
GREEDY_PROMPTS = ("The capital of France is", "Water boils at a temperature of",
                  "The largest planet in the solar system is", "def fibonacci(n):")
GREEDY_TOKENS = 8


@pytest.fixture(scope="module")
def smollm2_float32_and_int8(smollm2_hf):
    """float32, and int8 blocks with the float32 head (the quantized head is tested on its own below)."""
    from llama_int8 import Llama

    return tuple(Llama.build(smollm2_hf, quant=q, device="cpu", dtype=torch.float32, max_seq_len=128,
                             quantize_head=False)
                 for q in ("none", "int8"))


def test_int8_greedy_tokens_equal_float32_on_smollm2(smollm2_float32_and_int8):
    reference, int8 = smollm2_float32_and_int8
    for prompt in GREEDY_PROMPTS:
        tokens = reference.tokenizer.encode(prompt, bos=True, eos=False)
        want = reference.generate([tokens], max_gen_len=GREEDY_TOKENS, temperature=0.0, stop_ids=[])[0]
        got = int8.generate([tokens], max_gen_len=GREEDY_TOKENS, temperature=0.0, stop_ids=[])[0]
        assert len(want) == GREEDY_TOKENS
        assert got == want, f"{prompt!r}: int8 {reference.tokenizer.decode(got)!r} vs {reference.tokenizer.decode(want)!r}"


# Texts read with teacher forcing: int8 must pick float32's next token wherever float32's top two
# logits are at least 1.0 apart (measured: disagreements only at margins 0.02-0.67).
FORCED_TEXTS = ("The three primary colors are red, yellow and blue. Mixing them gives every other colour.",
                "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)")
DECIDED_MARGIN = 1.0


def test_int8_argmax_agrees_with_float32_wherever_float32_is_decided(smollm2_float32_and_int8):
    reference, int8 = smollm2_float32_and_int8
    for text in FORCED_TEXTS:
        ids = torch.tensor([reference.tokenizer.encode(text, bos=True, eos=False)])
        with torch.inference_mode():
            want, got = reference.model(ids, 0)[0], int8.model(ids, 0)[0]
        assert torch.isfinite(got).all()
        top2 = want.topk(2, dim=-1).values
        decided = top2[:, 0] - top2[:, 1] >= DECIDED_MARGIN
        assert decided.sum() > len(decided) // 4, "too few decided positions to test anything"
        agree = got.argmax(-1) == want.argmax(-1)
        assert agree[decided].all(), f"{text!r}: positions {(~agree & decided).nonzero().flatten().tolist()}"


# --- Peak host memory of a streaming load, measured in a child process ---------------------------

# 2 shards of random bf16 weights, ~340 MB: 8 layers of dim 1024 (103M quantizable weights) and a
# 32000-token embedding and head (65.5M) kept in bf16.
HOSTMEM_ARGS = ModelArgs(dim=1024, n_layers=8, n_heads=16, vocab_size=32000, hidden_dim=2816)
# Transient allowed beyond the quantized footprint: about two of the largest layers (a 5.5 MiB bf16
# source and its float32 chunks and int8 result). Measured: see the assertion message (peak RssAnon
# minus the RssAnon after imports minus the footprint): 1 MiB, sampled every 2 ms; 36-53 MiB when
# freed memory was left with the C library (memory.return_freed_host_memory). The source is ~320 MiB.
# The head, quantized at load too, is the largest layer: its bf16 source (62.5 MiB, merged from both
# shards) lives while its int8 rows are made; measured 68 MiB of transient with it.
HOSTMEM_TRANSIENT_BOUND = 24 * 1024**2 + HOSTMEM_ARGS.vocab_size * HOSTMEM_ARGS.dim * 2


@pytest.fixture(scope="module")
def synthetic_meta_checkpoint(tmp_path_factory) -> Path:
    from benchmarks.synthetic import write_meta_checkpoint, write_word_tokenizer

    folder = write_meta_checkpoint(tmp_path_factory.mktemp("hostmem") / "meta", HOSTMEM_ARGS, shards=2,
                                   dtype=torch.bfloat16)
    write_word_tokenizer(folder)
    return folder


def test_peak_host_memory_of_int8_load_is_footprint_plus_small_transient(synthetic_meta_checkpoint):
    from benchmarks.hostmem import run_sampled

    source_bytes = sum(f.stat().st_size for f in synthetic_meta_checkpoint.glob("consolidated.*.pth"))
    for f in synthetic_meta_checkpoint.glob("consolidated.*.pth"):
        f.read_bytes()  # into the page cache: the child's reads then cost no disk time
    child = run_sampled([sys.executable, "-m", "benchmarks.load", "--engine", "llama_int8", "--ckpt_dir",
                         str(synthetic_meta_checkpoint), "--quant", "int8", "--dtype", "bfloat16"],
                        cwd=Path(__file__).parent.parent, timeout_s=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = child.last_json()
    expected = expected_weight_bytes(HOSTMEM_ARGS, parse_quant_mode("int8", quantize_head=True), torch.bfloat16)
    assert result["footprint"] == expected
    transient = child.peak_rss_anon - result["rss_anon_before"] - result["footprint"]
    mib = 1024**2
    message = (f"peak RssAnon {child.peak_rss_anon / mib:.0f} MiB, after imports {result['rss_anon_before'] / mib:.0f}"
               f" MiB, footprint {result['footprint'] / mib:.0f} MiB, transient {transient / mib:.0f} MiB, "
               f"source {source_bytes / mib:.0f} MiB")
    assert transient < HOSTMEM_TRANSIENT_BOUND, message
    assert transient < 0.3 * source_bytes, message


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_bfloat16_quantized_model_stays_finite_on_real_weights(smollm2_hf, quant):
    """LLM.int8() casts activations to float16 inside a bfloat16 model: nothing may overflow to inf/NaN,
    and the answer to a plain question must survive."""
    from llama_int8 import Llama

    llm = Llama.build(smollm2_hf, quant=quant, device="cpu", dtype=torch.bfloat16, max_seq_len=256)
    text = " ".join(GREEDY_PROMPTS) * 6
    tokens = torch.tensor([llm.tokenizer.encode(text, bos=True, eos=False)[:200]])
    with torch.inference_mode():
        assert torch.isfinite(llm.model(tokens, 0)).all()
    answer = llm.text_completion(["The capital of France is"], temperature=0, max_gen_len=4)[0]["generation"]
    assert "Paris" in answer


@pytest.mark.parametrize("rows", [1, quantized_layers.WEIGHT_ONLY_MAX_ROWS])
def test_weight_only_int8_product_multiplies_bfloat16_activations_by_the_stored_weights(rows):
    """--int8_matmul weight_only: up to WEIGHT_ONLY_MAX_ROWS rows, the product is bfloat16 activations
    times the stored int8 weights scaled per row (no activation quantization, no outlier split):
    close to a float32 product with the dequantized weights, and closer than LLM.int8() itself."""
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = quantized_layers.quantize_linear_on_host(w, parse_quant_mode("int8"), "cpu", torch.float32)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1))
    x[:, 3] = 9.0  # an outlier feature: LLM.int8() splits it off, the weight-only product does not
    weight_only = quantized_layers.fused_product([layer], int8_matmul="weight_only")
    dequantized = layer.weight.data.float() * (layer.weight.SCB.unsqueeze(1) / 127)
    exact = x @ dequantized.t()
    bf16 = x.bfloat16().float() @ dequantized.t()  # what bfloat16 activations allow at best
    with torch.inference_mode():
        got = weight_only(x)
        llm_int8 = layer(x)
    assert got.dtype == torch.float32
    # Rounded once more to bfloat16's 8 bits than bf16: the product before its float32 row scale.
    assert ((got - bf16).abs() <= 2**-8 * bf16.abs() + 1e-4 * exact.abs().max()).all()
    assert (got - exact).abs().mean() < (llm_int8 - exact).abs().mean()


def test_weight_only_int8_takes_llm_int8_above_its_rows():
    """Beyond WEIGHT_ONLY_MAX_ROWS rows (a prefill, a large batch) the weight-only product is
    LLM.int8(), bit for bit what bitsandbytes computes."""
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = quantized_layers.quantize_linear_on_host(w, parse_quant_mode("int8"), "cpu", torch.float32)
    x = torch.randn(quantized_layers.WEIGHT_ONLY_MAX_ROWS + 1, 128, generator=torch.Generator().manual_seed(1))
    x[:, 3] = 9.0
    product = quantized_layers.fused_product([layer], int8_matmul="weight_only")
    with torch.inference_mode():
        assert torch.equal(product(x), bnb.nn.Linear8bitLt.forward(layer, x))


def test_int8_matmul_is_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match="int8_matmul: 'fast' is not one of llm.int8, weight_only"):
        Llama.build(tmp_path / "missing", int8_matmul="fast")
