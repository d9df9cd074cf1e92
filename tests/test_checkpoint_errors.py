"""Bad checkpoints get a clear error naming the file, the key and what was expected."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_hf_model, write_hf_folder, write_meta_folder
from llama_int8 import Llama
from llama_int8.engine import Engine, Request
from llama_int8.formats import CheckpointError
from llama_int8.sampling import SamplingParams
from llama_int8.tokenizer import TokenizerError, load_tokenizer


def build(folder):
    return Llama.build(folder, quant="none", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model(num_key_value_heads=2)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no params.json .Meta.,? (or )?config.json"):
        build(tmp_path)


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build(tmp_path / "nope")


def test_missing_tokenizer(tmp_path, model):
    folder = write_meta_folder(model, tmp_path / "7B")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model found"):
        build(folder)


def test_meta_shard_with_a_wrong_shape(tmp_path, model, sp_model):
    folder = write_meta_folder(model, tmp_path / "m", n_shards=2, tokenizer=sp_model)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:, :10].clone()
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"'layers.1.feed_forward.w2.weight' has shape \(64, 58\), "
                                              r"expected \(64, 96\)"):
        build(folder)


def test_meta_shards_with_different_keys(tmp_path, model, sp_model):
    folder = write_meta_folder(model, tmp_path / "m", n_shards=2, tokenizer=sp_model)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    del shard["layers.0.attention.wq.weight"]
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth: keys differ .*layers.0.attention.wq.weight"):
        build(folder)


def test_checkpoint_missing_a_key(tmp_path, model, sp_model):
    folder = write_hf_folder(model, tmp_path / "m", tokenizer=sp_model)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors the model needs: \['layers.1.feed_forward.w3"):
        build(folder)


def test_unexpected_tensor(tmp_path, model, sp_model):
    folder = write_hf_folder(model, tmp_path / "m", tokenizer=sp_model)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(4)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor 'model.layers.0.self_attn.q_norm"):
        build(folder)


def test_truncated_meta_shard(tmp_path, model, sp_model):
    folder = write_meta_folder(model, tmp_path / "m", tokenizer=sp_model)
    path = folder / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot read this checkpoint shard"):
        build(folder)


def test_truncated_safetensors(tmp_path, model, sp_model):
    folder = write_hf_folder(model, tmp_path / "m", tokenizer=sp_model)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        build(folder)


def test_sharded_index_naming_a_missing_file(tmp_path, model, sp_model):
    folder = write_hf_folder(model, tmp_path / "m", sharded=True, tokenizer=sp_model)
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"lists shards that do not exist: .*{shards[-1].name}"):
        build(folder)


def test_params_json_missing_a_required_key(tmp_path, model, sp_model):
    folder = write_meta_folder(model, tmp_path / "m", tokenizer=sp_model)
    params = json.loads((folder / "params.json").read_text())
    del params["n_heads"]
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="params.json: missing required key 'n_heads'"):
        build(folder)


def test_config_json_of_another_architecture(tmp_path, model, sp_model):
    folder = write_hf_folder(model, tmp_path / "m", tokenizer=sp_model)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: model_type 'gpt2' is not one of"):
        build(folder)


def test_invalid_json(tmp_path):
    (tmp_path / "params.json").write_text("{")
    with pytest.raises(CheckpointError, match="params.json: not valid JSON"):
        build(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float8"), "dtype: 'float8' is not one of"),
    (dict(quant="int3"), "quant: 'int3' is not one of"),
    (dict(max_batch_size=0), "max_batch_size"),
])
def test_bad_arguments(tmp_path, model, sp_model, kwargs, message):
    folder = write_hf_folder(model, tmp_path / "m", tokenizer=sp_model)
    with pytest.raises(ValueError, match=message):
        Llama.build(folder, **{"quant": "none", "device": "cpu", **kwargs})


# --- Tokenizer files and a vocabulary padded past the tokenizer -------------------------------------

def write_word_tokenizer(folder: Path, n_ids: int) -> Path:
    """A tokenizer.json of n_ids words, w0 .. w{n_ids - 1}; BOS and EOS come from config.json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({f"w{i}": i for i in range(n_ids)}, unk_token="w0")).save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
@pytest.mark.parametrize("text, expected", [("{", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")])
def test_tokenizer_json_beside_the_tokenizer_that_is_no_json_object(tmp_path, model, name, text, expected):
    folder = write_hf_folder(model, tmp_path / "m")
    write_word_tokenizer(folder, 128)
    (folder / name).write_text(text)
    with pytest.raises(CheckpointError) as info:
        build(folder)
    assert info.type is CheckpointError and f"{folder / name}: {expected}" in str(info.value)


def test_chat_template_that_is_not_utf8(tmp_path, model):
    folder = write_hf_folder(model, tmp_path / "m")
    write_word_tokenizer(folder, 128)
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(TokenizerError) as info:
        build(folder)
    assert info.type is TokenizerError and f"{folder / 'chat_template.jinja'}: expected UTF-8 text" in str(info.value)


@pytest.fixture(scope="module")
def padded_llm(tmp_path_factory, sp_model) -> Llama:
    """A model of 160 embedding rows with the 128-id tokenizer, whose head favours the 32 rows the
    tokenizer lacks: unmasked, greedy decoding would pick one of them at every step."""
    padded = tiny_hf_model(seed=3, vocab_size=160)
    with torch.no_grad():
        padded.lm_head.weight[128:] *= 50
    folder = write_hf_folder(padded, tmp_path_factory.mktemp("padded") / "m", tokenizer=sp_model)
    return Llama.build(folder, quant="none", dtype="float32", device="cpu", max_seq_len=64, max_batch_size=2)


def test_padded_vocabulary_is_said_in_one_line(tmp_path, sp_model, caplog):
    folder = write_hf_folder(tiny_hf_model(seed=3, vocab_size=160), tmp_path / "m", tokenizer=sp_model)
    with caplog.at_level(logging.INFO, logger="llama_int8.tokenizer"):
        build(folder)
    lines = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert lines == [f"The tokenizer has 128 ids and the model {folder} 160 embedding rows (padded): 32 ids of the "
                     "model (128..159) cannot be decoded, and are never generated"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ids_past_the_tokenizer_are_never_generated(padded_llm, temperature):
    prompts = [[1, 5, 9, 14], [1, 30]]
    generated = padded_llm.generate(prompts, max_gen_len=24, temperature=temperature, top_p=1.0, seed=0, stop_ids=())
    assert all(len(g) == 24 for g in generated) and max(max(g) for g in generated) < 128
    engine = Engine(padded_llm.model, padded_llm.tokenizer)
    done = engine.run([Request([1, 5, 9], max_tokens=24, sampling=SamplingParams(temperature=temperature, seed=0))])
    assert len(done[0].tokens) == 24 and max(done[0].tokens) < 128


def test_decoding_an_id_past_the_tokenizer_is_refused(padded_llm, tmp_path):
    tokenizers = [padded_llm.tokenizer, load_tokenizer(write_word_tokenizer(tmp_path, 128))]  # SentencePiece, HF
    for tokenizer in tokenizers:
        with pytest.raises(TokenizerError) as info:
            tokenizer.decode([5, 150])
        assert info.type is TokenizerError
        assert "token ids [150] cannot be decoded: the tokenizer has ids 0..127 only" in str(info.value)
