"""The prepared check for a GPU: the gpu-marked tests, the vram benchmark's measured table, the speed
benchmark (int8 and nf4 at batch 1 and 8, with the share of memory bandwidth; nf4 with its decode
steps replayed from CUDA graphs and without), and greedy tokens and logits on CUDA against the CPU,
in under 8 minutes, written as one Markdown report.

    python -m benchmarks.gpu_carry                      # once, where a package registry is reachable
    python3 -m benchmarks.gpu_check                     # on the GPU machine, in the working tree's root
    python -m benchmarks.gpu_check --device cpu --tiny  # a dry run of every part on the CPU, in seconds

What the GPU machine needs: torch built for CUDA, pytest, transformers, sentencepiece, tokenizers,
safetensors, tqdm, numpy, pyyaml and jinja2 installed (a CUDA image with torch and transformers has
them), and bitsandbytes, gguf, fire and termcolor, which benchmarks.gpu_carry copies into
.cache/gpu_check/site beside a cut of the demo model small enough to travel: carry that folder with
the working tree. Nothing is installed or fetched here.

Each part runs in a process of its own under a time budget of its own (Settings), within --budget_s
in all. A part whose packages are missing, that fails, or that runs out of time is recorded as such
in the report, with its reason in one line and the end of its output, and the other parts run on.
The report's header names the machine, the GPU and its compute capability, and the versions of torch,
CUDA and bitsandbytes. Exits 1 unless every part passed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from llama_int8.flags import add_switch, make_parser, positive_float, run_cli

REPO = Path(__file__).resolve().parent.parent
CARRIED = Path(".cache/gpu_check")  # benchmarks.gpu_carry's folder
# What the parts import, beyond the standard library.
CORE_NEEDS = ("torch", "bitsandbytes", "safetensors", "tokenizers", "tqdm", "numpy")
OUTPUT_TAIL_LINES = 25  # of a step that did not pass
REPORT_RESERVE_S = 5.0  # of --budget_s, kept for writing the report


@dataclass(frozen=True)
class Settings:
    """What each part runs, and its time budgets in seconds (one per process)."""

    test_paths: tuple[str, ...] = ("tests",)
    tests_s: float = 120
    vram_models: str = "7B"
    vram_blocks: int = 2  # 7B's real layer shapes in 2 of its 32 blocks: real per-layer transients, in seconds
    vram_modes: tuple[str, ...] = ("none", "int8", "nf4")
    vram_seq_len: int = 2048
    vram_measure: bool = True
    vram_s: float = 40
    speed_modes: tuple[str, ...] = ("int8", "nf4")
    speed_batch: str = "1,8"
    speed_prompt_tokens: int = 128
    speed_new_tokens: int = 32
    speed_runs: int = 3
    speed_s: float = 60  # nf4 runs twice: with its decode steps replayed from CUDA graphs and without
    agreement_cases: str = "none:float32,int8:float32,nf4:float32,int8:default"
    agreement_prompt: str = "The capital of France is"
    agreement_new_tokens: int = 32
    agreement_s: float = 90
    describe_s: float = 30


# A dry run: the same parts, each as small as it gets, with budgets for a busy 2-core machine. The
# vram benchmark computes only: measured on the CPU, it samples a child process's host memory, which
# says nothing about the GPU part.
TINY = Settings(test_paths=("tests/test_gpu.py",), tests_s=90, vram_models="SmolLM2-135M", vram_blocks=1,
                vram_modes=("int8",), vram_seq_len=64, vram_measure=False, vram_s=90, speed_modes=("nf4",),
                speed_batch="1,2", speed_prompt_tokens=8, speed_new_tokens=8, speed_runs=1, speed_s=120,
                agreement_cases="none:float32,int8:default", agreement_prompt="w5 w6 w7 w8",
                agreement_new_tokens=4, agreement_s=120, describe_s=60)


# --- Parts and steps ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    label: str
    argv: tuple[str, ...]  # what follows the Python interpreter
    budget_s: float


@dataclass
class StepResult:
    step: Step
    status: str  # "passed", "failed (exit N)", "timed out after N s", "not run: why"
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Part:
    name: str  # as --parts spells it
    title: str
    needs: tuple[str, ...]  # modules its processes import
    steps: tuple[Step, ...]
    render: Callable[[list[StepResult]], str]  # Markdown from what its steps printed
    unavailable: str | None = None  # why it cannot run at all, known before it starts


@dataclass
class PartResult:
    part: Part
    steps: list[StepResult] = field(default_factory=list)

    @property
    def status(self) -> str:
        failed = [s for s in self.steps if not s.passed]
        if not failed:
            return "passed"
        if len(self.steps) == 1:
            return failed[0].status
        return "; ".join(f"{s.step.label}: {s.status}" for s in failed)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def budget_s(self) -> float:
        return sum(step.budget_s for step in self.part.steps)


def missing_modules(names: Sequence[str]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def as_text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def run_step(step: Step, env: dict[str, str], seconds_left: float) -> StepResult:
    """Run one step in its own Python process, killed at its budget or at what is left of the check's."""
    budget = min(step.budget_s, seconds_left)
    if budget < 1:
        return StepResult(step, "not run: the check's time budget is spent")
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, *step.argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=budget)
    except subprocess.TimeoutExpired as e:
        return StepResult(step, f"timed out after {budget:.0f} s", time.monotonic() - start, as_text(e.stdout),
                          as_text(e.stderr))
    status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
    return StepResult(step, status, time.monotonic() - start, done.stdout, done.stderr)


def run_parts(parts: Sequence[Part], env: dict[str, str], budget_s: float) -> list[PartResult]:
    """Every step of every part in order, none past the check's deadline; a part that cannot run is
    recorded with its reason and costs nothing."""
    deadline = time.monotonic() + budget_s - REPORT_RESERVE_S
    results = []
    for part in parts:
        result = PartResult(part)
        missing = missing_modules(part.needs)
        why = part.unavailable or (f"needs {', '.join(missing)}, not installed (see benchmarks/gpu_carry.py)"
                                   if missing else None)
        for step in part.steps:
            outcome = (StepResult(step, f"not run: {why}") if why
                       else run_step(step, env, deadline - time.monotonic()))
            print(f"gpu_check: {part.name} {step.label}: {outcome.status} ({outcome.seconds:.0f} s)",
                  file=sys.stderr, flush=True)
            result.steps.append(outcome)
        results.append(result)
    return results


# --- What each part prints, as Markdown ---------------------------------------------------------------

def json_output(result: StepResult) -> dict | None:
    """The JSON object a benchmark printed with --json, or None."""
    text = result.stdout
    if "{" not in text:
        return None
    try:
        return json.loads(text[text.index("{"):])
    except json.JSONDecodeError:
        return None


def rows_table(results: list[StepResult], drop: tuple[str, ...] = ()) -> str:
    from benchmarks.common import markdown_table

    rows = [row for r in results if (out := json_output(r)) for row in out.get("rows", [])]
    if not rows:
        return ""
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in drop]
    return markdown_table(rows, columns)


def render_vram(results: list[StepResult]) -> str:
    return rows_table(results, drop=("weight bytes", "kv bytes"))


def render_speed(results: list[StepResult]) -> str:
    lines = [rows_table(results)]
    for r in results:
        out = json_output(r)
        if out and "copy_bandwidth_gbps" in out:
            lines.append(f"- {r.step.label}: one large copy moves {out['copy_bandwidth_gbps']:.0f} GB/s; a decode "
                         f"step reads {out['decode_read_bytes'] / 1e6:.1f} MB of weights")
    return "\n\n".join(line for line in lines if line)


def render_agreement(results: list[StepResult]) -> str:
    out = [json_output(r) for r in results]
    notes = [f"Reference: {o['reference']}; prompt {o['prompt']!r}." for o in out if o and "reference" in o]
    return "\n\n".join([rows_table(results), *notes]).strip()


def render_tests(junit: Path) -> Callable[[list[StepResult]], str]:
    def render(results: list[StepResult]) -> str:
        if not junit.is_file():
            return ""
        rows = []
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            outcome, detail = "passed", ""
            for tag, name in (("failure", "FAILED"), ("error", "ERROR"), ("skipped", "skipped")):
                found = case.find(tag)
                if found is not None:
                    message = (found.get("message") or "").strip()
                    outcome, detail = name, message.splitlines()[0][:160] if message else ""
                    break
            rows.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                         "detail": detail.replace("|", "\\|")})
        if not rows:
            return "No test was collected."
        from benchmarks.common import markdown_table

        counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "FAILED", "ERROR", "skipped")}
        summary = ", ".join(f"{n} {o.lower()}" for o, n in counts.items() if n)
        return f"{summary}.\n\n{markdown_table(rows)}"
    return render


# --- The machine ---------------------------------------------------------------------------------------

def describe() -> dict:
    """The machine, its GPUs and the versions that matter, for the report's header (run in a step of its
    own, so that a torch or bitsandbytes that fails to import is reported instead of ending the check)."""
    import platform

    import torch

    from benchmarks.common import machine_description

    info: dict = {"machine": machine_description(), "python": platform.python_version(), "cores": os.cpu_count(),
                  "torch": torch.__version__, "CUDA (torch built for)": torch.version.cuda or "none"}
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(f"cuda:{i} {props.name}, compute capability {props.major}.{props.minor}, "
                    f"{props.total_memory / 1024**3:.0f} GiB, {props.multi_processor_count} multiprocessors")
    info["GPUs"] = "; ".join(gpus) or "none visible to torch"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip() or smi.stderr.strip()
    for name in ("bitsandbytes", "transformers", "gguf", "pytest", "flash_attn"):
        spec = importlib.util.find_spec(name)
        if spec is None:
            info[name] = "not installed"
            continue
        try:
            importlib.import_module(name)
            info[name] = f"{importlib.metadata.version(name)} ({Path(spec.origin).parent.parent})"
        except Exception as e:  # a broken installation is what this step is there to report
            info[name] = f"fails to import: {type(e).__name__}: {e}"
    if "bitsandbytes" in sys.modules:
        lib = vars(sys.modules["bitsandbytes"].cextension.lib).get("_lib")
        info["bitsandbytes native library"] = Path(lib._name).name if lib is not None else "none loaded"
    if torch.cuda.is_available():
        from llama_int8.loader import default_dtype

        info["default dtype on cuda"] = str(default_dtype(torch.device("cuda"))).removeprefix("torch.")
    return info


def header(environment: StepResult, args: argparse.Namespace, checkpoint: str) -> str:
    command = " ".join(["python -m benchmarks.gpu_check", *sys.argv[1:]])
    lines = ["# GPU check", "", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: `{command}`", ""]
    info = json_output(environment)
    if info is None:
        lines.append(f"The machine could not be described: {environment.status}.")
    else:
        from benchmarks.common import markdown_table

        info["checkpoint (speed, agreement)"] = checkpoint
        lines.append(markdown_table([{"": k, " ": v} for k, v in info.items()]))
    return "\n".join(lines)


# --- The check -------------------------------------------------------------------------------------------

def checkpoint_for(args: argparse.Namespace, settings: Settings, scratch: Path) -> tuple[str | None, str]:
    """The checkpoint the speed and agreement parts run on, and a line saying which it is (or why none)."""
    if args.checkpoint:
        return args.checkpoint, args.checkpoint
    if args.tiny:
        from benchmarks.synthetic import write_meta_checkpoint, write_word_tokenizer
        from llama_int8.model import ModelArgs

        folder = scratch / "tiny"
        write_meta_checkpoint(folder, ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                                                hidden_dim=256))
        write_word_tokenizer(folder)
        return str(folder), "a synthetic 2-block checkpoint (benchmarks.synthetic), random weights"
    from llama_int8.demo import demo_gguf_path

    try:
        demo = demo_gguf_path(fetch=False)
        return str(demo), f"{demo} (SmolLM2-135M-Instruct, all 30 blocks)"
    except FileNotFoundError:
        pass
    cuts = sorted(Path(args.carried).glob("*.gguf"))
    if cuts:
        return str(cuts[0]), f"{cuts[0]} (SmolLM2-135M-Instruct cut by benchmarks.gpu_carry)"
    return None, (f"none: neither the demo model nor a cut in {args.carried}; run python -m benchmarks.gpu_carry "
                  "where a registry is reachable and carry that folder, or pass --checkpoint")


def build_parts(args: argparse.Namespace, settings: Settings, checkpoint: str | None, junit: Path) -> list[Part]:
    device = args.target_device
    no_checkpoint = None if checkpoint else "no checkpoint (see the header)"
    vram = tuple(Step(mode, ("-m", "benchmarks.vram", "--models", settings.vram_models, "--n_layers",
                             str(settings.vram_blocks), "--quant", mode, "--max_seq_len", str(settings.vram_seq_len),
                             f"--measure={settings.vram_measure}", "--json"), settings.vram_s)
                 for mode in settings.vram_modes)
    graphs = "false,true" if device.startswith("cuda") else "false"  # each mode with and without, where it can
    speed = tuple(Step(mode, ("-m", "benchmarks.speed", "--ckpt_dir", checkpoint or "", "--quant", mode,
                              "--batch", settings.speed_batch, "--prompt_tokens", str(settings.speed_prompt_tokens),
                              "--new_tokens", str(settings.speed_new_tokens), "--runs", str(settings.speed_runs),
                              "--device", device, "--cuda_graph", graphs, "--json"), settings.speed_s)
                  for mode in settings.speed_modes)
    agreement = Step("cases", ("-m", "benchmarks.device_agreement", "--ckpt_dir", checkpoint or "", "--device", device,
                               "--cases", settings.agreement_cases, "--prompt", settings.agreement_prompt,
                               "--new_tokens", str(settings.agreement_new_tokens), "--json"), settings.agreement_s)
    # A test module that cannot be imported there (an optional package missing) must not stop the rest.
    tests = Step("pytest", ("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                            "--continue-on-collection-errors", *settings.test_paths), settings.tests_s)
    blocks = f"{settings.vram_blocks} block{'s' if settings.vram_blocks > 1 else ''}"
    parts = [
        Part("tests", "GPU tests (`pytest -m gpu`)", (*CORE_NEEDS, "pytest", "transformers", "sentencepiece", "gguf"),
             (tests,), render_tests(junit)),
        Part("vram", f"Memory ({settings.vram_models}-shaped layers, {blocks}, "
             f"{settings.vram_seq_len} tokens; benchmarks.vram)", (*CORE_NEEDS, "fire"), vram, render_vram),
        Part("speed", f"Speed (benchmarks.speed, batch {settings.speed_batch})", (*CORE_NEEDS, "fire", "gguf"), speed,
             render_speed, no_checkpoint),
        Part("agreement", f"Agreement of {device} with the CPU (benchmarks.device_agreement)", (*CORE_NEEDS, "gguf"),
             (agreement,), render_agreement, no_checkpoint),
    ]
    chosen = args.parts.split(",")
    unknown = sorted(set(chosen) - {p.name for p in parts})
    if unknown:
        raise ValueError(f"parts: {unknown} are not among {', '.join(p.name for p in parts)}")
    return [p for p in parts if p.name in chosen]


def part_section(result: PartResult) -> str:
    lines = [f"## {result.part.title}", "", f"Status: {result.status} ({result.seconds:.0f} s of "
             f"{result.budget_s:.0f} s)."]
    body = result.part.render(result.steps)
    if body:
        lines += ["", body]
    for step in result.steps:
        if step.passed or step.status.startswith("not run"):
            continue
        tail = "\n".join((step.stdout.rstrip() + "\n" + step.stderr.rstrip()).strip().splitlines()[-OUTPUT_TAIL_LINES:])
        lines += ["", f"{step.step.label}: {step.status}; the end of its output:", "", "```", tail, "```"]
    return "\n".join(lines)


def report(results: list[PartResult], environment: StepResult, args: argparse.Namespace, checkpoint: str,
           seconds: float) -> str:
    from benchmarks.common import markdown_table

    summary = [{"part": r.part.name, "status": r.status, "seconds": round(r.seconds), "budget s": round(r.budget_s)}
               for r in results]
    return "\n\n".join([header(environment, args, checkpoint), "## Summary",
                        f"{seconds:.0f} s in all, of a {args.budget_s:.0f} s budget.",
                        markdown_table(summary), *(part_section(r) for r in results)]) + "\n"


def child_environment(carried: Path) -> dict[str, str]:
    """The parts' environment: the carried packages first on the path, output unbuffered."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    site = carried / "site"
    if site.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site.resolve()), env.get("PYTHONPATH", "")) if p)
    return env


def main(args: argparse.Namespace) -> None:
    if args.describe:
        print(json.dumps(describe(), indent=1))
        return
    if importlib.util.find_spec("torch") is None:
        raise ValueError("torch is not installed: every part needs it (on a GPU machine, a build for CUDA)")
    start = time.monotonic()
    settings = TINY if args.tiny else Settings()
    carried = Path(args.carried)
    env = child_environment(carried)
    if (carried / "site").is_dir():
        sys.path.insert(0, str((carried / "site").resolve()))  # so that missing_modules sees them too
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        checkpoint, checkpoint_line = checkpoint_for(args, settings, Path(scratch))
        parts = build_parts(args, settings, checkpoint, Path(scratch) / "gpu-tests.xml")
        describe_step = Step("describe", ("-m", "benchmarks.gpu_check", "--describe"), settings.describe_s)
        environment = run_step(describe_step, env, args.budget_s)
        print(f"gpu_check: describe: {environment.status} ({environment.seconds:.0f} s)", file=sys.stderr)
        results = run_parts(parts, env, args.budget_s - (time.monotonic() - start))
        text = report(results, environment, args, checkpoint_line, time.monotonic() - start)
    Path(args.report).write_text(text)
    print(text)
    print(f"gpu_check: report written to {args.report}", file=sys.stderr)
    if any(r.status != "passed" for r in results):
        sys.exit(1)


def parser() -> argparse.ArgumentParser:
    p = make_parser("python -m benchmarks.gpu_check", "Run the prepared GPU check and write its Markdown report.")
    # dest is not "device": the shared flag check would end the program where torch sees no GPU, and
    # the report is the place to say that (its header lists the GPUs torch sees).
    p.add_argument("--device", dest="target_device", choices=("cuda", "cpu"), default="cuda",
                   help="where speed and agreement run: cuda, or cpu for a dry run (default: cuda)")
    add_switch(p, "--tiny", "every part as small as it gets, on a synthetic checkpoint: a dry run (default: off)")
    p.add_argument("--report", default="gpu_check.md", metavar="PATH", help="the report (default: gpu_check.md)")
    p.add_argument("--carried", default=str(CARRIED), metavar="PATH",
                   help=f"benchmarks.gpu_carry's folder: packages and a model cut (default: {CARRIED})")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="the checkpoint speed and agreement run on (default: the demo model if cached, else the "
                        "cut in --carried)")
    p.add_argument("--parts", default="tests,vram,speed,agreement", metavar="LIST",
                   help="which parts to run (default: all: tests,vram,speed,agreement)")
    p.add_argument("--budget_s", type=positive_float, default=480.0, help="seconds for the whole check (default: 480)")
    add_switch(p, "--describe", "print the machine's description as JSON and stop (the check's first step)")
    return p


if __name__ == "__main__":
    run_cli(parser(), main)
