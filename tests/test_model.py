"""The model against Hugging Face transformers on tiny random configs, from every checkpoint layout."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_logits_close, hf_greedy, tiny_hf_model, write_hf_folder, write_meta_folder
from llama_int8 import Llama
from llama_int8.model import ONEDNN_LINEAR, Linear, RMSNorm, attend, attend_rows

CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2, rope_theta=500000.0),
    "mqa": dict(num_key_value_heads=1),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0),
    "explicit-head-dim": dict(num_key_value_heads=2, head_dim=32),
}
LAYOUTS = ("hf", "hf-sharded", "meta-1", "meta-2", "meta-4")
GREEDY_STEPS = 32


def write_layout(model, layout: str, folder, tokenizer):
    if layout.startswith("hf"):
        return write_hf_folder(model, folder, sharded=layout == "hf-sharded", tokenizer=tokenizer)
    return write_meta_folder(model, folder, n_shards=int(layout.split("-")[1]), tokenizer=tokenizer)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_transformers(config, layout, tmp_path, sp_model):
    ref = tiny_hf_model(seed=hash(config) % 1000, **CONFIGS[config])
    folder = write_layout(ref, layout, tmp_path / layout, sp_model)
    llm = Llama.build(folder, quant="none", dtype="float32", device="cpu", max_seq_len=64,
                      max_batch_size=2)
    assert llm.model.args.n_kv_heads == ref.config.num_key_value_heads
    assert llm.model.args.tie_word_embeddings == ref.config.tie_word_embeddings

    tokens = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
    assert_logits_close(llm.model(tokens, 0), expected)

    prompt = tokens[0, :7].tolist()
    ours = llm.generate([prompt], max_gen_len=GREEDY_STEPS, temperature=0, stop_ids=())[0]
    assert ours == hf_greedy(ref, prompt, GREEDY_STEPS)


def test_untied_head_is_used(tmp_path, sp_model):
    """An untied head must come from the checkpoint, not from the embedding."""
    ref = tiny_hf_model(num_key_value_heads=2, tie_word_embeddings=False)
    assert not torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight)
    llm = Llama.build(write_hf_folder(ref, tmp_path / "m", tokenizer=sp_model), quant="none", dtype="float32",
                      device="cpu")
    assert torch.equal(llm.model.output.weight, ref.lm_head.weight)
    assert llm.model.output.weight.data_ptr() != llm.model.tok_embeddings.weight.data_ptr()


def test_tied_head_shares_memory(tmp_path, sp_model):
    ref = tiny_hf_model(tie_word_embeddings=True)
    llm = Llama.build(write_hf_folder(ref, tmp_path / "m", tokenizer=sp_model), quant="none", dtype="float32",
                      device="cpu")
    assert llm.model.output.weight.data_ptr() == llm.model.tok_embeddings.weight.data_ptr()


def test_meta_ffn_rule_without_hidden_dim(tmp_path, sp_model):
    """Meta's params.json gives multiple_of/ffn_dim_multiplier instead of a width: 2/3 * 4 * 64 = 170,
    times 1.3 = 221, rounded up to a multiple of 32 = 224."""
    ref = tiny_hf_model(intermediate_size=224, num_key_value_heads=2)
    folder = write_meta_folder(ref, tmp_path / "m", n_shards=2, tokenizer=sp_model,
                               params_extra={"hidden_dim": None, "multiple_of": 32, "ffn_dim_multiplier": 1.3})
    llm = Llama.build(folder, quant="none", dtype="float32", device="cpu")
    assert llm.model.args.ffn_hidden_dim == 224
    tokens = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_logits_close(llm.model(tokens, 0), ref(tokens).logits)


def test_llama3_rope_scaling_matches_transformers(tmp_path, sp_model):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    ref = tiny_hf_model(num_key_value_heads=2, rope_scaling=scaling, rope_theta=500000.0,
                        max_position_embeddings=512)
    llm = Llama.build(write_hf_folder(ref, tmp_path / "m", tokenizer=sp_model), quant="none", dtype="float32",
                      device="cpu", max_seq_len=200)
    tokens = torch.randint(3, 128, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_logits_close(llm.model(tokens, 0), ref(tokens).logits)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_backends_agree(backend, tmp_path, sp_model):
    ref = tiny_hf_model(num_key_value_heads=2)
    folder = write_hf_folder(ref, tmp_path / "m", tokenizer=sp_model)
    llm = Llama.build(folder, quant="none", dtype="float32", device="cpu", attention=backend,
                      max_batch_size=2)
    tokens = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_logits_close(llm.model(tokens, 0), ref(tokens).logits)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_rows_attended_together_equal_each_row_alone(backend):
    """attend_rows: one query per row over the keys its mask leaves it (a prefix of its own length,
    or a ring's window of them), in one call; each row as attend gives it over exactly those keys."""
    g = torch.Generator().manual_seed(5)
    b, h, kv_h, t, d = 4, 6, 2, 11, 16
    q = torch.randn(b, 1, h, d, generator=g)
    k, v = torch.randn(b, kv_h, t, d, generator=g), torch.randn(b, kv_h, t, d, generator=g)
    lengths = [1, 11, 4, 7]
    visible = torch.arange(t) < torch.tensor(lengths)[:, None]
    together = attend_rows(q, k, v, visible, backend)
    for i, n in enumerate(lengths):
        alone = attend(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], None, "math")
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16_bit_rms_norm_rounds_where_hugging_face_does(dtype):
    """A 16-bit RMSNorm sums squares in float32, rounds the normalized activations once to 16 bits and
    multiplies them by the weight there, as transformers' LlamaRMSNorm does; only the order of the
    float32 sums may differ, so no element is off by more than one 16-bit step."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 2048, generator=g) * torch.rand(64, 1, generator=g) * 20).to(dtype)
    weight = (1 + 0.3 * torch.randn(2048, generator=g)).to(dtype)
    ours, theirs = RMSNorm(2048, eps=1e-5).to(dtype), LlamaRMSNorm(2048, eps=1e-5).to(dtype)
    ours.weight.data, theirs.weight.data = weight.clone(), weight.clone()
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=0)
    assert (got != want).float().mean() < 1e-3


def test_flash_refused_where_unusable(tmp_path, sp_model):
    folder = write_hf_folder(tiny_hf_model(), tmp_path / "m", tokenizer=sp_model)
    with pytest.raises(ValueError, match="flash"):
        Llama.build(folder, quant="none", dtype="float32", device="cpu", attention="flash")


@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 5, 96), (7, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_nn_linear(shape, bias):
    """The model's Linear takes oneDNN's kernel for float32 CPU inference: the same products, summed
    in another order, so equal to nn.Linear within float32 rounding; with gradients it is nn.Linear."""
    torch.manual_seed(0)
    layer = Linear(96, 200, bias=bias)
    x = torch.randn(shape)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = layer(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    took_onednn = any(e.key == "mkldnn::_linear_pointwise" for e in prof.key_averages())
    assert took_onednn == ONEDNN_LINEAR
    layer(x).sum().backward()
    assert layer.weight.grad is not None
