"""The prepared GPU check, on the CPU: its runner (a part that fails, runs out of time or cannot run is
recorded and the others run on), its report's sections from what the benchmarks print, a dry run
through the real command, and what benchmarks.gpu_carry gathers for a machine without a registry.
`python -m benchmarks.gpu_check --device cpu --tiny` runs every part; the dry run here runs one, since
each part's process spends seconds importing torch and bitsandbytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import gpu_carry, gpu_check
from benchmarks.common import report
from llama_int8.formats.gguf_file import GGUFCheckpoint
from test_gguf import write_tiny_gguf

REPO = Path(__file__).resolve().parent.parent


def step(label: str, code: str, budget_s: float = 60) -> gpu_check.Step:
    return gpu_check.Step(label, ("-c", code), budget_s)


def part(name: str, *steps: gpu_check.Step, needs: tuple[str, ...] = ()) -> gpu_check.Part:
    return gpu_check.Part(name, f"Part {name}", needs, steps, lambda results: f"{name} rendered")


def printed_json(capsys, rows: list[dict], extra: dict | None = None) -> gpu_check.StepResult:
    """What a benchmark's --json prints, as the step that ran it saw it."""
    report("title", rows, True, extra)
    return gpu_check.StepResult(step("x", ""), "passed", 1.0, capsys.readouterr().out)


# --- The runner -----------------------------------------------------------------------------------

def test_a_part_that_fails_times_out_or_cannot_run_is_recorded_and_the_others_run():
    parts = [part("fails", step("boom", "import sys; print('partial output'); sys.exit('boom: the reason')")),
             part("slow", step("sleeps", "import time; time.sleep(30)", budget_s=1)),
             part("missing", step("never", "print(1)"), needs=("no_such_module_anywhere",)),
             part("after", step("one", "print('ran')"), step("two", "print('ran too')"))]
    results = gpu_check.run_parts(parts, dict(os.environ), budget_s=60)
    assert [r.status for r in results] == [
        "failed (exit 1)", "timed out after 1 s",
        "not run: needs no_such_module_anywhere, not installed (see benchmarks/gpu_carry.py)", "passed"]
    failed = gpu_check.part_section(results[0])
    assert "## Part fails" in failed and "boom: the reason" in failed and "partial output" in failed
    assert results[3].steps[1].stdout.strip() == "ran too"


def test_no_step_outlasts_the_checks_budget():
    parts = [part("first", step("sleeps", "import time; time.sleep(30)")), part("second", step("late", "print(1)"))]
    results = gpu_check.run_parts(parts, dict(os.environ), budget_s=gpu_check.REPORT_RESERVE_S + 2)
    assert results[0].status == "timed out after 2 s"
    assert results[1].status == "not run: the check's time budget is spent"


# --- Sections from the benchmarks' output ---------------------------------------------------------

def test_benchmark_tables_and_their_notes_reach_the_report(capsys):
    speed = printed_json(capsys, [{"engine": "llama_int8", "quant": "int8", "batch": 1, "decode tok/s": 50.0}],
                         {"copy_bandwidth_gbps": 4300.0, "decode_read_bytes": 2_000_000})
    text = gpu_check.render_speed([speed])
    assert "| llama_int8 | int8 | 1 | 50 |" in text and "4300 GB/s" in text and "2.0 MB" in text
    vram = printed_json(capsys, [{"model": "7B (4 blocks)", "quant": "nf4", "weight bytes": 1, "kv bytes": 2,
                                  "prefill over held MiB": 90.5}])
    text = gpu_check.render_vram([vram])
    assert "prefill over held MiB" in text and "weight bytes" not in text
    agreement = printed_json(capsys, [{"case": "none:float32", "agrees": "yes"}],
                             {"reference": "cpu float32", "prompt": "Hi"})
    assert "| none:float32 | yes |" in gpu_check.render_agreement([agreement])
    assert gpu_check.render_speed([gpu_check.StepResult(step("x", ""), "failed (exit 1)", stdout="Traceback")]) == ""


def test_test_outcomes_come_from_pytests_junit_report(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite name="pytest">'
                     '<testcase classname="tests.test_gpu" name="test_a"/>'
                     '<testcase classname="tests.test_gpu" name="test_b"><failure message="assert 3 | 4&#10;more"/>'
                     '</testcase><testcase classname="tests.test_gpu" name="test_c"><skipped message="no flash"/>'
                     '</testcase></testsuite></testsuites>')
    text = gpu_check.render_tests(junit)([])
    assert text.startswith("1 passed, 1 failed, 1 skipped.")
    assert "| tests.test_gpu::test_b | FAILED | assert 3 \\| 4 |" in text
    assert "| tests.test_gpu::test_c | skipped | no flash |" in text


# --- The real command, dry --------------------------------------------------------------------------

def test_a_dry_run_on_the_cpu_writes_and_prints_the_report(tmp_path):
    path = tmp_path / "report.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--tiny", "--parts",
                           "agreement", "--report", str(path), "--carried", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    text = path.read_text()
    assert text in done.stdout
    for line in ("# GPU check", "| torch | ", "| CUDA (torch built for) | ", "| GPUs | ", "| bitsandbytes | ",
                 "| bitsandbytes native library | ", "## Summary", "| agreement | passed |",
                 "## Agreement of cpu with the CPU", "| cpu | none:float32 | float32 | 4/4 |"):
        assert line in text, line
    assert "## GPU tests" not in text  # only the parts asked for


# --- What travels to a machine without a registry -------------------------------------------------

def test_gathered_packages_keep_their_files_and_only_the_cuda_libraries_asked_for(tmp_path):
    gpu_carry.copy_installed("bitsandbytes", tmp_path, ("130",))
    libraries = sorted(p.name for p in (tmp_path / "bitsandbytes").glob("libbitsandbytes_*.so"))
    assert libraries == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    assert (tmp_path / "bitsandbytes" / "nn" / "modules.py").is_file()
    assert list(tmp_path.glob("bitsandbytes-*.dist-info/METADATA"))
    assert not list(tmp_path.rglob("__pycache__"))


def test_a_cut_gguf_holds_the_first_blocks_byte_for_byte(tmp_path):
    source = write_tiny_gguf(tmp_path / "two.gguf", qtype="Q8_0")
    cut = GGUFCheckpoint(gpu_carry.cut_gguf(source, tmp_path / "one.gguf", blocks=1))
    assert cut.args.n_layers == 1
    original = {t.name: t.tensor for t in GGUFCheckpoint(source).tensors()}
    kept = {t.name: t.tensor for t in cut.tensors()}
    assert set(kept) == {n for n in original if not n.startswith("layers.1.")}
    assert all(torch.equal(t, original[name]) for name, t in kept.items())
