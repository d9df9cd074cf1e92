"""Bad input, tried as a hostile or careless user would: every class is refused up front with an error
naming the file, key or argument, and no write destroys what it did not make.

Sections: writes; file names from checkpoint metadata; integrity of pre-baked folders; configuration,
memory, shards, values and tokenizers checked before anything is built; generation arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_hf_model, write_hf_folder, write_meta_folder
from llama_int8 import Llama
from llama_int8.formats import CheckpointError, open_checkpoint, prebaked, writing
from llama_int8.formats.prebaked import MANIFEST_NAME, read_manifest, write_prebaked
from llama_int8.formats.writing import MARKER_NAME, WriteError, new_folder
from llama_int8.loader import NotEnoughMemoryError
from llama_int8.quantize import parse_quant_mode
from llama_int8.tokenizer import TokenizerError

REPO = Path(__file__).parent.parent
# Shapes the CPU 4-bit kernel accepts: every out_features % 32 == 0 and in_features % 64 == 0.
SHAPES = dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2)
INT8 = parse_quant_mode("int8")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model(seed=5, **SHAPES)


@pytest.fixture(scope="module")
def hf_source(model, sp_model, tmp_path_factory) -> Path:
    return write_hf_folder(model, tmp_path_factory.mktemp("src") / "hf", tokenizer=sp_model)


@pytest.fixture(scope="module")
def baked(hf_source, tmp_path_factory) -> Path:
    return write_prebaked(open_checkpoint(hf_source), tmp_path_factory.mktemp("baked") / "int8", INT8)


@pytest.fixture
def hf_copy(hf_source, tmp_path) -> Path:
    return copy_folder(hf_source, tmp_path / "hf")


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def build(folder, **kwargs) -> Llama:
    return Llama.build(folder, **{"quant": "none", "device": "cpu", "max_seq_len": 32, "max_batch_size": 2,
                                  **kwargs})


def folder_bytes(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 by name: what "byte for byte the same" compares."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --- 1. Writes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["the source", "its parent", "inside it"])
@pytest.mark.parametrize("force", [False, True])
def test_out_dir_that_is_contains_or_lies_inside_the_source_is_always_refused(hf_copy, where, force):
    out = {"the source": hf_copy, "its parent": hf_copy.parent, "inside it": hf_copy / "baked"}[where]
    before = folder_bytes(hf_copy)
    with pytest.raises(ValueError, match="source checkpoint folder") as info:
        write_prebaked(open_checkpoint(hf_copy), out, INT8, force=force)
    assert str(hf_copy) in str(info.value)
    assert folder_bytes(hf_copy) == before


def test_stack_folders_and_tokenizer_are_sources_too(hf_copy, tmp_path, sp_model):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    save_file({"model.norm.weight": torch.ones(64)}, overlay / "model.safetensors")
    with pytest.raises(ValueError, match="source checkpoint folder"):
        write_prebaked(open_checkpoint([hf_copy, overlay]), overlay, INT8, force=True)
    with pytest.raises(ValueError, match="source checkpoint file"):
        write_prebaked(open_checkpoint(hf_copy), sp_model.parent, INT8, force=True, tokenizer_path=sp_model)


def test_a_file_or_a_link_at_out_dir_is_refused(hf_source, baked, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="is a file"):
        write_prebaked(open_checkpoint(hf_source), tmp_path / "file", INT8, force=True)
    (tmp_path / "link").symlink_to(baked)
    with pytest.raises(FileExistsError, match="symbolic link"):
        write_prebaked(open_checkpoint(hf_source), tmp_path / "link", INT8, force=True)
    assert (tmp_path / "file").read_text() == "mine" and read_manifest(baked).quant.name == "int8"


def test_every_finished_folder_holds_a_marker_naming_its_kind(baked):
    marker = json.loads((baked / MARKER_NAME).read_text())
    assert marker["written_by"] == "llama_int8" and marker["kind"] == "prebaked" and marker["state"] == "complete"
    assert writing.folder_kind(baked) == "prebaked"


def test_force_replaces_only_a_folder_of_the_kind_being_written(hf_source, tmp_path):
    out = tmp_path / "export"
    with new_folder(out, "hf", []) as folder:
        (folder / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds a hf folder written by llama_int8, not a prebaked one"):
        write_prebaked(open_checkpoint(hf_source), out, INT8, force=True)
    assert siblings(out) == ["config.json", MARKER_NAME]


def test_a_folder_that_appears_while_writing_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while"):
        with new_folder(out, "test", []) as folder:
            (folder / "loser").write_text("mine")
            out.mkdir()  # another writer finishing first
            (out / "winner").write_text("theirs")
    assert siblings(out) == ["winner"] and siblings(tmp_path) == ["out"]


def test_an_empty_folder_that_appears_while_writing_is_not_replaced_either(tmp_path):
    """os.rename would replace an empty folder; the rename refuses any existing name."""
    out = tmp_path / "out"
    with pytest.raises(FileExistsError):
        with new_folder(out, "test", []) as folder:
            (folder / "loser").write_text("mine")
            out.mkdir()
    assert siblings(out) == [] and siblings(tmp_path) == ["out"]


def test_force_never_replaces_a_folder_put_there_after_the_start(baked, tmp_path):
    out = copy_folder(baked, tmp_path / "out")
    with pytest.raises(FileExistsError, match="replaced by someone else"):
        with new_folder(out, "prebaked", [], force=True) as folder:
            (folder / "loser").write_text("mine")
            os.rename(out, tmp_path / "moved")  # another writer replacing out first
            copy_folder(baked, out)
            (out / "winner").write_text("theirs")
    assert (out / "winner").exists() and not (out / "loser").exists()
    assert sorted(siblings(tmp_path)) == ["moved", "out"]


def test_a_second_writer_of_the_same_out_dir_fails_at_once(hf_source, tmp_path):
    out = tmp_path / "out"
    with new_folder(out, "prebaked", []) as folder:
        start = time.perf_counter()
        with pytest.raises(FileExistsError, match=f"another writer .pid {os.getpid()}"):
            write_prebaked(open_checkpoint(hf_source), out, INT8)
        assert time.perf_counter() - start < 5  # before quantizing anything
        (folder / "first").write_text("wins")
    assert (out / "first").exists()


def test_two_writer_processes_at_once_exactly_one_wins(hf_source, tmp_path):
    out = tmp_path / "out"
    code = ("import sys; from llama_int8.formats import open_checkpoint; "
            "from llama_int8.formats.prebaked import write_prebaked; from llama_int8.quantize import parse_quant_mode; "
            "write_prebaked(open_checkpoint(sys.argv[1]), sys.argv[2], parse_quant_mode(sys.argv[3]))")
    runs = [subprocess.Popen([sys.executable, "-c", code, str(hf_source), str(out), mode], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for mode in ("int8", "nf4")]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    winner = ("int8", "nf4")[[rc for rc, _ in results].index(0)]
    assert read_manifest(out).quant.name == winner  # whole, and the winner's
    loser_error = next(err for rc, err in results if rc)
    assert "FileExistsError" in loser_error and str(out) in loser_error
    assert siblings(tmp_path) == ["out"]


def killed_writer(out: Path) -> Path:
    """The temporary folder a writer of out leaves when it is killed midway (SIGKILL: no cleanup)."""
    code = ("import os, sys; from llama_int8.formats.writing import new_folder\n"
            "with new_folder(sys.argv[1], 'prebaked', []) as f:\n"
            "    (f / 'quantized-00001.safetensors').write_bytes(b'0' * 3_000_000)\n"
            "    os.kill(os.getpid(), 9)\n")
    run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, timeout=120)
    assert run.returncode == -9, run.stderr
    (leftover,) = out.parent.glob(f".{out.name}.partial-*")
    return leftover


def test_a_killed_run_leaves_no_out_dir_and_a_folder_every_loader_refuses(tmp_path, hf_source):
    out = tmp_path / "out"
    leftover = killed_writer(out)
    assert not out.exists()
    with pytest.raises(CheckpointError, match="unfinished write"):
        open_checkpoint(leftover)
    renamed = leftover.rename(tmp_path / "looks-finished")  # its marker still says "partial"
    with pytest.raises(CheckpointError, match="unfinished write"):
        build(renamed)
    with pytest.raises(CheckpointError, match="unfinished write"):
        open_checkpoint([hf_source, renamed])


def test_the_next_run_removes_a_killed_runs_leftovers_saying_their_size(tmp_path, hf_source, caplog):
    out = tmp_path / "out"
    leftover = killed_writer(out)
    with caplog.at_level(logging.INFO, logger="llama_int8.formats.writing"):
        write_prebaked(open_checkpoint(hf_source), out, INT8)
    assert not leftover.exists() and siblings(tmp_path) == ["out"]
    assert any(str(leftover) in r.message and "2.9 MiB" in r.message for r in caplog.records)


def test_leftovers_of_another_machine_are_reported_with_their_size_and_kept(tmp_path, hf_source, caplog):
    out = tmp_path / "out"
    other = tmp_path / ".out.partial-1-abcd"
    other.mkdir()
    (other / MARKER_NAME).write_text(json.dumps({"written_by": "llama_int8", "kind": "prebaked", "state": "partial",
                                                 "pid": 1, "host": socket.gethostname() + "-elsewhere"}))
    (other / "x").write_bytes(b"0" * 2_000_000)
    with caplog.at_level(logging.WARNING, logger="llama_int8.formats.writing"):
        write_prebaked(open_checkpoint(hf_source), out, INT8)
    assert other.exists() and read_manifest(out).quant.name == "int8"
    assert any(str(other) in r.message and "1.9 MiB" in r.message for r in caplog.records)


def test_a_replacement_failing_midway_leaves_the_old_folder_byte_for_byte(baked, hf_source, tmp_path, monkeypatch):
    out = copy_folder(baked, tmp_path / "out")
    before = folder_bytes(out)
    real, calls = prebaked.quantize_weight, []

    def fail_late(weight, cfg):
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("disk full")
        return real(weight, cfg)

    monkeypatch.setattr(prebaked, "quantize_weight", fail_late)
    with pytest.raises(RuntimeError, match="disk full"):
        write_prebaked(open_checkpoint(hf_source), out, parse_quant_mode("nf4"), force=True)
    assert folder_bytes(out) == before and siblings(tmp_path) == ["out"]


def test_a_failing_final_rename_puts_the_old_folder_back_byte_for_byte(baked, hf_source, tmp_path, monkeypatch):
    out = copy_folder(baked, tmp_path / "out")
    before = folder_bytes(out)
    real = writing.rename_no_replace

    def refuse_the_new_folder(src: Path, dst: Path) -> None:
        if ".partial-" in src.name:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(writing, "rename_no_replace", refuse_the_new_folder)
    with pytest.raises(WriteError, match="nothing was changed"):
        write_prebaked(open_checkpoint(hf_source), out, parse_quant_mode("nf4"), force=True)
    assert folder_bytes(out) == before and siblings(tmp_path) == ["out"]


def test_an_uncreatable_parent_is_one_readable_line(hf_source, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(WriteError) as info:
        write_prebaked(open_checkpoint(hf_source), tmp_path / "a-file" / "out", INT8)
    message = str(info.value)
    assert isinstance(info.value, OSError) and "\n" not in message
    assert message.startswith(str(tmp_path / "a-file")) and "cannot create" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_one_readable_line(hf_source, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    with pytest.raises(WriteError, match="cannot create .*Permission denied"):
        write_prebaked(open_checkpoint(hf_source), parent / "out", INT8)


# --- 2. File names from checkpoint metadata ---------------------------------------------------------

def sharded_copy(model, sp_model, folder: Path) -> Path:
    return write_hf_folder(model, folder, sharded=True, tokenizer=sp_model)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_index_entries_outside_the_folder_are_refused_naming_them(model, sp_model, tmp_path, entry):
    folder = sharded_copy(model, sp_model, tmp_path / "m")
    first = sorted(folder.glob("model-*.safetensors"))[0]
    (tmp_path / "outside.safetensors").write_bytes(first.read_bytes())
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    index = folder / "model.safetensors.index.json"
    edit_json(index, lambda d: d["weight_map"].update({next(iter(d["weight_map"])): entry}))
    with pytest.raises(CheckpointError, match="outside") as info:
        build(folder)
    assert repr(entry) in str(info.value) and str(index) in str(info.value)
    with pytest.raises(CheckpointError, match="outside"):  # an overlay's index too
        open_checkpoint([write_hf_folder(model, tmp_path / "base", tokenizer=sp_model), folder])


def test_hub_cache_snapshots_link_into_their_blobs_and_load(model, sp_model, tmp_path):
    repo = tmp_path / "models--org--tiny"
    source = sharded_copy(model, sp_model, tmp_path / "plain")
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    assert torch.equal(build(snapshot).model.norm.weight, build(source).model.norm.weight)


@pytest.mark.parametrize("entry", ["../quantized-00001.safetensors", "/tmp/quantized-00001.safetensors"])
def test_prebaked_shard_names_outside_the_folder_are_refused(baked, tmp_path, entry):
    folder = copy_folder(baked, tmp_path / "copy")

    def point_outside(d):
        d["shards"] = {entry: d["shards"]["quantized-00001.safetensors"]}
        for e in d["tensors"].values():
            e["shard"] = entry

    edit_json(folder / MANIFEST_NAME, point_outside)
    with pytest.raises(CheckpointError, match="outside") as info:
        read_manifest(folder)
    assert repr(entry) in str(info.value)


# --- 3. Integrity of pre-baked folders -------------------------------------------------------------

def test_a_shard_swapped_from_another_bake_of_the_same_shapes_is_refused(baked, sp_model, tmp_path):
    other_source = write_hf_folder(tiny_hf_model(seed=6, **SHAPES), tmp_path / "other", tokenizer=sp_model)
    other = write_prebaked(open_checkpoint(other_source), tmp_path / "other-int8", INT8)
    folder = copy_folder(baked, tmp_path / "copy")
    shard = folder / "quantized-00001.safetensors"
    shard.write_bytes((other / "quantized-00001.safetensors").read_bytes())  # same names, shapes and dtypes
    with pytest.raises(CheckpointError, match="changed or replaced") as info:
        build(folder)
    assert str(shard) in str(info.value) and "SHA-256" in str(info.value)
    swapped = build(folder, verify=False)  # the escape hatch loads it as it is
    assert torch.equal(swapped.model.norm.weight, build(other).model.norm.weight)


def test_manifest_records_a_size_and_checksum_per_shard(baked):
    data = json.loads((baked / MANIFEST_NAME).read_text())
    shard = baked / "quantized-00001.safetensors"
    assert data["shards"] == {shard.name: {"bytes": shard.stat().st_size,
                                           "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}}


def test_a_version_1_folder_is_refused_with_advice(baked, tmp_path):
    folder = copy_folder(baked, tmp_path / "v1")
    edit_json(folder / MANIFEST_NAME, lambda d: (d.update(format_version=1), d.pop("shards")))
    with pytest.raises(CheckpointError, match="format version 1, but this llama_int8 reads version 2; quantize"):
        build(folder)


def test_a_version_1_folder_without_a_marker_can_be_replaced_with_force(baked, hf_source, tmp_path):
    folder = copy_folder(baked, tmp_path / "v1")
    (folder / MARKER_NAME).unlink()
    edit_json(folder / MANIFEST_NAME, lambda d: (d.update(format_version=1), d.pop("shards")))
    with pytest.raises(FileExistsError, match="--force"):
        write_prebaked(open_checkpoint(hf_source), folder, INT8)
    write_prebaked(open_checkpoint(hf_source), folder, INT8, force=True)
    assert read_manifest(folder).quant.name == "int8"


def test_a_shard_without_a_checksum_is_refused(baked, tmp_path):
    folder = copy_folder(baked, tmp_path / "copy")
    edit_json(folder / MANIFEST_NAME, lambda d: d.update(shards={}))
    with pytest.raises(CheckpointError, match="quantized-00001.safetensors"):
        read_manifest(folder)


# --- 4. Configuration, memory, shards, values and tokenizers, before anything is built --------------

@pytest.mark.parametrize("edits, needle", [
    ({"num_hidden_layers": 2_000_000}, "num_hidden_layers=2000000: expected an integer from 1 to"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers=2.0: expected an integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers=True: expected an integer"),
    ({"num_attention_heads": "4"}, "num_attention_heads='4': expected an integer"),
    ({"num_attention_heads": 0}, "num_attention_heads=0"),
    ({"num_attention_heads": 6, "head_dim": None}, "hidden_size=64 is not a multiple of num_attention_heads=6"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"hidden_size": -64}, "hidden_size=-64"),
    ({"vocab_size": None}, "vocab_size=None"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps=-1e-05: expected a finite number"),
    ({"rope_theta": float("nan")}, "rope_theta=nan"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes': expected true or false"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling of type 'linear' lacks factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "rope_scaling.factor=-2.0"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "high_freq_factor=4.0 must exceed"),
    ({"rope_scaling": "linear"}, "rope_scaling='linear': expected an object"),
    ({"head_dim": 15}, "head_dim=15: rotary embeddings need an even head size"),
])
def test_bad_config_json_values_name_the_file_key_and_value(hf_copy, edits, needle):
    edit_json(hf_copy / "config.json", lambda d: d.update(edits))
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        build(hf_copy)
    assert time.perf_counter() - start < 5
    assert str(hf_copy / "config.json") in str(info.value) and needle in str(info.value), str(info.value)


@pytest.mark.parametrize("params, needle", [
    ({"n_layers": 10**6}, "n_layers=1000000"),
    ({"dim": "64"}, "dim='64'"),
    ({"n_heads": 0}, "n_heads=0"),
    ({"use_scaled_rope": "true"}, "use_scaled_rope='true': expected true or false"),
    ({"ffn_dim_multiplier": 0}, "ffn_dim_multiplier=0"),
    ({"multiple_of": 0}, "multiple_of=0"),
])
def test_bad_params_json_values_name_the_file_key_and_value(model, sp_model, tmp_path, params, needle):
    folder = write_meta_folder(model, tmp_path / "m", tokenizer=sp_model, params_extra=params)
    with pytest.raises(CheckpointError) as info:
        build(folder)
    assert str(folder / "params.json") in str(info.value) and needle in str(info.value), str(info.value)


def test_a_json_config_that_is_not_an_object_is_refused(hf_copy):
    (hf_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object, got list"):
        build(hf_copy)


@pytest.mark.parametrize("edit, needle", [
    (lambda w: w.add_block_count(3_000_000), "llama.block_count=3000000"),
    (lambda w: w.add_head_count_kv(3), "llama.attention.head_count=4 is not a multiple of "
                                       "llama.attention.head_count_kv=3"),
])
def test_bad_gguf_metadata_names_the_file_key_and_value(tmp_path, edit, needle):
    import gguf

    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_vocab_size(128)
    edit(writer)
    if "block_count" not in needle:
        writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value) and needle in str(info.value), str(info.value)


def test_a_prebaked_manifest_config_is_checked_like_any_other(baked, tmp_path):
    folder = copy_folder(baked, tmp_path / "copy")
    edit_json(folder / MANIFEST_NAME, lambda d: d["model"].update(n_kv_heads=3))
    with pytest.raises(CheckpointError, match=r"model.n_heads=4 is not a multiple of model.n_kv_heads=3"):
        read_manifest(folder)


def test_a_kv_cache_beyond_free_memory_is_refused_before_allocating(hf_source):
    start = time.perf_counter()
    with pytest.raises(NotEnoughMemoryError) as info:
        build(hf_source, max_seq_len=10**10, max_batch_size=64)
    message = str(info.value)
    assert time.perf_counter() - start < 10
    assert "--max_seq_len 10000000000" in message and "--max_batch_size 64" in message
    assert "bytes in all" in message and "are free" in message and "lower --max_seq_len" in message
    assert isinstance(info.value, ValueError)  # the command lines print it as one line


def test_weights_beyond_free_memory_are_refused_before_loading(hf_source, monkeypatch):
    from llama_int8 import loader

    monkeypatch.setattr(loader, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(NotEnoughMemoryError, match="1000 bytes .* are free; the weights alone do not fit"):
        build(hf_source, quant="int8")


def test_a_gap_in_the_meta_shard_numbers_names_the_missing_shard(model, sp_model, tmp_path):
    folder = write_meta_folder(model, tmp_path / "m", n_shards=4, tokenizer=sp_model)
    (folder / "consolidated.02.pth").unlink()
    with pytest.raises(CheckpointError, match=r"shard consolidated.02.pth is missing \(found 3 shards"):
        build(folder)


def poisoned(folder: Path, key: str, value: float, index=(0, 0)) -> Path:
    tensors = load_file(folder / "model.safetensors")
    tensors[key][index] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"])
def test_nan_or_inf_in_a_weight_is_refused_naming_tensor_and_file(hf_copy, quant, value, key):
    folder = poisoned(hf_copy, key, value, (3, 5))
    with pytest.raises(CheckpointError, match="NaN or infinite") as info:
        build(folder, quant=quant)
    name = "layers.1.feed_forward.w2.weight" if "down_proj" in key else "tok_embeddings.weight"
    assert repr(name) in str(info.value) and str(folder / "model.safetensors") in str(info.value)


def test_nan_in_a_norm_is_refused_by_the_writer_too(hf_copy, tmp_path):
    folder = poisoned(hf_copy, "model.layers.0.input_layernorm.weight", float("nan"), (2,))
    with pytest.raises(CheckpointError, match="'layers.0.attention_norm.weight' holds 1 NaN"):
        write_prebaked(open_checkpoint(folder), tmp_path / "out", INT8)
    assert not (tmp_path / "out").exists()


def test_a_delta_that_overflows_is_refused_naming_both_files(hf_copy, tmp_path):
    big = torch.full((64,), 3e38)
    poisoned(hf_copy, "model.norm.weight", 3e38, (0,))
    delta = tmp_path / "delta"
    delta.mkdir()
    save_file({"model.norm.weight": big}, delta / "model.safetensors")
    with pytest.raises(CheckpointError, match="'norm.weight' holds") as info:
        build(hf_copy, delta=[delta])
    assert str(hf_copy / "model.safetensors") in str(info.value) and str(delta) in str(info.value)


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"])
def test_an_integer_tensor_where_a_float_weight_belongs_is_refused(hf_copy, quant, key):
    tensors = load_file(hf_copy / "model.safetensors")
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, hf_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="is int32, expected a floating-point weight") as info:
        build(hf_copy, quant=quant)
    assert str(hf_copy / "model.safetensors") in str(info.value)


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(model, hf_copy, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"w{i}": i for i in range(200)}
    Tokenizer(WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="ids up to 199, but the model .* has 128 embedding rows"):
        build(hf_copy, tokenizer_path=tmp_path / "tokenizer.json")


def test_a_tokenizer_smaller_than_padded_embeddings_logs_one_line(model, sp_model, tmp_path, caplog):
    padded = tiny_hf_model(seed=5, **{**SHAPES, "vocab_size": 160})
    folder = write_hf_folder(padded, tmp_path / "padded", tokenizer=sp_model)
    with caplog.at_level(logging.INFO, logger="llama_int8.tokenizer"):
        build(folder)
    lines = [r.message for r in caplog.records if "padded" in r.message]
    assert len(lines) == 1 and "128 ids" in lines[0] and "160 embedding rows" in lines[0]


# --- 5. Generation arguments -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(hf_source) -> Llama:
    return build(hf_source, max_seq_len=48, max_batch_size=3)


@pytest.fixture
def no_model_work(llm, monkeypatch):
    """Any forward of the model fails the test: the checks come first."""
    def forward(*args, **kwargs):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(llm.model, "forward", forward)


BAD_SAMPLING = [
    (dict(temperature=-0.1), "temperature: expected a number >= 0"),
    (dict(temperature=float("nan")), "temperature: expected a number"),
    (dict(temperature="0.5"), "temperature: expected a number"),
    (dict(top_p=0.0), r"top_p: expected a number in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_gen_len=-1), "max_gen_len: expected an integer >= 0"),
    (dict(max_gen_len=2.5), "max_gen_len: expected an integer"),
    (dict(repetition_penalty=0.0), "repetition_penalty: expected a number > 0"),
    (dict(repetition_penalty=-1.2), "repetition_penalty"),
    (dict(seed=1.5), "seed: expected an integer"),
    (dict(seed="7"), "seed: expected an integer"),
    (dict(seed=True), "seed: expected an integer"),
    (dict(seed=2**64), "seed: expected an integer from"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SAMPLING)
def test_bad_sampling_arguments_are_refused_by_name_in_every_method(llm, no_model_work, kwargs, message):
    dialog = [{"role": "user", "content": "Hi"}]
    calls = [lambda: llm.text_completion(["The fox"], **kwargs),
             lambda: llm.chat_completion([dialog], **kwargs),
             lambda: llm.generate([[1, 5, 6]], **kwargs),
             lambda: list(llm.stream_completion("The fox", **kwargs)),
             lambda: list(llm.stream_chat(dialog, **kwargs))]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("prompts, message", [
    ("The quick brown fox", r"prompts: expected a list of strings, got str; wrap one in a list"),
    ([], "prompts: expected a list of strings, got an empty list"),
    ([1, 2], r"prompts\[0\]: expected a string, got int"),
    (["fine", "bad \ud800 text"], r"prompts\[1\]: not valid text: a lone surrogate '\\ud800' at character 4"),
    (None, "prompts: expected a list of strings, got NoneType"),
])
def test_bad_prompts_are_refused_before_any_model_work(llm, no_model_work, prompts, message):
    with pytest.raises(ValueError, match=message):
        llm.text_completion(prompts, max_gen_len=4)


def test_a_bad_streamed_prompt_is_refused(llm, no_model_work):
    with pytest.raises(ValueError, match="prompt: expected a string"):
        list(llm.stream_completion(["a list"]))
    with pytest.raises(ValueError, match="prompt: not valid text"):
        list(llm.stream_completion("\udcff"))


@pytest.mark.parametrize("dialogs, message", [
    ([{"role": "user", "content": "Hi"}], "dialogs: expected a list of dialogs, got a list of messages; wrap"),
    ("Hi", "dialogs: expected a list of dialogs"),
    ([[{"role": "robot", "content": "Hi"}]], r"dialogs\[0\]: message 0: unknown role 'robot'"),
    ([[{"role": "user", "content": "a"}], [{"role": "assistant", "content": "b"}]],
     r"dialogs\[1\]: message 0: expected role 'user'"),
    ([[{"role": "user", "content": 5}]], r"dialogs\[0\]: message 0: expected a dict"),
    ([[{"role": "user", "content": "bad \ud800"}]], r"dialogs\[0\]\[0\]\['content'\]: not valid text"),
])
def test_bad_dialogs_are_refused_before_any_model_work(llm, no_model_work, dialogs, message):
    with pytest.raises(ValueError, match=message):
        llm.chat_completion(dialogs, max_gen_len=4)


@pytest.mark.parametrize("prompt_tokens, message", [
    ([[1, 500]], r"prompt_tokens\[0\]\[1\]: expected a token id from 0 to 127"),
    ([[1, -1]], r"prompt_tokens\[0\]\[1\]"),
    ([[1, 2.0]], r"prompt_tokens\[0\]\[1\]"),
    ([[1, 2], "ab"], r"prompt_tokens\[1\]: expected a list of token ids, got str"),
    ([], "prompt_tokens: no prompts given"),
])
def test_bad_prompt_tokens_are_refused_before_any_model_work(llm, no_model_work, prompt_tokens, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt_tokens, max_gen_len=4)


def test_bad_stop_ids_are_refused(llm, no_model_work):
    with pytest.raises(ValueError, match=r"stop_ids\[0\]: expected a token id"):
        llm.generate([[1, 2]], max_gen_len=4, stop_ids=[999])
    with pytest.raises(ValueError, match="stop_ids: expected a collection of token ids, got int"):
        llm.generate([[1, 2]], max_gen_len=4, stop_ids=2)


def test_max_gen_len_zero_yields_no_token_for_every_prompt(llm, no_model_work):
    prompts = [[1, 5, 6, 7, 8, 9], [1, 5], [1, 9, 9]]  # of different lengths: the shorter ones used to emit
    assert llm.generate(prompts, max_gen_len=0, stop_ids=()) == [[], [], []]
    assert list(llm.iter_generate(prompts, max_gen_len=0)) == []
    assert llm.text_completion(["a", "the quick brown fox"], max_gen_len=0) == [
        {"generation": "", "tokens": []}, {"generation": "", "tokens": []}]
    assert llm.chat_completion([[{"role": "user", "content": "Hi"}]], max_gen_len=0)[0]["tokens"] == []
    assert "".join(llm.stream_completion("The fox", max_gen_len=0)) == ""


def test_max_gen_len_one_yields_one_token_for_every_prompt(llm):
    prompts = [[1, 5, 6, 7, 8, 9], [1, 5], [1, 9, 9]]
    assert [len(t) for t in llm.generate(prompts, max_gen_len=1, temperature=0, stop_ids=())] == [1, 1, 1]


def test_a_tiny_temperature_samples_greedily_instead_of_overflowing(llm):
    greedy = llm.generate([[1, 30, 31]], max_gen_len=6, temperature=0, stop_ids=())
    assert llm.generate([[1, 30, 31]], max_gen_len=6, temperature=1e-39, seed=3, stop_ids=()) == greedy


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_seq_len="512"), "max_seq_len: expected an integer >= 2, got '512'"),
    (dict(max_seq_len=1), "max_seq_len: expected an integer >= 2, got 1"),
    (dict(max_batch_size=1.5), "max_batch_size: expected an integer >= 1"),
    (dict(sliding_window=0), "sliding_window: expected an integer >= 1"),
])
def test_bad_build_sizes_are_refused_by_name(hf_source, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(hf_source, **kwargs)
