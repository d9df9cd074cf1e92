"""The quantized output head (one int8 table shared with a tied embedding), and the fused q/k/v and
gate/up projections: memory falls, the numbers stay where they should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_int8 import Llama
from llama_int8.formats import open_checkpoint
from llama_int8.formats.prebaked import read_manifest, write_prebaked
from llama_int8.loader import fill_model
from llama_int8.memory import weight_bytes
from llama_int8.model import Linear, LinearProduct, ModelArgs, empty_model
from llama_int8.quantize import parse_quant_mode
from llama_int8.quantized_layers import DeviceBoundLinear8bitLt, QuantizedEmbedding, make_linear_hook
from conftest import tiny_hf_model, write_hf_folder
from test_quantize import random_tensors

TIED_ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=384,
                      tie_word_embeddings=True)
TOKENS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 64], [1, 8, 8, 120, 2, 33, 90, 11]])
QUANTIZED_MODES = ("int8", "nf4", "nf4-dq")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(args: ModelArgs, mode: str, quantize_head: bool, dtype: torch.dtype = torch.float32):
    model = empty_model(args)
    fill_model(model, random_tensors(args, dtype), torch.device("cpu"), dtype,
               make_linear_hook(parse_quant_mode(mode, quantize_head=quantize_head), "cpu", dtype))
    model.setup_caches(2, 16, dtype, "cpu")
    return model.eval()


@pytest.mark.parametrize("mode", QUANTIZED_MODES)
def test_tied_quantized_head_is_one_int8_table_the_embedding_reads(mode):
    plain, quantized = tiny_model(TIED_ARGS, mode, False), tiny_model(TIED_ARGS, mode, True)
    head, embedding = quantized.output, quantized.tok_embeddings
    assert isinstance(head, DeviceBoundLinear8bitLt) and isinstance(embedding, QuantizedEmbedding)
    assert embedding.rows.data_ptr() == head.weight.data.data_ptr()  # one table, not a copy
    assert not list(embedding.parameters())  # held once, as the head's
    table_bytes = TIED_ARGS.vocab_size * TIED_ARGS.dim
    assert weight_bytes(quantized) == weight_bytes(plain) - 4 * table_bytes + table_bytes + 4 * TIED_ARGS.vocab_size
    # The embedding's rows are the head's dequantized: within half an int8 step of the float rows.
    ids = torch.tensor([[0, 3, 255, 3]])
    want = plain.tok_embeddings(ids)
    step = plain.tok_embeddings.weight.abs().amax(1)[ids] / 127
    assert ((embedding(ids) - want).abs() <= step.unsqueeze(-1) * 0.5 + 1e-7).all()
    with torch.inference_mode():
        assert torch.isfinite(quantized(TOKENS, 0)).all()


def test_quantize_head_false_keeps_the_float_head_and_its_logits_exactly():
    model = tiny_model(TIED_ARGS, "int8", False)
    assert type(model.output) is Linear and model.output.weight is model.tok_embeddings.weight
    with torch.inference_mode():
        hidden = model.norm(model.run_blocks(TOKENS, 0))
        assert torch.equal(model(TOKENS, 0), F.linear(hidden, model.tok_embeddings.weight))


def test_untied_head_is_quantized_int8_in_4bit_modes_too():
    model = tiny_model(ModelArgs(**{**vars(TIED_ARGS), "tie_word_embeddings": False}), "nf4", True)
    assert isinstance(model.output, DeviceBoundLinear8bitLt)
    assert type(model.tok_embeddings) is torch.nn.Embedding


def test_build_quantizes_the_head_by_default_only_in_quantized_modes(tmp_path, sp_model):
    folder = write_hf_folder(tiny_hf_model(tie_word_embeddings=True), tmp_path / "m", tokenizer=sp_model)
    assert isinstance(Llama.build(folder, quant="int8", device="cpu").model.tok_embeddings, QuantizedEmbedding)
    assert type(Llama.build(folder, quant="int8", device="cpu", quantize_head=False).model.output) is Linear
    assert type(Llama.build(folder, quant="none", device="cpu").model.output) is Linear


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_prebaked_tied_quantized_head_round_trips_and_old_folders_still_load(tmp_path, sp_model, mode):
    folder = write_hf_folder(tiny_hf_model(tie_word_embeddings=True, intermediate_size=128, num_key_value_heads=2),
                             tmp_path / "m", tokenizer=sp_model)
    baked = write_prebaked(open_checkpoint(folder), tmp_path / "head", parse_quant_mode(mode, quantize_head=True))
    manifest = read_manifest(baked)
    assert manifest.tensors["output.weight"].dtype == "int8" and "tok_embeddings.weight" not in manifest.tensors
    old = write_prebaked(open_checkpoint(folder), tmp_path / "old", parse_quant_mode(mode))
    for out, head in ((baked, True), (old, False)):
        got = Llama.build(out, max_seq_len=16, max_batch_size=2, device="cpu")
        want = Llama.build(folder, quant=mode, max_seq_len=16, max_batch_size=2, device="cpu", quantize_head=head)
        assert isinstance(got.model.tok_embeddings, QuantizedEmbedding) is head
        with torch.inference_mode():
            assert torch.equal(got.model(TOKENS, 0), want.model(TOKENS, 0))


# --- Fused projections ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_fused_projections_give_the_unfused_logits_exactly_in_float32(n_kv_heads):
    args = ModelArgs(**{**vars(TIED_ARGS), "n_kv_heads": n_kv_heads, "tie_word_embeddings": False})
    model = tiny_model(args, "none", False)
    with torch.inference_mode():
        want = [model(TOKENS, 0), model(TOKENS[:, :1], TOKENS.shape[1])]  # a prefill, then a decode step
        model.fuse_projections()
        got = [model(TOKENS, 0), model(TOKENS[:, :1], TOKENS.shape[1])]
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        assert isinstance(attention.qkv_product, LinearProduct) and isinstance(ffn.gate_up_product, LinearProduct)
        assert attention.wq.weight.data_ptr() == attention.qkv_product.weight.data_ptr()  # views: no byte twice
        assert ffn.w3.weight.data_ptr() == ffn.gate_up_product.weight[args.ffn_hidden_dim:].data_ptr()
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_quantized_blocks_are_left_to_their_own_products():
    """fuse_linear fuses plain Linear layers only: quantized blocks get products from
    quantized_layers.fused_product, or are called as they are."""
    model = tiny_model(TIED_ARGS, "nf4", False)
    model.fuse_projections()
    assert all(layer.attention.qkv_product is None and layer.feed_forward.gate_up_product is None
               for layer in model.layers)


# --- On SmolLM2's own weights -----------------------------------------------------------------------

FORCED_TEXT = ("The three primary colors are red, yellow and blue. Mixing them gives every other colour. "
               "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)")
DECIDED_MARGIN = 1.0  # as test_quantize's int8 test: positions where the float head's top two differ by >= 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_head_picks_the_float_heads_token_wherever_it_is_decided(smollm2_hf, mode):
    """Teacher-forced over a text: with the int8 head, the argmax equals the float32 head's (same
    blocks) wherever that one's top two logits are at least DECIDED_MARGIN apart."""
    builds = [Llama.build(smollm2_hf, quant=mode, device="cpu", dtype=torch.float32, max_seq_len=128,
                          quantize_head=head) for head in (False, True)]
    ids = torch.tensor([builds[0].tokenizer.encode(FORCED_TEXT, bos=True, eos=False)])
    with torch.inference_mode():
        want, got = (llm.model(ids, 0)[0] for llm in builds)
    assert weight_bytes(builds[1].model) < weight_bytes(builds[0].model) - 80 * 2**20  # 113 MB -> 28 MB
    top2 = want.topk(2, dim=-1).values
    decided = top2[:, 0] - top2[:, 1] >= DECIDED_MARGIN
    assert decided.sum() > len(decided) // 4
    agree = got.argmax(-1) == want.argmax(-1)
    assert agree[decided].all(), f"positions {(~agree & decided).nonzero().flatten().tolist()}"
