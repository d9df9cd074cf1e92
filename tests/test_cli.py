"""The command lines: the shared flags of llama_int8/cli.py and flags.py, and example.py / quantize_offline.py run as a
user runs them. A bad flag must be refused before torch is imported, with one line and exit code 2; a
user error found later is one line and exit code 1; --help is one line per flag on stdout."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_int8 import cli, flags

from conftest import tiny_hf_model, write_meta_folder

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("example.py", "quantize_offline.py", "-m llama_int8.demo")


def full_parser() -> argparse.ArgumentParser:
    parser = flags.make_parser("test", "All the shared flags.")
    cli.add_checkpoint_flags(parser)
    cli.add_runtime_flags(parser)
    cli.add_sampling_flags(parser)
    flags.add_switch(parser, "--chat", "a switch")
    return parser


def run_script(script: str, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """script as a user runs it from the checkout: `example.py`, or `-m module`."""
    return subprocess.run([sys.executable, *script.split(), *flags], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def tiny_meta(tmp_path_factory, sp_model) -> Path:
    return write_meta_folder(tiny_hf_model(vocab_size=128), tmp_path_factory.mktemp("cli") / "tiny", tokenizer=sp_model)


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict[str, str]:
    """An environment in which importing torch fails loudly: what a flag check must never need."""
    folder = tmp_path_factory.mktemp("no_torch")
    (folder / "torch").mkdir()
    (folder / "torch" / "__init__.py").write_text("raise ImportError('torch was imported to check a flag')\n")
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


# --- The shared flags -------------------------------------------------------------------------------

def test_defaults_are_the_api_defaults(tmp_path):
    """The CLI and the API share one set of defaults: Llama.build's and text_completion's."""
    from llama_int8 import Llama

    args = full_parser().parse_args(["--ckpt_dir", str(tmp_path)])
    build = inspect.signature(Llama.build).parameters
    for name, value in cli.build_kwargs(args).items():
        assert name in build, name
        if name not in ("ckpt_dir", "int8_threshold"):  # None: 6.0, or a pre-baked folder's own
            assert build[name].default == value, name
    completion = inspect.signature(Llama.text_completion).parameters
    for name, value in cli.sampling_kwargs(args).items():
        assert name in completion, name
        if name not in ("max_gen_len", "seed"):  # the CLI bounds an answer and seeds it, so a run repeats
            assert completion[name].default == value, name


def test_the_demo_model_gets_its_repetition_penalty(tmp_path):
    assert cli.sampling_kwargs(full_parser().parse_args([]))["repetition_penalty"] == cli.DEMO_REPETITION_PENALTY
    given = full_parser().parse_args(["--repetition_penalty", "1"])
    assert cli.sampling_kwargs(given)["repetition_penalty"] == 1.0


def test_accepted_names_are_the_packages():
    """cli.py repeats the names its checks accept, to check them without torch: they must not drift."""
    import torch

    from llama_int8.generation import resolve_dtype
    from llama_int8.model import ATTENTION_BACKENDS
    from llama_int8.quantize import QUANT_MODES
    from llama_int8.quantized_layers import INT8_MATMULS

    assert cli.QUANT_MODES == QUANT_MODES
    assert cli.INT8_MATMULS == INT8_MATMULS
    assert sorted(cli.ATTENTION_BACKENDS) == sorted(ATTENTION_BACKENDS)
    for name in cli.DTYPES:
        resolve_dtype(name, torch.device("cpu"))


def test_shard_size_default_is_the_writers():
    spec = importlib.util.spec_from_file_location("quantize_offline", REPO / "quantize_offline.py")
    quantize_offline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quantize_offline)
    from llama_int8.formats.prebaked import SHARD_BYTES

    assert quantize_offline.SHARD_SIZE_GB * 1024**3 == SHARD_BYTES


def test_fire_spellings_still_parse(tmp_path):
    a, b, comma = tmp_path / "a", tmp_path / "b", tmp_path / "c,d"
    for folder in (a, b, comma):
        folder.mkdir()
    parse = full_parser().parse_args
    assert parse([f"--ckpt_dir=[{a},{b}]"]).ckpt_dir == [str(a), str(b)]
    assert parse(["--ckpt_dir", f"{a}, {b}"]).ckpt_dir == [str(a), str(b)]
    assert parse(["--ckpt_dir", f"['{a}','{b}']"]).ckpt_dir == [str(a), str(b)]
    assert parse(["--ckpt_dir", str(a)]).ckpt_dir == str(a)
    assert parse(["--ckpt_dir", str(comma)]).ckpt_dir == str(comma)  # an existing path is one path
    assert parse(["--max_batch_size=1"]).max_batch_size == 1
    assert parse(["--quantize_head"]).quantize_head is True
    assert parse(["--quantize_head", "false"]).quantize_head is False
    assert parse(["--quantize_head=True", "--chat"]).chat is True
    assert parse([]).quantize_head is None  # Llama.build quantizes it in the quantized modes


@pytest.mark.parametrize("flags, expected", [
    (["--ckpt_dir", "nowhere"], "--ckpt_dir: nowhere: no such file or folder"),
    (["--ckpt_dir", "[nowhere,]"], "--ckpt_dir: expected a path or comma-separated paths"),
    (["--quant", "int9"], "--quant: expected one of int8, nf4"),
    (["--dtype", "float8"], "--dtype: invalid choice"),
    (["--attention", "fast"], "--attention: invalid choice"),
    (["--int8_matmul", "fast"], "--int8_matmul: invalid choice"),
    (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N"),
    (["--max_seq_len", "0"], "--max_seq_len: expected an integer >= 1"),
    (["--max_batch_size", "two"], "--max_batch_size: expected an integer, got 'two'"),
    (["--temperature", "-1"], "--temperature: expected a number >= 0"),
    (["--top_p", "1.5"], "--top_p: expected a number in (0, 1]"),
    (["--repetition_penalty", "nan"], "--repetition_penalty: expected a finite number"),
    (["--quantize_head", "maybe"], "--quantize_head: expected true or false"),
    (["--max_seq_le", "64"], "unrecognized arguments: --max_seq_le 64; did you mean --max_seq_len?"),
    (["--max_seq", "64"], "unrecognized arguments"),  # no abbreviations
])
def test_bad_flags_are_one_line_and_exit_2(flags, expected, capsys):
    with pytest.raises(SystemExit) as e:
        full_parser().parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("test: error: ") and expected in err, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_cuda_without_a_gpu_is_refused_before_loading(capsys):
    with pytest.raises(SystemExit) as e:
        flags.parse_flags(full_parser(), ["--device", "cuda"])
    assert e.value.code == 2
    assert "--device: cuda asked for, but torch" in capsys.readouterr().err


def raise_in_main(error: BaseException):
    def main(args: argparse.Namespace) -> None:
        raise error
    return main


@pytest.mark.parametrize("error", [ValueError("--max_seq_len 8 leaves no room"), FileExistsError("out exists"),
                                   PermissionError("read-only folder")])
def test_user_errors_are_one_line_and_exit_1(error, capsys, monkeypatch):
    monkeypatch.delenv(flags.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        flags.run_cli(flags.make_parser("test", "x"), raise_in_main(error), [])
    assert e.value.code == 1
    assert capsys.readouterr().err == f"test: error: {error}\n"


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.delenv(flags.DEBUG_ENV, raising=False)
    with pytest.raises(ValueError):
        flags.run_cli(flags.make_parser("test", "x"), raise_in_main(ValueError("bad")), ["--debug"])
    monkeypatch.setenv(flags.DEBUG_ENV, "1")
    with pytest.raises(ValueError):
        flags.run_cli(flags.make_parser("test", "x"), raise_in_main(ValueError("bad")), [])


def test_a_bug_is_not_hidden(monkeypatch):
    monkeypatch.delenv(flags.DEBUG_ENV, raising=False)
    with pytest.raises(TypeError):
        flags.run_cli(flags.make_parser("test", "x"), raise_in_main(TypeError("a bug")), [])


# --- The scripts, as a user runs them ------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_one_line_per_flag_on_stdout(script, no_torch):
    done = run_script(script, "--help", env=no_torch)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("usage: ") and lines[0].endswith(" [flags]")
    flag_lines = [line for line in lines if line.startswith("  ")]
    assert all(line.startswith("  --") or line.startswith("  -h, --help") for line in flag_lines), flag_lines
    assert all("(default" in line or "(required)" in line for line in flag_lines[1:]), flag_lines


@pytest.mark.parametrize("script, flags, expected", [
    ("example.py", ["--max_gen_le", "8"], "did you mean --max_gen_len?"),
    ("example.py", ["--prompt", ""], "--prompt: expected text"),
    ("example.py", ["--ckpt_dir", "no/such/model"], "--ckpt_dir: no/such/model: no such file or folder"),
    ("example.py", ["--quant", "int4"], "--quant: expected one of"),
    ("quantize_offline.py", ["--ckpt_dir", "no/such/model", "--out_dir", "x"], "no such file or folder"),
    ("quantize_offline.py", ["--out_dir", "x"], "the following arguments are required: --ckpt_dir"),
    ("-m llama_int8.demo", ["--fetch", "now"], "--fetch: expected true or false"),
])
def test_bad_flags_fail_before_torch_is_imported(script, flags, expected, no_torch):
    done = run_script(script, *flags, env=no_torch)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
    assert done.stdout == ""


@pytest.mark.skipif(not importlib.metadata.version("torch").endswith("+cpu"), reason="needs a CPU-only torch build")
def test_cuda_with_a_cpu_only_torch_fails_before_torch_is_imported(no_torch):
    done = run_script("example.py", "--device", "cuda", env=no_torch)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "is a CPU-only build" in done.stderr, done.stderr


def test_example_completes_several_prompts(tiny_meta):
    done = run_script("example.py", "--ckpt_dir", str(tiny_meta), "--prompt", "The quick", "--prompt", "Paris is",
                      "--max_gen_len", "3", "--temperature", "0", "--max_seq_len", "32")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The quick") and "\nParis is" in done.stdout
    assert "Traceback" not in done.stderr


def test_quantize_offline_refuses_a_folder_it_did_not_write(tiny_meta, tmp_path):
    """A user error found after the flags (by the writer) is one line and exit code 1, no traceback."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a pre-baked folder")
    done = run_script("quantize_offline.py", "--ckpt_dir", str(tiny_meta), "--out_dir", str(out))
    assert done.returncode == 1, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("quantize_offline.py: error: ") and str(out) in last and "Traceback" not in done.stderr
    assert (out / "notes.txt").read_text() == "not a pre-baked folder"
