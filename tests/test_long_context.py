"""Long context: sliding-window attention against transformers' MistralForCausalLM, the rolling KV cache
against a full-size one, chunked prefill against one-shot prefill, and the attention backends."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_logits_close, hf_greedy, tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.model import (KVCache, ModelArgs, RollingKVCache, Transformer, attend, attention_mask,
                              kv_cache_bytes)

WINDOW = 8
PROMPT_LEN = 40  # five windows
GREEDY_STEPS = 48


def random_tokens(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mistral():
    """A tiny random Mistral with an 8-token sliding window, and large enough positions to pass it."""
    return tiny_hf_model(seed=5, model_type="mistral", sliding_window=WINDOW, num_key_value_heads=2,
                         max_position_embeddings=256)


@pytest.fixture(scope="module")
def mistral_folder(mistral, tmp_path_factory, sp_model):
    return write_hf_folder(mistral, tmp_path_factory.mktemp("mistral"), tokenizer=sp_model)


def build(folder, **kwargs) -> Llama:
    settings = dict(quant="none", dtype="float32", device="cpu", max_seq_len=128)
    return Llama.build(folder, **{**settings, **kwargs})


def test_window_read_from_config(mistral_folder):
    assert json.loads((mistral_folder / "config.json").read_text())["sliding_window"] == WINDOW
    llm = build(mistral_folder)
    assert llm.model.args.sliding_window == WINDOW
    assert all(isinstance(layer.attention.cache, RollingKVCache) for layer in llm.model.layers)


def test_logits_match_mistral_over_several_windows(mistral, mistral_folder):
    tokens = random_tokens(2, PROMPT_LEN)
    with torch.no_grad():
        expected = mistral(tokens).logits
    llm = build(mistral_folder, max_batch_size=2)
    assert_logits_close(llm.model(tokens, 0), expected)
    # The window must matter here, or the test would not test it.
    full = build(mistral_folder, max_batch_size=2, sliding_window=PROMPT_LEN)
    assert not torch.allclose(full.model(tokens, 0), expected, atol=1e-3)


@pytest.mark.parametrize("prompt_len", [3, 3 * WINDOW])
def test_greedy_matches_mistral_far_past_the_window(prompt_len, mistral, mistral_folder):
    prompt = random_tokens(1, prompt_len, seed=2)[0].tolist()
    llm = build(mistral_folder)
    ours = llm.generate([prompt], max_gen_len=GREEDY_STEPS, temperature=0, stop_ids=())[0]
    assert ours == hf_greedy(mistral, prompt, GREEDY_STEPS)


def test_forced_window_matches_mistral(tmp_path, sp_model):
    """sliding_window= overrides the checkpoint's (here: none at all in a Llama checkpoint)."""
    llama = tiny_hf_model(seed=3, num_key_value_heads=2)
    reference = tiny_hf_model(seed=3, num_key_value_heads=2, model_type="mistral", sliding_window=6)
    reference.load_state_dict(llama.state_dict())
    folder = write_hf_folder(llama, tmp_path / "llama", tokenizer=sp_model)
    assert build(folder).model.args.sliding_window is None
    llm = build(folder, sliding_window=6)
    tokens = random_tokens(1, 30, seed=4)
    with torch.no_grad():
        assert_logits_close(llm.model(tokens, 0), reference(tokens).logits)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, sp_model):
    """A tiny random Llama: no window at all."""
    return write_hf_folder(tiny_hf_model(seed=6, num_key_value_heads=2), tmp_path_factory.mktemp("llama"),
                           tokenizer=sp_model)


@pytest.mark.parametrize("case", ["no-window", "chunk-below-window", "chunk-clamped-to-window"])
def test_chunked_prefill_equals_one_shot(case, mistral_folder, llama_folder):
    folder, chunk, window = {"no-window": (llama_folder, 7, None), "chunk-below-window": (mistral_folder, 5, WINDOW),
                             "chunk-clamped-to-window": (mistral_folder, 100, WINDOW)}[case]
    tokens = random_tokens(2, PROMPT_LEN, seed=6)
    chunked = build(folder, max_batch_size=2, prefill_chunk=chunk)
    one_shot = build(folder, max_batch_size=2)
    assert chunked.model.args.sliding_window == window
    assert chunked.model.prefill_chunk == (chunk if window is None else min(chunk, window))
    if window is not None:  # the one-shot reference runs the whole prompt as one block through the window
        one_shot.model.prefill_chunk = None
    expected = one_shot.model(tokens, 0)
    assert_logits_close(chunked.model(tokens, 0), expected)
    # last_only gives the last chunk's last position, and decoding goes on from the chunked cache.
    assert_logits_close(chunked.model(tokens, 0, last_only=True), expected[:, -1:])
    step = random_tokens(2, 1, seed=7)
    assert_logits_close(chunked.model(step, PROMPT_LEN), one_shot.model(step, PROMPT_LEN))


def test_cache_bytes_do_not_grow_with_max_seq_len(mistral_folder):
    windowed = [build(mistral_folder, max_seq_len=n).model for n in (64, 256)]
    plain = [build(mistral_folder, max_seq_len=n, sliding_window=10_000).model for n in (64, 256)]
    assert windowed[0].cache_bytes() == windowed[1].cache_bytes()
    assert plain[1].cache_bytes() == 4 * plain[0].cache_bytes()
    assert plain[0].cache_bytes() == 64 // WINDOW * windowed[0].cache_bytes()
    for model, n, window in ((windowed[1], 256, WINDOW), (plain[1], 256, None)):
        assert model.cache_bytes() == kv_cache_bytes(model.args, 1, n, torch.float32, window)


def test_batch_of_different_lengths_equals_one_by_one(mistral_folder):
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (3, 2 * WINDOW + 3, 4 * WINDOW)]
    llm = build(mistral_folder, max_batch_size=3)
    batched = llm.generate(prompts, max_gen_len=2 * WINDOW, temperature=0, stop_ids=())
    single = build(mistral_folder)
    alone = [single.generate([p], max_gen_len=2 * WINDOW, temperature=0, stop_ids=())[0] for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_backends_agree_with_mistral(backend, mistral, mistral_folder):
    tokens = random_tokens(1, PROMPT_LEN, seed=8)
    with torch.no_grad():
        expected = mistral(tokens).logits
    llm = build(mistral_folder, attention=backend, prefill_chunk=5)
    ours = torch.cat([llm.model(tokens[:, :20], 0), *(llm.model(tokens[:, i:i + 1], i) for i in range(20, 40))], 1)
    assert_logits_close(ours, expected)


# --- The caches and attend() on random tensors --------------------------------------------------------

def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Every position at once: q [b, T, h, d], k, v [b, kv_h, T, d], float64, mask from absolute positions."""
    T = q.shape[1]
    pos = torch.arange(T)
    visible = pos[None, :] <= pos[:, None]
    if window is not None:
        visible &= pos[None, :] > pos[:, None] - window
    groups = q.shape[2] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    scores = q.transpose(1, 2).double() @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(1, 2)


BLOCKS = [1, 1, 2, 1, 5, 1, 1, 8, 3, 1, 1, 1, 12, 1, 2, 1, 1]  # blocks shorter, equal and longer than the window


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("cache_kind", ["full", "rolling"])
@pytest.mark.parametrize("window", [None, 4])
def test_cache_and_attend_against_reference(backend, cache_kind, window):
    if cache_kind == "rolling" and window is None:
        pytest.skip("a rolling cache needs a window")
    b, h, kv_h, d, T = 2, 4, 2, 8, sum(BLOCKS)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, T, h, d, generator=gen)
    k = torch.randn(b, kv_h, T, d, generator=gen)
    v = torch.randn(b, kv_h, T, d, generator=gen)
    cache = (RollingKVCache(b, kv_h, window, d, torch.float32, "cpu") if cache_kind == "rolling"
             else KVCache(b, kv_h, T, d, torch.float32, "cpu"))
    outs, pos = [], 0
    for s in BLOCKS:
        keys, values = cache.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], pos)
        outs.append(attend(q[:, pos:pos + s], keys, values, window, backend))
        pos += s
    torch.testing.assert_close(torch.cat(outs, 1).double(), reference_attention(q, k, v, window),
                               rtol=1e-5, atol=1e-5)


def test_rolling_cache_size_is_the_window():
    cache = RollingKVCache(1, 2, 4, 8, torch.float32, "cpu")
    assert cache.k.shape == (1, 2, 4, 8)
    keys, _ = cache.update(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), 0)
    assert keys.shape[2] == 10  # the block sees itself whole; the ring kept its last 4
    keys, _ = cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), 10)
    assert keys.shape[2] == 4


def test_attention_mask_convention():
    """Query at position p sees p - window < k <= p: itself and window - 1 before it (HF's convention)."""
    mask = attention_mask(3, 6, 2, torch.device("cpu"))  # queries at key indices 3, 4, 5
    expected = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_window_equal_to_max_seq_len_uses_plain_cache():
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=8, sliding_window=32))
    model.setup_caches(1, 32, torch.float32, "cpu")
    assert isinstance(model.layers[0].attention.cache, KVCache)


def test_bad_prefill_chunk_is_refused():
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=8))
    with pytest.raises(ValueError, match="prefill_chunk"):
        model.setup_caches(1, 32, torch.float32, "cpu", prefill_chunk=0)


# --- flash-attn (CUDA only) ---------------------------------------------------------------------------

def flash_available() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs flash_attn and an Ampere or newer CUDA GPU")
@pytest.mark.parametrize("cache_kind", ["full", "rolling"])
@pytest.mark.parametrize("window", [None, 4])
def test_flash_matches_reference(cache_kind, window):
    if cache_kind == "rolling" and window is None:
        pytest.skip("a rolling cache needs a window")
    b, h, kv_h, d, T = 2, 4, 2, 64, sum(BLOCKS)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, T, h, d, generator=gen), torch.randn(b, kv_h, T, d, generator=gen),
               torch.randn(b, kv_h, T, d, generator=gen))
    cuda = dict(dtype=torch.bfloat16, device="cuda")
    cache = (RollingKVCache(b, kv_h, window, d, **cuda) if cache_kind == "rolling" else KVCache(b, kv_h, T, d, **cuda))
    outs, pos = [], 0
    for s in BLOCKS:
        keys, values = cache.update(k[:, :, pos:pos + s].to(**cuda), v[:, :, pos:pos + s].to(**cuda), pos)
        outs.append(attend(q[:, pos:pos + s].to(**cuda), keys, values, window, "flash"))
        pos += s
    ours = torch.cat(outs, 1).double().cpu()
    torch.testing.assert_close(ours, reference_attention(q, k, v, window), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs flash_attn and an Ampere or newer CUDA GPU")
def test_flash_model_matches_sdpa(mistral_folder):
    tokens = random_tokens(1, PROMPT_LEN, seed=9).cuda()
    runs = {}
    for backend in ("flash", "sdpa"):
        llm = build(mistral_folder, attention=backend, device="cuda", dtype="bfloat16", prefill_chunk=5)
        runs[backend] = torch.cat([llm.model(tokens[:, :20], 0),
                                   *(llm.model(tokens[:, i:i + 1], i) for i in range(20, 40))], 1)
    scale = runs["sdpa"].abs().max().item()  # bfloat16 on both sides: a loose bound
    torch.testing.assert_close(runs["flash"], runs["sdpa"], rtol=5e-2, atol=5e-2 * scale)


# --- Rows at their own positions (continuous batching) ------------------------------------------------

@pytest.mark.parametrize("rows", [[2, 0, 3, 1], [0, 1, 2, 3]], ids=["rows-shuffled", "rows-in-order"])
@pytest.mark.parametrize("together", [False, True], ids=["rows-alone", "rows-together"])
@pytest.mark.parametrize("case", ["llama", "mistral-window"])
def test_rows_at_their_own_positions_match_transformers(case, together, rows, mistral, mistral_folder, llama_folder):
    """Rows prefilled to different lengths in their own cache rows, then one forward with a start
    position per row (decode steps, then blocks of 3), each row against transformers' logits of its
    whole sequence: with a window the rows run several windows long. Decode steps attend row by
    row (a batch-invariant model) or all rows in one masked call (as a quantized model's do); batch
    row i lives in cache row rows[i]."""
    from transformers import AutoModelForCausalLM

    folder = llama_folder if case == "llama" else mistral_folder
    ref = mistral if case == "mistral-window" else AutoModelForCausalLM.from_pretrained(llama_folder).float().eval()
    llm = build(folder, max_batch_size=4, prefill_chunk=5)
    llm.model.batch_invariant = not together
    lengths = [3, 3 * WINDOW + 1, 11, 2 * WINDOW]
    seqs = [random_tokens(1, n + 5, seed=20 + i)[0] for i, n in enumerate(lengths)]
    for seq, n, row in zip(seqs, lengths, rows):
        llm.model(seq[None, :n], 0, cache_rows=[row])
    starts = torch.tensor(lengths)
    steps = [llm.model(torch.stack([s[n:n + 1] for s, n in zip(seqs, lengths)]), starts, cache_rows=rows),
             llm.model(torch.stack([s[n + 1:n + 2] for s, n in zip(seqs, lengths)]), starts + 1, cache_rows=rows),
             llm.model(torch.stack([s[n + 2:n + 5] for s, n in zip(seqs, lengths)]), starts + 2, cache_rows=rows)]
    ours = torch.cat(steps, dim=1)  # [4, 5, vocab]
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        with torch.no_grad():
            expected = ref(seq[None]).logits[0, n:]
        assert_logits_close(ours[i], expected)


def test_rows_beyond_the_cache_are_refused(llama_folder):
    llm = build(llama_folder, max_batch_size=2)
    with pytest.raises(ValueError, match="cache_rows"):
        llm.model(torch.ones(1, 1, dtype=torch.long), torch.tensor([3]), cache_rows=[2])
    with pytest.raises(ValueError, match="positions"):
        llm.model(torch.ones(2, 1, dtype=torch.long), torch.tensor([3, 128]))
    with pytest.raises(ValueError, match="one per row"):
        llm.model(torch.ones(2, 1, dtype=torch.long), torch.tensor([3]))


@pytest.mark.parametrize("s,t,window", [(1, 30, None), (5, 30, None), (5, 12, 4), (1, 4, 4)])
def test_sdpa_folds_grouped_heads_instead_of_copying_the_cache(s, t, window):
    """Query heads sharing a key/value head are folded into its query rows: the result equals SDPA
    over keys and values copied to every head (the former way), and no copy of them is made."""
    from torch.nn import functional as F

    from llama_int8.model import sdpa_attend

    b, h, kv_h, d = 2, 6, 2, 8
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(b, h, s, d, generator=gen), torch.randn(b, kv_h, t, d, generator=gen), \
        torch.randn(b, kv_h, t, d, generator=gen)
    mask = attention_mask(s, t, window, torch.device("cpu"))
    copied = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    with torch.profiler.profile() as prof:
        folded = sdpa_attend(q, k, v, window)
    torch.testing.assert_close(folded, copied, rtol=1e-6, atol=1e-6)
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::repeat_interleave", "aten::index_select"}
