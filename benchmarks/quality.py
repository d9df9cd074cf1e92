"""A multiple-choice task through the server, scored by lm-eval: what each quantization mode costs in
answers, not only in perplexity.

    python -m benchmarks.quality --quant none,int8,nf4
    python -m benchmarks.quality --ckpt_dir D --quant none,nf4 --json

The task is tests/data/lm_eval_mc (llama_int8_mc): 30 general-knowledge questions of 4 choices,
local, nothing downloaded. lm-eval (a test-only dependency: `pip install "lm_eval[api]"`) scores
each choice as the log-likelihood of " choice" after "Question: ...\\nAnswer:" (its
`local-completions` model: legacy completions with echo, logprobs 1 and max_tokens 1, the prompt as
token ids of the checkpoint's Hugging Face tokenizer) against our server, in a process of its own
on 127.0.0.1, one per --quant mode, float32 activations on the CPU unless --device says otherwise.
The checkpoint is served as an HF folder (a GGUF is exported to one once, dequantized, as
benchmarks.reference does), so every mode quantizes the same float32 weights.

Per mode: acc (the likeliest choice is right) and acc_norm (likelihood per byte), then against the
float32 server's scores of the same choices: mean and mean absolute difference of the choices'
log-likelihoods (mode minus float32), the largest, and the share of questions whose likeliest
choice is float32's. A first row runs lm-eval's own in-process `hf` model (transformers, float32) on
the same folder: the reference the float32 server must equal (tests/test_lm_eval.py holds it to
1e-4 per choice); --reference False leaves it out.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fire

from benchmarks.common import report
from benchmarks.reference import transformers_folder
from benchmarks.serve import free_port, server_process

TASK = "llama_int8_mc"
TASK_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "lm_eval_mc"
MODEL_NAME = "llama_int8"
# What the server needs no network for; lm-eval reads everything from local paths.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def task_manager():
    """lm-eval's tasks: only ours (the built-in index of thousands of YAML files is never read)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def evaluate(model, model_args: dict | None = None, limit: int | None = None) -> dict[str, Any]:
    """lm-eval's simple_evaluate on the task with every sample logged; the global random seeds are
    left alone (the task has no few-shot examples to draw)."""
    import lm_eval

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=task_manager(),
                                   log_samples=True, bootstrap_iters=0, limit=limit, random_seed=None,
                                   numpy_random_seed=None, torch_random_seed=None)


def evaluate_hf(folder: Path, limit: int | None = None) -> dict[str, Any]:
    """lm-eval's own in-process `hf` model: transformers, float32, on the CPU, one sequence at a time."""
    return evaluate("hf", {"pretrained": str(folder), "dtype": "float32", "device": "cpu", "batch_size": 1}, limit)


def evaluate_server(completions_url: str, tokenizer: Path, concurrent: int = 2,
                    limit: int | None = None) -> dict[str, Any]:
    """lm-eval's `local-completions`, unchanged, against completions_url (…/v1/completions), prompts
    as token ids of the HF tokenizer in the folder tokenizer."""
    args = dict(base_url=completions_url, model=MODEL_NAME, tokenizer_backend="huggingface", tokenizer=str(tokenizer),
                num_concurrent=concurrent, max_retries=1, timeout=600)
    return evaluate("local-completions", args, limit)


def serve_command(ckpt: Path, quant: str, port: int, device: str, max_batch_size: int) -> list[str]:
    return [sys.executable, "-m", "llama_int8.serve", "--ckpt_dir", str(ckpt), "--quant", quant, "--dtype", "float32",
            "--device", device, "--max_batch_size", str(max_batch_size), "--max_seq_len", "256", "--port", str(port),
            "--served_model_name", MODEL_NAME]


@contextmanager
def serving(folder: Path, quant: str, device: str = "cpu", slots: int = 2, threads: int | None = 1) -> Iterator[str]:
    """Our server on folder in a process of its own (no API key, offline); yields its completions URL."""
    saved = {k: os.environ.get(k) for k in [*OFFLINE, "LLAMA_INT8_API_KEY"]}
    os.environ.update(OFFLINE)
    os.environ.pop("LLAMA_INT8_API_KEY", None)  # lm-eval sends OPENAI_API_KEY, empty here
    try:
        port = free_port()
        with server_process(serve_command(folder, quant, port, device, slots), f"http://127.0.0.1:{port}", "/health",
                            threads) as url:
            yield f"{url}/completions"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def choice_scores(out: dict[str, Any]) -> list[list[tuple[float, bool]]]:
    """Per question (in the file's order), per choice: (log-likelihood, is_greedy) as lm-eval scored it."""
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return [[(float(ll), bool(greedy)) for ll, greedy in s["filtered_resps"]] for s in samples]


def metrics(out: dict[str, Any]) -> dict[str, float]:
    result = out["results"][TASK]
    return {"acc": result["acc,none"], "acc_norm": result["acc_norm,none"]}


def picks(scores: list[list[tuple[float, bool]]]) -> list[int]:
    return [max(range(len(q)), key=lambda i: q[i][0]) for q in scores]


def row(engine: str, quant: str, out: dict[str, Any], base: list[list[tuple[float, bool]]] | None,
        seconds: float) -> dict:
    scores = choice_scores(out)
    entry = {"engine": engine, "quant": quant, "questions": len(scores), **metrics(out)}
    if base is not None:
        diffs = [s[0] - b[0] for q, bq in zip(scores, base) for s, b in zip(q, bq)]
        entry.update({"mean Δ loglik": sum(diffs) / len(diffs),
                      "mean abs Δ loglik": sum(abs(d) for d in diffs) / len(diffs),
                      "max abs Δ loglik": max(abs(d) for d in diffs),
                      "same pick": sum(a == b for a, b in zip(picks(scores), picks(base))) / len(scores)})
    entry["eval s"] = seconds
    return entry


def main(ckpt_dir: str | None = None, quant: str | tuple = "none,int8,nf4", device: str = "cpu",
         concurrent: int = 2, threads: int | None = 1, reference: bool = True,
         limit: int | None = None, json: bool = False) -> None:
    """acc and acc_norm of the task through our server per --quant mode (float32 is measured first,
    whether listed or not, as what the others are compared with), with lm-eval's in-process hf run.

    concurrent: requests lm-eval keeps in flight (the server gets as many slots). threads: the
    server's CPU threads (OMP_NUM_THREADS; 1 spares a machine shared with other busy processes).
    """
    from llama_int8.demo import demo_gguf_path
    from llama_int8.logs import setup_logging

    setup_logging()
    for name in ("lm_eval", "lm-eval", "httpx", "urllib3"):  # per-request lines and an "instruct model" warning
        logging.getLogger(name).setLevel(logging.ERROR)
    modes = quant.split(",") if isinstance(quant, str) else list(quant)
    modes = ["none"] + [m for m in modes if m != "none"]
    folder = transformers_folder(Path(ckpt_dir) if ckpt_dir else demo_gguf_path())
    rows, base, hf = [], None, None
    if reference:
        os.environ.update(OFFLINE)
        start = time.perf_counter()
        hf = evaluate_hf(folder, limit)
        hf_seconds = time.perf_counter() - start
    for mode in modes:
        with serving(folder, mode, device, concurrent, threads) as url:
            start = time.perf_counter()
            out = evaluate_server(url, folder, concurrent, limit=limit)
            seconds = time.perf_counter() - start
        if base is None:
            base = choice_scores(out)
            if hf is not None:
                rows.append(row("transformers (lm-eval hf)", "none", hf, base, hf_seconds))
        rows.append(row("llama_int8 server (lm-eval local-completions)", mode, out, base, seconds))
        print(f"{mode}: acc {rows[-1]['acc']:.3f}, acc_norm {rows[-1]['acc_norm']:.3f}", file=sys.stderr, flush=True)
    report(f"Multiple choice through the server: {TASK} ({rows[-1]['questions']} questions, 4 choices), "
           f"{folder.name}, float32 activations on {device}; Δ: against the float32 server",
           rows, json)


if __name__ == "__main__":
    fire.Fire(main)
