"""benchmarks.synthetic's random Mixtral folder is a Mixtral checkpoint the loader reads, and
benchmarks.speed counts a decode step as reading only the experts its tokens are expected to pick."""

from __future__ import annotations

import json

import pytest

from benchmarks.speed import decode_read_bytes
from benchmarks.synthetic import parameter_count, shape, write_random_hf_checkpoint
from llama_int8 import Llama
from llama_int8.formats import open_checkpoint
from llama_int8.memory import tensor_bytes


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory):
    args = shape("Mixtral-1B", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=300)
    return write_random_hf_checkpoint(tmp_path_factory.mktemp("synthetic") / "mixtral", args, shard_bytes=1 << 17)


def test_folder_holds_mixtral_config_and_expert_tensors(mixtral_folder):
    config = json.loads((mixtral_folder / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", 8, 2)
    names = json.loads((mixtral_folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.7.w1.weight",
            "model.layers.1.block_sparse_moe.experts.7.w2.weight"} <= names.keys()
    args = open_checkpoint(mixtral_folder).args
    block = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 8 + 8 * 3 * 64 * 96 + 2 * 64  # wq wo, wk wv, router, experts, norms
    assert (args.n_experts, args.experts_per_token) == (8, 2)
    assert parameter_count(args) == 2 * 300 * 64 + 2 * block + 64  # embedding and head, blocks, final norm


def test_decode_reads_the_expected_share_of_experts(mixtral_folder):
    llm = Llama.build(mixtral_folder, max_seq_len=16, quant="int8", device="cpu")
    experts = sum(tensor_bytes(layer.feed_forward.experts) for layer in llm.model.layers)
    one, eight = decode_read_bytes(llm, 1), decode_read_bytes(llm, 8)
    assert abs((eight - one) - experts * (0.75 - 0.75**8)) <= 1  # 1 - (1 - 2/8)^batch of them, rounded
    assert llm.generate([[5, 6, 7]], max_gen_len=3, temperature=0, stop_ids=())[0]  # it runs
