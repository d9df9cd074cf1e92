"""Pre-baked folders: quantize once with quantize_offline's writer, load without re-quantizing, with
logits bit-identical to quantizing at load time; written atomically; bad folders refused by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_int8 import Llama, quantize
from llama_int8.formats import CheckpointError, open_checkpoint, prebaked
from llama_int8.formats.prebaked import FORMAT_VERSION, MANIFEST_NAME, read_manifest, write_prebaked
from llama_int8.quantize import parse_quant_mode
from llama_int8.quantized_layers import Int8Product
from conftest import tiny_hf_model, write_hf_folder, write_meta_folder

QUANTIZED_MODES = ("int8", "nf4", "nf4-dq", "fp4", "fp4-dq")
# Shapes the CPU 4-bit kernel accepts: every out_features % 32 == 0 and in_features % 64 == 0.
SHAPES = dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2)
TOKENS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 64], [1, 8, 8, 120, 2, 33, 90, 11]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread for many small ops


@pytest.fixture(scope="module")
def meta_source(tmp_path_factory, sp_model) -> Path:
    """A tiny random LLaMA (grouped-query attention, untied head) as a 2-shard Meta checkpoint."""
    return write_meta_folder(tiny_hf_model(seed=3, **SHAPES), tmp_path_factory.mktemp("src") / "meta", n_shards=2,
                             tokenizer=sp_model)


@pytest.fixture(scope="module")
def baked_int8(meta_source, tmp_path_factory) -> Path:
    return write_prebaked(open_checkpoint(meta_source), tmp_path_factory.mktemp("baked") / "int8",
                          parse_quant_mode("int8"))


def logits(folder: Path, **build) -> torch.Tensor:
    llm = Llama.build(folder, max_seq_len=16, max_batch_size=2, device="cpu", **build)
    with torch.inference_mode():
        return llm.model(TOKENS, 0)


def leftovers(parent: Path) -> list[str]:
    """Temporary folders the writer may have left beside its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- Round trip ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", QUANTIZED_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prebaked_logits_are_bit_identical_to_quantizing_at_load(meta_source, tmp_path, mode, dtype, monkeypatch):
    out = write_prebaked(open_checkpoint(meta_source), tmp_path / mode, parse_quant_mode(mode))
    assert leftovers(tmp_path) == []
    want = logits(meta_source, quant=mode, dtype=dtype, quantize_head=False)  # baked without --quantize_head

    def refuse(*args, **kwargs):
        raise AssertionError("a pre-baked folder must load without quantizing")

    monkeypatch.setattr(quantize, "quantize_weight", refuse)
    monkeypatch.setattr(prebaked, "quantize_weight", refuse)
    got = logits(out, quant="none", dtype=dtype)  # a baked folder loads in the mode it was baked in
    assert torch.isfinite(got).all()
    assert torch.equal(got, want), f"{mode} {dtype}: max difference {(got - want).abs().max()}"
    dense = logits(meta_source, quant="none", dtype=dtype)
    assert not torch.equal(got, dense)  # quantization did happen


def test_prebaked_int8_layers_sharing_an_input_are_computed_as_one(baked_int8):
    model = Llama.build(baked_int8, max_seq_len=16, max_batch_size=1, device="cpu").model
    for block in model.layers:
        attention, ffn = block.attention, block.feed_forward
        for product, members in ((attention.qkv_product, (attention.wq, attention.wk, attention.wv)),
                                 (ffn.gate_up_product, (ffn.w1, ffn.w3))):
            assert isinstance(product, Int8Product)
            assert torch.equal(product.cb, torch.cat([m.weight.data for m in members]))
            assert members[0].weight.data.data_ptr() == product.cb.data_ptr()  # views: no byte twice


def test_prebaked_with_quantized_head_round_trips(meta_source, tmp_path):
    cfg = parse_quant_mode("int8", quantize_head=True)
    out = write_prebaked(open_checkpoint(meta_source), tmp_path / "head", cfg)
    manifest = read_manifest(out)
    assert "output.SCB" in manifest.tensors and "output.weight" in manifest.tensors
    assert manifest.tensors["output.weight"].dtype == "int8"
    assert torch.equal(logits(out), logits(meta_source, quant="int8", quantize_head=True))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_folder_baked_at_defaults_is_the_model_loading_at_defaults_builds(meta_source, tmp_path, mode):
    """quantize_offline.py and Llama.build given the same flags (here none but --quant) make one model:
    the head int8 in both."""
    run = subprocess.run([sys.executable, "quantize_offline.py", "--ckpt_dir", str(meta_source), "--out_dir",
                          str(tmp_path / mode), "--quant", mode], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, timeout=300)
    assert run.returncode == 0, run.stderr
    manifest = read_manifest(tmp_path / mode)
    assert manifest.quant.quantize_head and manifest.tensors["output.weight"].dtype == "int8"
    assert torch.equal(logits(tmp_path / mode), logits(meta_source, quant=mode))


def test_manifest_records_settings_source_and_tools(baked_int8, meta_source):
    manifest = json.loads((baked_int8 / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["quant"] == parse_quant_mode("int8").to_dict()
    assert manifest["model"]["dim"] == SHAPES["hidden_size"] and manifest["model"]["n_kv_heads"] == 2
    assert manifest["source"]["path"] == str(meta_source.resolve()) and manifest["source"]["format"] == "meta"
    assert {"version", "bitsandbytes", "torch"} <= set(manifest["tool"])
    assert (baked_int8 / "tokenizer.model").read_bytes() == (meta_source / "tokenizer.model").read_bytes()
    assert manifest["tensors"]["layers.0.attention.wq.weight"]["dtype"] == "int8"
    assert manifest["tensors"]["tok_embeddings.weight"]["dtype"] == "float32"  # as in the source
    assert open_checkpoint(baked_int8).format == "prebaked"


def test_small_shards_round_trip(meta_source, tmp_path):
    out = write_prebaked(open_checkpoint(meta_source), tmp_path / "many", parse_quant_mode("nf4"), shard_bytes=20_000)
    assert len(read_manifest(out).shards) > 3
    assert torch.equal(logits(out), logits(meta_source, quant="nf4", quantize_head=False))


# --- Refusing to overwrite, and atomic writes ----------------------------------------------------

def test_existing_out_dir_is_refused_without_force(meta_source, baked_int8, tmp_path):
    """Without force nothing is replaced; force replaces only a folder this project wrote."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="--force") as info:
            write_prebaked(open_checkpoint(meta_source), out, parse_quant_mode("int8"), force=force)
        assert str(out) in str(info.value) and "keep.txt" in str(info.value)
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []
    baked = Path(shutil.copytree(baked_int8, tmp_path / "baked"))
    with pytest.raises(FileExistsError, match="--force"):
        write_prebaked(open_checkpoint(meta_source), baked, parse_quant_mode("nf4"))
    write_prebaked(open_checkpoint(meta_source), baked, parse_quant_mode("nf4"), force=True)
    assert read_manifest(baked).quant.name == "nf4"
    assert leftovers(tmp_path) == []


def test_quantize_offline_cli_refuses_existing_out_dir(baked_int8, meta_source):
    before = {p.name: p.stat().st_mtime_ns for p in baked_int8.iterdir()}
    run = subprocess.run([sys.executable, "quantize_offline.py", "--ckpt_dir", str(meta_source), "--out_dir",
                          str(baked_int8), "--quant", "nf4"], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, timeout=120)
    assert run.returncode == 1, run.stderr
    assert str(baked_int8) in run.stderr and "--force" in run.stderr
    assert {p.name: p.stat().st_mtime_ns for p in baked_int8.iterdir()} == before
    assert read_manifest(baked_int8).quant.name == "int8"


def test_failure_midway_leaves_no_partial_folder(meta_source, tmp_path, monkeypatch):
    calls = []

    def quantize_then_fail(weight, cfg):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("disk full")
        return quantize.quantize_weight(weight, cfg)

    monkeypatch.setattr(prebaked, "quantize_weight", quantize_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_prebaked(open_checkpoint(meta_source), tmp_path / "out", parse_quant_mode("int8"), shard_bytes=4096)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_source_shard_fails_by_name_and_keeps_the_old_folder(tmp_path, sp_model, baked_int8):
    source = write_hf_folder(tiny_hf_model(seed=4, **SHAPES), tmp_path / "hf", sharded=True, tokenizer=sp_model)
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 2
    bad = shards[-1]
    bad.write_bytes(bad.read_bytes()[:-100])  # truncated: the earlier shards are fine and get written
    out = tmp_path / "baked"
    shutil.copytree(baked_int8, out)
    with pytest.raises(CheckpointError, match=bad.name) as info:
        write_prebaked(open_checkpoint(source), out, parse_quant_mode("int8"), force=True, shard_bytes=4096)
    assert str(bad) in str(info.value)
    assert leftovers(tmp_path) == []
    assert read_manifest(out).source == read_manifest(baked_int8).source  # still the old folder
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in baked_int8.iterdir())


def test_writer_rejects_none_prebaked_sources_and_writing_into_the_source(baked_int8, meta_source, tmp_path):
    with pytest.raises(ValueError, match="nothing to pre-bake"):
        write_prebaked(open_checkpoint(meta_source), tmp_path / "x", parse_quant_mode("none"))
    with pytest.raises(ValueError, match="already pre-baked"):
        write_prebaked(open_checkpoint(baked_int8), tmp_path / "y", parse_quant_mode("int8"))
    with pytest.raises(ValueError, match="source checkpoint folder"):
        write_prebaked(open_checkpoint(meta_source), meta_source, parse_quant_mode("int8"), force=True)
    assert (meta_source / "params.json").exists()


# --- Bad pre-baked folders -----------------------------------------------------------------------

@pytest.fixture
def baked_copy(baked_int8, tmp_path) -> Path:
    return Path(shutil.copytree(baked_int8, tmp_path / "copy"))


def edit_manifest(folder: Path, edit) -> Path:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def refused(folder: Path, *needles: str) -> str:
    """Both opening the folder and building a Llama from it fail with a CheckpointError naming needles."""
    with pytest.raises(CheckpointError) as info:
        read_manifest(folder)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    with pytest.raises(CheckpointError):
        Llama.build(folder, device="cpu", max_seq_len=8)
    return str(info.value)


def test_missing_manifest(baked_copy):
    """The shards alone still mark the folder as pre-baked: it is refused, not read as another format."""
    (baked_copy / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=MANIFEST_NAME) as info:
        open_checkpoint(baked_copy)
    assert str(baked_copy) in str(info.value)


def test_manifest_of_another_format(baked_copy):
    path = edit_manifest(baked_copy, lambda d: d.update(format="something-else"))
    refused(baked_copy, str(path), "something-else")


def test_manifest_of_another_format_version(baked_copy):
    path = edit_manifest(baked_copy, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    refused(baked_copy, str(path), f"format version {FORMAT_VERSION + 1}")


def test_manifest_that_is_not_json(baked_copy):
    (baked_copy / MANIFEST_NAME).write_text("{not json")
    refused(baked_copy, str(baked_copy / MANIFEST_NAME), "JSON")


@pytest.mark.parametrize("edit,needles", [
    (lambda d: d["model"].update(dim=128), ["layers.0.attention.wq.weight", "expected"]),
    (lambda d: d["model"].update(n_layers=3), ["layers.2"]),
    (lambda d: d["quant"].update(mode="nf4"), ["layers.0.attention.wq", "nf4"]),
    (lambda d: d["quant"].update(blocksize=100), ["malformed", "blocksize 100"]),
    (lambda d: d["quant"].update(mode="none"), ["none"]),
    (lambda d: d["tensors"]["layers.0.attention.wk.SCB"].update(shape=[16]), ["layers.0.attention.wk.SCB"]),
    (lambda d: d["tensors"].pop("layers.1.feed_forward.w2.SCB"), ["layers.1.feed_forward.w2"]),
    (lambda d: d["tensors"]["norm.weight"].update(dtype="float16"), ["norm.weight", "float16"]),
    (lambda d: d["tensors"].update({"layers.0.extra.weight": {"shard": "quantized-00001.safetensors",
                                                              "dtype": "float32", "shape": [4]}}),
     ["layers.0.extra.weight"]),
    (lambda d: d["model"].update(colour="blue"), ["colour"]),
])
def test_manifest_inconsistent_with_config_or_tensors(baked_copy, edit, needles):
    path = edit_manifest(baked_copy, edit)
    message = refused(baked_copy, *needles)
    assert str(path) in message or str(baked_copy) in message


def test_truncated_prebaked_shard(baked_copy):
    shard = baked_copy / "quantized-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    refused(baked_copy, str(shard))


def test_missing_and_extra_shards(baked_copy, tmp_path):
    shard = baked_copy / "quantized-00001.safetensors"
    moved = tmp_path / "moved.safetensors"
    shard.rename(moved)
    refused(baked_copy, "quantized-00001.safetensors", "does not exist")
    moved.rename(shard)
    shutil.copy(shard, baked_copy / "quantized-00099.safetensors")
    refused(baked_copy, "quantized-00099.safetensors")


def test_packed_4bit_state_disagreeing_with_the_manifest(meta_source, tmp_path):
    """The JSON state of a 4-bit layer (quant type, blocksize, shape) is checked against the manifest."""
    from safetensors.torch import load_file, save_file

    out = write_prebaked(open_checkpoint(meta_source), tmp_path / "nf4", parse_quant_mode("nf4"))
    manifest = read_manifest(out)
    key = "layers.1.feed_forward.w3.weight.quant_state.bitsandbytes__nf4"
    shard = out / manifest.tensors[key].shard
    tensors = load_file(shard)
    state = json.loads(bytes(tensors[key].tolist()))
    state["blocksize"] = 128
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(tensors, shard, metadata={"format": "pt"})
    edit_manifest(out, lambda d: d["tensors"][key].update(shape=list(tensors[key].shape)))
    with pytest.raises(CheckpointError, match="changed or replaced"):  # the checksum sees the edit first
        Llama.build(out, device="cpu", max_seq_len=8)
    with pytest.raises(CheckpointError, match="blocksize") as info:
        Llama.build(out, device="cpu", max_seq_len=8, verify=False)
    assert str(shard) in str(info.value) and "layers.1.feed_forward.w3" in str(info.value)


def test_quant_gguf_is_refused_for_a_prebaked_folder(baked_int8):
    with pytest.raises(ValueError, match="quant='gguf' serves .* quantized offline to int8"):
        Llama.build(baked_int8, quant="gguf", max_seq_len=16, device="cpu")
