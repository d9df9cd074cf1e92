"""The int8 KV cache (--kv_cache int8): keys and values quantized as written, one scale per position and
key/value head, dequantized inside attention a chunk at a time. Against the model's-dtype cache (logits,
greedy tokens), against a float64 reference over the dequantized keys (chunks and tiles merged), its
bytes per token, the sliding window, the engine's rows, and the flag."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from conftest import tiny_hf_model, write_hf_folder
from llama_int8 import Llama, cli, model as model_module
from llama_int8.engine import Engine
from llama_int8.model import (KV_CACHES, Int8KV, Int8KVCache, KVCache, RollingKVCache, attend, attend_rows,
                              kv_cache_bytes, quantize_int8)
from test_engine import ARRIVAL_STEPS, greedy_requests, run_alone, run_staggered, tokens_of
from test_long_context import BLOCKS, flash_available, reference_attention

WINDOW = 8
PROMPT_LEN = 40  # five windows
# The largest change the int8 cache makes to a logit, relative to the largest logit: measured 0.31% to 0.51%
# on six tiny random models (float32, these shapes, 40 tokens); the bound leaves twice that.
LOGITS_BOUND = 1e-2


def random_tokens(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def build(folder, **kwargs) -> Llama:
    settings = dict(quant="none", dtype="float32", device="cpu", max_seq_len=128, kv_cache="int8")
    return Llama.build(folder, **{**settings, **kwargs})


def largest_relative_change(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, sp_model):
    return write_hf_folder(tiny_hf_model(seed=6, num_key_value_heads=2), tmp_path_factory.mktemp("llama"),
                           tokenizer=sp_model)


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory, sp_model):
    """A tiny random Mistral with an 8-token sliding window: the int8 codes and scales in rings."""
    mistral = tiny_hf_model(seed=5, model_type="mistral", sliding_window=WINDOW, num_key_value_heads=2)
    return write_hf_folder(mistral, tmp_path_factory.mktemp("mistral"), tokenizer=sp_model)


@pytest.fixture
def small_chunks(monkeypatch):
    """Dequantize 4 positions at a time, so that a few dozen tokens cross many chunks and query tiles."""
    monkeypatch.setattr(model_module, "KV_CHUNK", 4)


# --- The quantizer and the attention over its codes ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_int8_round_trip(dtype):
    """Each element within half a step (absmax / 127 / 2) of itself, the step being the scale as stored
    in dtype (rounded by up to eps / 2); zeros stay zeros."""
    x = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(0)).to(dtype) * 10
    x[0, 0, 0] = 0
    codes, scales = quantize_int8(x, dtype)
    assert codes.dtype == torch.int8 and scales.dtype == dtype and scales.shape == (2, 3, 5, 1)
    error = (Int8KV(codes, scales).dequantize(torch.float32) - x.float()).abs()
    half_step = x.float().abs().amax(-1, keepdim=True) / 127 / 2 * (1 + torch.finfo(dtype).eps)
    assert (error <= half_step + 1e-6).all()
    assert (error[0, 0, 0] == 0).all()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("layout", ["full", "rolling"])
@pytest.mark.parametrize("window", [None, 5])
def test_int8_cache_and_chunked_attention_against_reference(backend, layout, window, small_chunks):
    """Blocks of 1 to 12 tokens through an int8 cache, attended 4 positions at a time: the same as
    attending the dequantized keys and values all at once, in float64."""
    if layout == "rolling" and window is None:
        pytest.skip("a rolling cache needs a window")
    b, h, kv_h, d, T = 2, 4, 2, 8, sum(BLOCKS)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, T, h, d, generator=gen), torch.randn(b, kv_h, T, d, generator=gen),
               torch.randn(b, kv_h, T, d, generator=gen))
    cache = (Int8KVCache(RollingKVCache, b, kv_h, window, d, torch.float32, "cpu") if layout == "rolling"
             else Int8KVCache(KVCache, b, kv_h, T, d, torch.float32, "cpu"))
    outs, pos = [], 0
    for s in BLOCKS:
        keys, values = cache.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], pos)
        assert isinstance(keys, Int8KV)
        outs.append(attend(q[:, pos:pos + s], keys, values, window, backend))
        pos += s
    dequantized = [Int8KV(*quantize_int8(x, torch.float32)).dequantize(torch.float32) for x in (k, v)]
    torch.testing.assert_close(torch.cat(outs, 1).double(), reference_attention(q, *dequantized, window),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 1024])
def test_rows_attended_in_chunks_equal_each_row_alone(chunk, monkeypatch):
    """attend_rows over int8 keys: one query per row over its own prefix, chunked or not."""
    monkeypatch.setattr(model_module, "KV_CHUNK", chunk)
    g = torch.Generator().manual_seed(5)
    b, h, kv_h, t, d = 4, 6, 2, 11, 16
    q = torch.randn(b, 1, h, d, generator=g)
    k, v = (Int8KV(*quantize_int8(torch.randn(b, kv_h, t, d, generator=g), torch.float32)) for _ in range(2))
    lengths = [1, 11, 4, 7]
    visible = torch.arange(t) < torch.tensor(lengths)[:, None]
    together = attend_rows(q, k, v, visible, "sdpa")
    for i, n in enumerate(lengths):
        alone = attend(q[i:i + 1], k.dequantize(torch.float32)[i:i + 1, :, :n],
                       v.dequantize(torch.float32)[i:i + 1, :, :n], None, "math")
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-6)


# --- The model with an int8 cache -----------------------------------------------------------------------

def test_logits_and_greedy_tokens_close_to_the_float_cache(llama_folder):
    """Logits of a prefill and of a decode step within LOGITS_BOUND of the float cache's, and the same
    48 greedy tokens (on this model and prompt)."""
    tokens = random_tokens(2, PROMPT_LEN)
    float_cache = build(llama_folder, max_batch_size=2, kv_cache="model")
    int8_cache = build(llama_folder, max_batch_size=2)
    assert all(isinstance(layer.attention.cache, Int8KVCache) for layer in int8_cache.model.layers)
    expected, ours = float_cache.model(tokens, 0), int8_cache.model(tokens, 0)
    change = largest_relative_change(ours, expected)
    assert 0 < change < LOGITS_BOUND  # quantized, and close
    step = random_tokens(2, 1, seed=2)
    assert largest_relative_change(int8_cache.model(step, PROMPT_LEN), float_cache.model(step, PROMPT_LEN)) \
        < LOGITS_BOUND
    prompt = random_tokens(1, 9, seed=3)[0].tolist()
    greedy = [llm.generate([prompt], max_gen_len=48, temperature=0, stop_ids=())[0]
              for llm in (float_cache, int8_cache)]
    assert greedy[0] == greedy[1]


def test_chunked_dequantization_equals_one_chunk(llama_folder, monkeypatch):
    """The model through chunks and query tiles of 4 positions (prefill blocks of 6 after a longer past,
    then a decode step) gives the logits of one chunk."""
    tokens = random_tokens(2, PROMPT_LEN, seed=4)
    step = random_tokens(2, 1, seed=5)
    whole = build(llama_folder, max_batch_size=2)
    expected = [whole.model(tokens, 0), whole.model(step, PROMPT_LEN)]
    monkeypatch.setattr(model_module, "KV_CHUNK", 4)
    spans = []  # the spans of each merge
    merge = model_module.attend_in_chunks
    monkeypatch.setattr(model_module, "attend_in_chunks",
                        lambda q, k, v, s, mask: spans.append(s) or merge(q, k, v, s, mask))
    chunked = build(llama_folder, max_batch_size=2, prefill_chunk=6)
    torch.testing.assert_close(chunked.model(tokens, 0), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.model(step, PROMPT_LEN), expected[1], rtol=1e-5, atol=1e-5)
    assert max(len(s) for s in spans) == 11 and all(end - start <= 4 for s in spans for start, end in s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bytes_per_token_are_half_a_16_bit_cache_plus_the_scales(dtype, llama_folder):
    """Measured from the cache's tensors: one byte per key and value element, and one scale of the model's
    dtype per position, key/value head, layer, for keys and values; half of bfloat16's bytes plus the scales."""
    name = str(dtype).removeprefix("torch.")
    llms = {kind: build(llama_folder, dtype=name, max_batch_size=3, max_seq_len=64, kv_cache=kind)
            for kind in KV_CACHES}
    per_token = {kind: llm.model.cache_bytes() / (3 * 64) for kind, llm in llms.items()}
    args = llms["int8"].model.args
    scales = 2 * args.n_layers * args.n_kv_heads * dtype.itemsize
    assert per_token["int8"] == per_token["model"] / dtype.itemsize + scales
    if dtype == torch.bfloat16:
        assert per_token["int8"] == per_token["model"] / 2 + scales
    for kind, llm in llms.items():
        assert llm.model.cache_bytes() == kv_cache_bytes(args, 3, 64, dtype, kv_cache=kind)


def test_the_load_log_names_the_cache(llama_folder, caplog):
    with caplog.at_level(logging.INFO, logger="llama_int8"):
        build(llama_folder)
        build(llama_folder, kv_cache="model")
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Loaded")]
    assert "KV cache 0 MiB (int8, 1 x 128 tokens)" in loaded[0]
    assert "(float32, 1 x 128 tokens)" in loaded[1]


# --- Sliding window -------------------------------------------------------------------------------------

def test_sliding_window_with_an_int8_cache(mistral_folder):
    """The window's ring holds codes and scales; logits close to the float cache's several windows long,
    greedy tokens the same far past the window, and chunked prefill equal to one shot."""
    tokens = random_tokens(2, PROMPT_LEN, seed=6)
    float_cache = build(mistral_folder, max_batch_size=2, kv_cache="model")
    int8_cache = build(mistral_folder, max_batch_size=2)
    cache = int8_cache.model.layers[0].attention.cache
    assert isinstance(cache.codes, RollingKVCache) and cache.codes.k.shape[2] == WINDOW
    assert largest_relative_change(int8_cache.model(tokens, 0), float_cache.model(tokens, 0)) < LOGITS_BOUND
    prompt = random_tokens(1, 3 * WINDOW, seed=7)[0].tolist()
    greedy = [llm.generate([prompt], max_gen_len=48, temperature=0, stop_ids=())[0]
              for llm in (float_cache, int8_cache)]
    assert greedy[0] == greedy[1]
    chunked = build(mistral_folder, max_batch_size=2, prefill_chunk=5)
    one_shot = build(mistral_folder, max_batch_size=2)
    one_shot.model.prefill_chunk = None
    torch.testing.assert_close(chunked.model(tokens, 0), one_shot.model(tokens, 0), rtol=1e-5, atol=1e-5)


# --- The engine's rows ----------------------------------------------------------------------------------

@pytest.mark.parametrize("quant", ["none", "int8"])
@pytest.mark.parametrize("model", ["llama", "mistral-window"])
def test_eight_staggered_requests_each_equal_to_itself_alone(model, quant, llama_folder, mistral_folder):
    """Each position is quantized alone: a float32 model stays batch-invariant with an int8 cache (tokens
    and log-probabilities bit for bit), and a quantized one's rows decoded together (DecodeRows,
    update_rows) give each request its own greedy tokens."""
    folder = llama_folder if model == "llama" else mistral_folder
    llm = build(folder, quant=quant, max_seq_len=96, max_batch_size=8, prefill_chunk=8 if model == "llama" else None)
    assert llm.model.batch_invariant == (quant == "none")
    requests = greedy_requests(logprobs=2)
    together = run_staggered(Engine(llm.model, llm.tokenizer), requests, ARRIVAL_STEPS)
    for request, outs in zip(requests, together):
        alone = run_alone(llm, request)
        assert tokens_of(outs) == tokens_of(alone)
        if llm.model.batch_invariant:
            assert [lp for o in outs for lp in o.logprobs] == [lp for o in alone for lp in o.logprobs]


# --- The flag -------------------------------------------------------------------------------------------

def test_a_bad_kv_cache_is_refused_naming_it(llama_folder):
    with pytest.raises(ValueError, match=r"kv_cache='int4' is not one of \('model', 'int8'\)"):
        build(llama_folder, kv_cache="int4")
    llm = build(llama_folder)
    with pytest.raises(ValueError, match="kv_cache='int4'"):
        llm.model.setup_caches(1, 16, torch.float32, "cpu", kv_cache="int4")
    parser = argparse.ArgumentParser(exit_on_error=False)
    cli.add_runtime_flags(parser)
    with pytest.raises(argparse.ArgumentError, match="--kv_cache.*'int4'"):
        parser.parse_args(["--kv_cache", "int4"])


def test_the_flag_reaches_build():
    """cli.py repeats the model's names, to check a flag without torch: they must not drift."""
    assert cli.KV_CACHES == KV_CACHES
    parser = argparse.ArgumentParser()
    cli.add_checkpoint_flags(parser)
    cli.add_runtime_flags(parser)
    assert cli.build_kwargs(parser.parse_args(["--ckpt_dir", ".", "--kv_cache", "int8"]))["kv_cache"] == "int8"


# --- flash-attn (CUDA only) -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs flash_attn and an Ampere or newer CUDA GPU")
@pytest.mark.parametrize("chunk", [4, 1024])
def test_flash_with_an_int8_cache_matches_sdpa(chunk, mistral_folder, monkeypatch):
    """flash-attn attends the dequantized keys of one chunk; beyond a chunk the merge runs (plain torch)."""
    monkeypatch.setattr(model_module, "KV_CHUNK", chunk)
    tokens = random_tokens(1, PROMPT_LEN, seed=9).cuda()
    runs = {}
    for backend in ("flash", "sdpa"):
        llm = build(mistral_folder, attention=backend, device="cuda", dtype="bfloat16", prefill_chunk=5)
        runs[backend] = torch.cat([llm.model(tokens[:, :20], 0),
                                   *(llm.model(tokens[:, i:i + 1], i) for i in range(20, 40))], 1)
    scale = runs["sdpa"].abs().max().item()  # bfloat16 on both sides: a loose bound
    torch.testing.assert_close(runs["flash"], runs["sdpa"], rtol=5e-2, atol=5e-2 * scale)
