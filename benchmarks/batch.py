"""Offline batch runs: the batch runner's throughput against a loop over `Llama.text_completion`, one
prompt at a time, on the same prompts and the same model.

    python -m benchmarks.batch                                  # 200 prompts on SmolLM2, none and int8
    python -m benchmarks.batch --prompts 48 --loop_prompts 12 --max_tokens 48 --quant int8 --json

The prompts are windows of benchmarks/data/*.txt of mixed lengths (--min_words to --max_words, drawn
with a fixed seed), each completed greedily for up to --max_tokens tokens. The batch runner is the
one `python -m llama_int8.batch` runs (batch_runner.run_batch, --slots requests at once, results
written to a JSON-lines file and fsync'd as they complete); the loop calls text_completion([prompt])
prompt after prompt, over the first --loop_prompts of them when told (the prompts are drawn
independently, so the first ones have the same mix of lengths; the loop is what takes long). Both count the tokens they generate, a stop token excluded, over their wall
time, prefill included. `same text` counts the prompts whose answers agree: in float32 the engine
gets the tokens a request gets alone, so a difference is one of the matrix kernels' roundings
between one row and several (engine.py), and quantized rows depend on the batch.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.common import report
from llama_int8 import Llama
from llama_int8.batch_files import read_requests
from llama_int8.batch_runner import BatchSettings, run_batch
from llama_int8.flags import add_switch, make_parser, positive_int, run_cli
from llama_int8.demo import demo_gguf_path

TEXTS = sorted((Path(__file__).parent / "data").glob("*.txt"))


def mixed_prompts(n: int, min_words: int, max_words: int, seed: int) -> list[str]:
    """n windows of the benchmark texts, each of a length drawn from min_words..max_words."""
    words = " ".join(path.read_text() for path in TEXTS).split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(min_words, min(max_words, len(words)))
        start = rng.randrange(len(words) - length + 1)
        prompts.append(" ".join(words[start:start + length]))
    return prompts


def run_with_batch_runner(llm: Llama, prompts: list[str], max_tokens: int, folder: Path) -> tuple[float, list[dict]]:
    """Seconds and results of the batch runner over prompts, through the files a user's run writes."""
    requests, results = folder / "requests.jsonl", folder / "results.jsonl"
    requests.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    settings = BatchSettings(max_tokens=max_tokens, sampling={"temperature": 0.0})
    start = time.perf_counter()
    run_batch(llm, read_requests(requests), requests, results, settings, "benchmark")
    seconds = time.perf_counter() - start
    answers = {r["id"]: r for r in map(json.loads, results.read_text().splitlines())}
    return seconds, [answers[i] for i in range(len(prompts))]


def run_one_at_a_time(llm: Llama, prompts: list[str], max_tokens: int) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    answers = [llm.text_completion([p], temperature=0, max_gen_len=max_tokens)[0]
               for p in tqdm(prompts, desc="text_completion", unit="req")]
    return time.perf_counter() - start, answers


def generated_tokens(result: dict) -> int:
    """A batch result's tokens without the stop token, which text_completion does not count either."""
    return result["completion_tokens"] - (result["finish_reason"] == "stop")


def measure(llm: Llama, quant: str, prompts: list[str], loop_prompts: int, max_tokens: int, slots: int
            ) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        batch_s, batched = run_with_batch_runner(llm, prompts, max_tokens, Path(folder))
    loop_s, looped = run_one_at_a_time(llm, prompts[:loop_prompts], max_tokens)
    batch_tokens = sum(generated_tokens(r) for r in batched)
    loop_tokens = sum(len(a["tokens"]) for a in looped)
    same = sum(r["text"] == a["generation"] for r, a in zip(batched, looped))
    batch_rate, loop_rate = batch_tokens / batch_s, loop_tokens / loop_s
    return [
        {"quant": quant, "runner": f"llama_int8.batch, {slots} slots", "prompts": len(prompts), "seconds": batch_s,
         "generated tokens": batch_tokens, "tok/s": batch_rate, "requests/s": len(prompts) / batch_s,
         "vs loop": f"{batch_rate / loop_rate:.2f}x", "same text as loop": f"{same}/{len(looped)}"},
        {"quant": quant, "runner": "text_completion loop", "prompts": len(looped), "seconds": loop_s,
         "generated tokens": loop_tokens, "tok/s": loop_rate, "requests/s": len(looped) / loop_s, "vs loop": "1.00x",
         "same text as loop": "-"},
    ]


def main(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.loop_prompts is not None and args.loop_prompts > args.prompts:
        raise ValueError(f"--loop_prompts {args.loop_prompts} is more than --prompts {args.prompts}")
    if args.min_words > args.max_words:
        raise ValueError(f"--min_words {args.min_words} is more than --max_words {args.max_words}")
    source = args.ckpt_dir or str(demo_gguf_path())
    prompts = mixed_prompts(args.prompts, args.min_words, args.max_words, args.seed)
    rows = []
    for quant in args.quant.split(","):
        llm = Llama.build(source, quant=quant, max_batch_size=args.slots, max_seq_len=args.max_seq_len,
                          device=args.device)
        lengths = [len(llm.tokenizer.encode(p, bos=True, eos=False)) for p in prompts]
        if max(lengths) + args.max_tokens > args.max_seq_len:
            raise ValueError(f"the longest prompt has {max(lengths)} tokens: with --max_tokens {args.max_tokens} it "
                             f"needs --max_seq_len {max(lengths) + args.max_tokens}, got {args.max_seq_len}")
        rows += measure(llm, quant, prompts, args.loop_prompts or args.prompts, args.max_tokens, args.slots)
        del llm
    report(f"Batch runs: {Path(source).name}, {args.prompts} prompts of {min(lengths)}-{max(lengths)} tokens, up to "
           f"{args.max_tokens} greedy tokens each, {torch.get_num_threads()} CPU thread(s)", rows, args.json)


def parser() -> argparse.ArgumentParser:
    p = make_parser("python -m benchmarks.batch", "Batch runner against a text_completion loop: generated tokens/s.")
    p.add_argument("--ckpt_dir", metavar="PATH", help="the checkpoint (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--quant", default="none,int8", metavar="LIST", help="modes measured, in turn (default: %(default)s)")
    p.add_argument("--prompts", type=positive_int, default=200, metavar="N", help="prompts (default: %(default)s)")
    p.add_argument("--loop_prompts", type=positive_int, metavar="N",
                   help="prompts the one-at-a-time loop runs, the first ones (default: all)")
    p.add_argument("--max_tokens", type=positive_int, default=64, metavar="N",
                   help="most tokens generated per prompt (default: %(default)s)")
    p.add_argument("--min_words", type=positive_int, default=5, metavar="N",
                   help="shortest prompt, in words (default: %(default)s)")
    p.add_argument("--max_words", type=positive_int, default=150, metavar="N",
                   help="longest prompt, in words (default: %(default)s)")
    p.add_argument("--slots", type=positive_int, default=8, metavar="N",
                   help="the batch runner's --max_batch_size (default: %(default)s)")
    p.add_argument("--max_seq_len", type=positive_int, default=512, metavar="N", help="(default: %(default)s)")
    p.add_argument("--device", metavar="DEVICE", help="cpu or cuda (default: cuda when torch sees a GPU)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="draws the prompts (default: %(default)s)")
    add_switch(p, "--json", "print one JSON object instead of a Markdown table (default: off)")
    return p


if __name__ == "__main__":
    run_cli(parser(), main)
