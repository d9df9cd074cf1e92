"""Tokenizers: SentencePiece and tokenizer.json round trips, special ids from the configs, discovery."""

from __future__ import annotations

import json

import pytest

from conftest import CORPUS
from llama_int8.tokenizer import (HFTokenizer, SentencePieceTokenizer, TokenizerError, find_tokenizer_file,
                                  load_tokenizer)

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "  leading spaces and 1000 numbers", "To be or not to be"]


def test_sentencepiece_round_trip(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, frozenset({2}))
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
        assert tok.decode(ids[1:-1]) == text.strip()  # SentencePiece drops leading whitespace
    assert tok.encode("fox", bos=False, eos=False) == tok.sp.encode("fox")


@pytest.fixture(scope="module")
def hf_tokenizer_folder(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here, with a chat end-of-turn token and configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("hf-tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "<|endoftext|>"}, "add_bos_token": True}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    return folder


def test_tokenizer_json_round_trip_and_special_ids(hf_tokenizer_folder):
    tok = HFTokenizer(hf_tokenizer_folder / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (1, 0)
    assert tok.stop_ids == frozenset({0, 2})  # eos and <|im_end|> (generation_config and end-of-turn)
    for text in TEXTS + ["héllo wörld ✓"]:
        ids = tok.encode(text, bos=True, eos=False)
        assert ids[0] == 1
        assert tok.decode(ids[1:]) == text


def test_smollm2_tokenizer_equals_transformers(smollm2_hf):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_hf)
    tok = load_tokenizer(smollm2_hf / "tokenizer.json")
    assert tok.eos_id == ref.eos_token_id and tok.token_id("<|im_end|>") in tok.stop_ids
    for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>", "naïve café 東京 🙂"]:
        assert tok.encode(text, bos=False, eos=False) == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ref.encode(text, add_special_tokens=False)) == text


def test_tokenizer_found_beside_the_size_folders(tmp_path, sp_model):
    """Meta's download layout: tokenizer.model next to 7B/, 13B/ ..."""
    (tmp_path / "13B").mkdir()
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    assert find_tokenizer_file(tmp_path / "13B") == tmp_path / "tokenizer.model"
    assert find_tokenizer_file(tmp_path / "13B", sp_model) == sp_model


def test_missing_tokenizer_names_the_places_searched(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(TokenizerError, match=f"no tokenizer.json or tokenizer.model found in {tmp_path / 'ckpt'}"):
        find_tokenizer_file(tmp_path / "ckpt")


def test_tiktoken_file_is_refused_with_advice(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(TokenizerError, match="tiktoken"):
        load_tokenizer(path)


def test_garbage_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a model")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
