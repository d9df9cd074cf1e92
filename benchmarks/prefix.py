"""Prefix reuse: what a prompt that begins as an earlier one costs, with and without reuse.

    python -m benchmarks.prefix                       # SmolLM2, int8, a 512-token shared prefix
    python -m benchmarks.prefix --quant none,int8 --prefix_tokens 512 --chats 8 --json

Two measurements on the continuous-batching engine, in-process (no HTTP), each with reuse on and
off on the same model, interleaved over --runs:

- time to first token of a request whose prompt is a --prefix_tokens prefix (windows of
  benchmarks/data/*.txt) and a short question, right after a request with the same prefix has run;
- --chats concurrent chats with one long system prompt (the prefix) and different questions,
  submitted at once: the prompt tokens the engine computed (the rest it reused), and the wall time
  to their first tokens.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import fire
import torch

from benchmarks.common import report
from llama_int8 import Llama
from llama_int8.demo import demo_gguf_path
from llama_int8.engine import Engine, Output, Request
from llama_int8.sampling import SamplingParams

TEXTS = sorted((Path(__file__).parent / "data").glob("*.txt"))
GREEDY = SamplingParams(temperature=0.0)


def prefix_of(llm: Llama, n: int) -> list[int]:
    text = " ".join(path.read_text() for path in TEXTS)
    return llm.tokenizer.encode(text, bos=True, eos=False)[:n]


def question(llm: Llama, i: int) -> list[int]:
    return llm.tokenizer.encode(f"\nQuestion {i}: what comes next, and why?\nAnswer:", bos=False, eos=False)


def first_token_seconds(engine: Engine, prompts: list[list[int]]) -> float:
    """Wall time from submitting prompts at once until every one has its first token."""
    waiting = set(range(len(prompts)))

    def on_output(i: int, out: Output) -> None:
        if out.tokens or out.finish_reason is not None:
            waiting.discard(i)

    start = time.perf_counter()
    engine.submit([Request(p, 4, GREEDY) for p in prompts], on_output)
    while waiting:
        engine.step()
    seconds = time.perf_counter() - start
    while engine.has_work():
        engine.step()
    return seconds


def computed_prompt_tokens(engine: Engine, prompts: list[list[int]]) -> int:
    """Prompt tokens the engine computed for prompts run together (those it did not reuse)."""
    done = engine.run([Request(p, 1, GREEDY) for p in prompts])
    return sum(len(p) - d.cached_tokens for p, d in zip(prompts, done))


def measure(llm: Llama, quant: str, n_prefix: int, chats: int, runs: int) -> list[dict]:
    prefix = prefix_of(llm, n_prefix)
    rows = []
    for reuse in (False, True):
        ttft, together = [], []
        for r in range(runs):
            engine = Engine(llm.model, llm.tokenizer, prefix_reuse=reuse)
            first_token_seconds(engine, [prefix + question(llm, 1000 + r)])  # the earlier request
            ttft.append(first_token_seconds(engine, [prefix + question(llm, r)]))
            engine = Engine(llm.model, llm.tokenizer, prefix_reuse=reuse)
            together.append(first_token_seconds(engine, [prefix + question(llm, c) for c in range(chats)]))
        computed = computed_prompt_tokens(Engine(llm.model, llm.tokenizer, prefix_reuse=reuse),
                                          [prefix + question(llm, c) for c in range(chats)])
        rows.append({"quant": quant, "prefix reuse": "on" if reuse else "off", "prefix tokens": len(prefix),
                     "TTFT s (after one with the prefix)": statistics.median(ttft),
                     f"{chats} chats: prompt tokens computed": computed,
                     f"{chats} chats: s to all first tokens": statistics.median(together)})
    off, on = rows
    off["TTFT, off / on"], on["TTFT, off / on"] = None, (off["TTFT s (after one with the prefix)"]
                                                       / on["TTFT s (after one with the prefix)"])
    return rows


def main(ckpt_dir: str | None = None, quant: str | tuple = "int8", prefix_tokens: int = 512, chats: int = 8,
         runs: int = 3, json: bool = False) -> None:
    """TTFT of a request sharing a prefix_tokens-token prefix, and the prompt tokens --chats
    concurrent chats compute, with prefix reuse on and off."""
    n_prefix = prefix_tokens
    ckpt = Path(ckpt_dir) if ckpt_dir else demo_gguf_path()
    modes = quant.split(",") if isinstance(quant, str) else list(quant)
    rows = []
    for mode in modes:
        llm = Llama.build(ckpt, quant=mode, max_seq_len=n_prefix + 64, max_batch_size=chats)
        rows += measure(llm, mode, n_prefix, chats, runs)
        del llm
    report(f"Prefix reuse: {ckpt.name}, {chats} slots, {torch.get_num_threads()} CPU thread(s), median of {runs}",
           rows, json)


if __name__ == "__main__":
    fire.Fire(main)
