"""GGUF files: configuration, weights and tokenizer against transformers' own GGUF loading, int8 and
pre-baked loads of a GGUF, malformed files; and tiny GGUFs written here with gguf.GGUFWriter."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, gguf_writer, hf_to_meta_state, tiny_hf_model, write_hf_folder
from llama_int8 import Llama
from llama_int8.formats import CheckpointError, open_checkpoint
from llama_int8.formats.gguf_file import GGUFCheckpoint, gguf_tokenizer
from llama_int8.formats.hf import hf_model_args
from llama_int8.model import rope_inverse_frequencies
from llama_int8.formats.prebaked import write_prebaked
from llama_int8.quantize import parse_quant_mode

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nWhat is the tallest mountain?<|im_end|>\n<|im_start|>assistant\n"]
TEXTS = ["Hello world!", "  leading spaces,\ttabs\n\nand newlines ", "héllo wörld — 日本語 🙂 naïve café",
         "Numbers: 12345, 3.14159 and 1,000,000", "<|im_start|>user\nHi there<|im_end|>\n", "I'm sure they'll've"]
STEPS = 32
INT8_STEPS = 8


def assert_same_config(args, hf) -> None:
    """Equal up to how each format spells the same thing (GGUF stores eps as float32, no rope type)."""
    ours, theirs = asdict(args), asdict(hf)
    assert ours.pop("norm_eps") == pytest.approx(theirs.pop("norm_eps"), rel=1e-6)
    assert ours.pop("rope_scaling") == {}
    theirs.pop("rope_scaling")
    assert ours == theirs
    torch.testing.assert_close(rope_inverse_frequencies(args), rope_inverse_frequencies(hf))


def greedy(llm: Llama, prompts: list[list[int]], steps: int = STEPS) -> list[list[int]]:
    return llm.generate(prompts, max_gen_len=steps, temperature=0.0, stop_ids=[])


# --- The real SmolLM2 GGUF -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_float32(smollm2_gguf) -> Llama:
    return Llama.build(smollm2_gguf, quant="none", device="cpu", dtype="float32", max_seq_len=128, max_batch_size=3)


@pytest.fixture(scope="module")
def gguf_int8(smollm2_gguf) -> Llama:
    """int8 blocks, the head float32 as in gguf_float32 (and in a folder pre-baked without --quantize_head)."""
    return Llama.build(smollm2_gguf, quant="int8", device="cpu", dtype="float32", max_seq_len=128, max_batch_size=3,
                       quantize_head=False)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_hf):
    """transformers' tokenizer for this GGUF (the HF export was made from it by transformers)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf)


@pytest.fixture(scope="module")
def prompts(hf_tokenizer) -> list[list[int]]:
    return [hf_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def int8_tokens(gguf_int8, prompts) -> list[list[int]]:
    """The first greedy tokens of the int8 load (short: bitsandbytes' int8 matmul is slow on a CPU)."""
    return greedy(gguf_int8, prompts[:2], INT8_STEPS)


@pytest.mark.slow
def test_model_args_equal_the_hf_export(gguf_float32, smollm2_hf):
    args, hf = gguf_float32.model.args, hf_model_args(smollm2_hf)
    assert (args.n_layers, args.n_heads, args.n_kv_heads, args.rope_theta, args.tie_word_embeddings) == (
        30, 9, 3, 100000.0, True)
    assert_same_config(args, hf)


@pytest.mark.slow
def test_float32_logits_match_transformers(gguf_float32, smollm2_reference, prompts):
    # GGUF q/k rows are used as stored (Meta's interleaved layout): a wrong layout fails here.
    tokens = torch.tensor([prompts[0]])
    with torch.inference_mode():
        ours = gguf_float32.model(tokens, 0)
        ref = smollm2_reference(tokens).logits
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.slow
def test_float32_greedy_matches_transformers(gguf_float32, smollm2_reference, prompts):
    chosen = [prompts[0], prompts[2]]  # plain text and a chat turn
    for p, got in zip(chosen, greedy(gguf_float32, chosen)):
        with torch.inference_mode():
            ref = smollm2_reference.generate(torch.tensor([p]), max_new_tokens=STEPS, do_sample=False)
        ref = ref[0, len(p):].tolist()
        assert got[:len(ref)] == ref and len(ref) >= 8  # transformers stops after <|im_end|>


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(gguf_float32, hf_tokenizer, text):
    tok = gguf_float32.tokenizer
    ids = tok.encode(text, bos=False, eos=False)
    assert ids == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == hf_tokenizer.decode(ids) == text


@pytest.mark.slow
def test_tokenizer_special_ids(gguf_float32, hf_tokenizer):
    tok = gguf_float32.tokenizer
    assert (tok.bos_id, tok.eos_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)
    assert tok.token_id("<|im_end|>") == tok.eos_id and tok.eos_id in tok.stop_ids
    assert tok.token_id("<|endoftext|>") in tok.stop_ids and tok.token_id("<|im_start|>") not in tok.stop_ids
    assert tok.encode("Hi", bos=True, eos=True) == [*hf_tokenizer("Hi", add_special_tokens=False).input_ids,
                                                    tok.eos_id]  # add_bos_token is false in this file
    assert tok.vocab_size == len(hf_tokenizer) and tok.chat_template == hf_tokenizer.chat_template


@pytest.mark.slow
def test_int8_load_follows_float32(gguf_float32, gguf_int8, int8_tokens, prompts):
    import bitsandbytes as bnb

    assert isinstance(gguf_int8.model.layers[0].attention.wq, bnb.nn.Linear8bitLt)
    reference = greedy(gguf_float32, prompts[:2], INT8_STEPS)
    assert int8_tokens[0][:4] == reference[0][:4]  # the most confident continuation survives int8
    same = sum(a == b for x, y in zip(int8_tokens, reference) for a, b in zip(x, y))
    assert same >= 0.75 * INT8_STEPS * len(reference), (int8_tokens, reference)


@pytest.mark.slow
def test_prebaked_from_gguf_equals_int8_at_load(smollm2_gguf, gguf_int8, int8_tokens, prompts, tmp_path):
    baked = write_prebaked(open_checkpoint(smollm2_gguf), tmp_path / "baked", parse_quant_mode("int8"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in baked.iterdir()}
    llm = Llama.build(baked, device="cpu", dtype="float32", max_seq_len=128, max_batch_size=3)
    assert greedy(llm, prompts[:2], INT8_STEPS) == int8_tokens
    ours, theirs = llm.tokenizer, gguf_int8.tokenizer
    assert (ours.bos_id, ours.eos_id, ours.stop_ids) == (theirs.bos_id, theirs.eos_id, theirs.stop_ids)
    assert [ours.encode(t, bos=True) for t in TEXTS] == [theirs.encode(t, bos=True) for t in TEXTS]


@pytest.mark.slow
def test_truncated_gguf(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[:1_000_000])  # ends inside the vocabulary
    with pytest.raises(CheckpointError, match="cut.gguf"):
        open_checkpoint(cut)


# --- Tiny GGUFs written here -----------------------------------------------------------------------

def write_tiny_gguf(path: Path, model=None, arch: str = "llama", qtype: str = "F32") -> Path:
    """A tiny LLaMA as a GGUF the way llama.cpp writes one: Meta's q/k layout, ggml's reversed dims."""
    import gguf

    model = model or tiny_hf_model()
    cfg = model.config
    writer = gguf_writer(path, arch, cfg)
    writer.add_rope_freq_base(10000.0)
    names = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output", "wq": "attn_q",
             "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate", "w2": "ffn_down",
             "w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    for name, t in hf_to_meta_state(model).items():
        parts = name.split(".")
        gguf_name = (f"blk.{parts[1]}.{names[parts[-2]]}.weight" if parts[0] == "layers"
                     else f"{names[parts[0]]}.weight")
        data, kind = t.numpy(), gguf.GGMLQuantizationType[qtype if t.dim() == 2 else "F32"]
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype, atol", [("F32", 1e-5), ("F16", 1e-2), ("Q8_0", 5e-2)])
def test_tiny_gguf_matches_hf_folder(tmp_path, qtype, atol):
    model = tiny_hf_model()
    ckpt = open_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf", model, qtype=qtype))
    assert isinstance(ckpt, GGUFCheckpoint) and ckpt.format == "gguf"
    assert_same_config(ckpt.args, open_checkpoint(write_hf_folder(model, tmp_path / "hf")).args)
    expected = hf_to_meta_state(model)
    for item in ckpt.tensors():
        torch.testing.assert_close(item.tensor, expected.pop(item.name), atol=atol, rtol=0)
    assert not expected


def test_folder_with_one_gguf_opens_it(tmp_path):
    write_tiny_gguf(tmp_path / "model.gguf")
    assert open_checkpoint(tmp_path).location == tmp_path / "model.gguf"
    write_tiny_gguf(tmp_path / "other.gguf")
    with pytest.raises(CheckpointError, match="2 GGUF files"):
        open_checkpoint(tmp_path)


def test_wrong_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt.gguf", arch="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt\.gguf: general.architecture is 'gpt2'"):
        open_checkpoint(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_text("this is not a GGUF file" * 100)
    with pytest.raises(CheckpointError, match="fake.gguf"):
        open_checkpoint(path)


def test_truncated_tensor_data(tmp_path):
    path = write_tiny_gguf(tmp_path / "whole.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        list(open_checkpoint(cut).tensors())


def test_sentencepiece_vocabulary_matches_sentencepiece(tmp_path, sp_model):
    """A 'llama' (SentencePiece) vocabulary rebuilt with tokenizers encodes as sentencepiece does."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sp_model))
    ids = range(sp.vocab_size())
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in ids]
    writer = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    tok = gguf_tokenizer(gguf.GGUFReader(tmp_path / "sp.gguf"), tmp_path / "sp.gguf")
    # Single spaces and known characters only: this model collapses runs of spaces (a normalizer a GGUF
    # does not record, and Llama's own tokenizer does not use) and has no byte fallback.
    for text in [*CORPUS.split(". ")[:6], "Berlin is the capital, 1000 miles."]:
        assert tok.encode(text, bos=True) == [sp.bos_id(), *sp.encode(text)]
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert tok.stop_ids == {sp.eos_id()}
