"""Bad checkpoints get a clear error naming the file, the key and what was expected."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_hf_model, write_hf_folder, write_meta_folder
from llama_int8 import Llama
from llama_int8.formats import CheckpointError
from llama_int8.tokenizer import TokenizerError


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
