"""benchmarks.speed --compare llama.cpp writes a Meta or Hugging Face folder as the 16-bit GGUF
llama.cpp is given: our own GGUF reader must read back the same model (llama.cpp itself is not
needed here)."""

from __future__ import annotations

import torch

from benchmarks.versus_llama_cpp import write_f16_gguf
from llama_int8.formats import open_checkpoint
from conftest import tiny_hf_model, write_hf_folder


def test_a_folder_written_as_gguf_reads_back_as_the_same_model(tmp_path):
    folder = write_hf_folder(tiny_hf_model(num_key_value_heads=2, vocab_size=300), tmp_path / "m")
    write_f16_gguf(folder, tmp_path / "m.gguf")
    source, written = open_checkpoint(folder), open_checkpoint(tmp_path / "m.gguf")
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "rope_theta"):
        assert getattr(written.args, field) == getattr(source.args, field), field
    want = {t.name: t.tensor for t in source.tensors()}
    got = {t.name: t.tensor for t in written.tensors()}
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():  # float16 rounding of the 2-D weights, norms exact
        torch.testing.assert_close(got[name].float(), tensor.float(), rtol=1e-3, atol=1e-4)


def test_speed_runs_each_combination_of_modes_once_named_by_what_differs():
    """benchmarks.speed --quant int8,nf4 --int8_matmul llm.int8,weight_only: int8 with each product,
    nf4 once (int8_matmul applies to int8 only); rows named by what differs from the first."""
    from benchmarks.speed import Variant, variants

    runs = variants(["int8", "nf4"], ["model"], ["llm.int8", "weight_only"])
    assert runs == [Variant("int8", "model", "llm.int8"), Variant("int8", "model", "weight_only"),
                    Variant("nf4", "model", "llm.int8")]
    assert [run.name(runs[0]) for run in runs] == ["llama_int8", "llama_int8, weight_only", "llama_int8, nf4"]


def test_speed_runs_cuda_graphs_beside_eager_steps_for_the_modes_that_allow_them():
    """--quant nf4,int8 --cuda_graph false,true: nf4 with and without; int8 without only (its layers
    wait on the host, which a graph cannot hold)."""
    from benchmarks.speed import Variant, variants

    runs = variants(["nf4", "int8"], ["model"], ["llm.int8"], [False, True])
    assert runs == [Variant("nf4", "model", "llm.int8", False), Variant("nf4", "model", "llm.int8", True),
                    Variant("int8", "model", "llm.int8", False)]
    assert [run.name(runs[0]) for run in runs] == ["llama_int8", "llama_int8, CUDA graph", "llama_int8, int8"]
