"""Needle in a haystack: can the model find a pass code hidden at some depth of a long text?

    python -m benchmarks.needle                                    # the demo model, 1000..4000 tokens
    python -m benchmarks.needle --ckpt_dir 7B --lengths 1000,2000,4000 --depths 0.1,0.5,0.9 --quant int8 --json
    python -m benchmarks.needle --ckpt_dir mistral-7b --sliding_window 1024 --prefill_chunk 512
    python -m benchmarks.needle --kv_cache int8                   # keys and values in int8

A random 5-digit pass code is stated, at each depth (0 = start, 1 = end) of a filler text making the
prompt about --lengths tokens long (benchmarks/data/lighthouses.txt, repeated); the model is then asked for it, through
its chat template when it has one, and its answer is primed with "The secret pass code is". Greedy
decoding; a hit is an answer containing the code. The cache is sized per length, so the KV cache and
peak memory columns show what each length costs (host RSS is the process's peak so far: it never falls).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import fire
import torch
from tqdm import tqdm

from benchmarks.common import report
from llama_int8 import Llama
from llama_int8.chat import encode_dialog
from llama_int8.demo import demo_gguf_path
from llama_int8.logs import setup_logging
from llama_int8.memory import GiB, MiB, peak_host_rss_bytes

FILLER = Path(__file__).parent / "data" / "lighthouses.txt"
NEEDLE = "The secret pass code is {code}. Remember it: {code}."
QUESTION = "What is the secret pass code stated in the text above? Answer with the five digits only."
ANSWER_PRIMER = "The secret pass code is"
ANSWER_TOKENS = 12


def filler_sentences() -> list[str]:
    text = " ".join(FILLER.read_text().split())
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def haystack(tokenizer, sentences: list[str], length: int, depth: float, needle: str) -> str:
    """Filler sentences (cycled) adding up to about `length` tokens, with the needle at the given depth."""
    cost = [len(tokenizer.encode(" " + s, bos=False, eos=False)) for s in sentences]
    chosen: list[str] = []
    total = 0
    while total < length:
        i = len(chosen) % len(sentences)
        chosen.append(sentences[i])
        total += cost[i]
    chosen.insert(round(depth * len(chosen)), needle)
    return " ".join(chosen)


def needle_prompt(llm: Llama, text: str) -> list[int]:
    """The question about text, ready for the answer, with the answer's first words already given."""
    tokenizer = llm.tokenizer
    request = f"{text}\n\n{QUESTION}"
    if getattr(tokenizer, "chat_template", None) is not None:
        tokens = encode_dialog(tokenizer, [{"role": "user", "content": request}])
        return tokens + tokenizer.encode(ANSWER_PRIMER, bos=False, eos=False)
    return tokenizer.encode(f"{request}\n\nAnswer: {ANSWER_PRIMER}", bos=True, eos=False)


def probe(llm: Llama, prompt: list[int]) -> str:
    (answer,) = llm.generate([prompt], max_gen_len=ANSWER_TOKENS, temperature=0)
    return llm.tokenizer.decode(answer)


def parse_list(value: str | tuple | float | int, kind: type) -> list:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, tuple) else [value]
    return [kind(x) for x in items]


def measure_length(llm: Llama, length: int, depths: list[float], rng: random.Random, dtype: torch.dtype,
                   prefill_chunk: int | None) -> dict:
    """One row of the grid: a hit or miss per depth, and what this length cost in memory."""
    model = llm.model
    device = model.device
    sentences = filler_sentences()
    budget = length - len(needle_prompt(llm, NEEDLE.format(code="00000")))  # tokens left for the filler
    prompts, codes = [], []
    for depth in depths:
        code = str(rng.randrange(10_000, 100_000))
        prompts.append(needle_prompt(llm, haystack(llm.tokenizer, sentences, budget, depth, NEEDLE.format(code=code))))
        codes.append(code)
    # Size the cache for this length, so its bytes (and the peaks) are what this length needs.
    model.setup_caches(1, max(len(p) for p in prompts) + ANSWER_TOKENS + 1, dtype, device, prefill_chunk,
                       model.kv_cache)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row: dict = {"length": length, "prompt tokens": max(len(p) for p in prompts)}
    for depth, prompt, code in zip(depths, prompts, codes):
        answer = probe(llm, prompt)
        row[f"depth {depth:g}"] = "hit" if code in answer else f"miss ({answer.strip()[:16]!r})"
    row["hits"] = f"{sum(v == 'hit' for k, v in row.items() if k.startswith('depth'))}/{len(depths)}"
    row["KV cache MiB"] = model.cache_bytes() / MiB
    row["peak host RSS GiB"] = peak_host_rss_bytes() / GiB
    if device.type == "cuda":
        row["peak GPU allocated GiB"] = torch.cuda.max_memory_allocated(device) / GiB
        row["peak GPU reserved GiB"] = torch.cuda.max_memory_reserved(device) / GiB
    return row


def main(ckpt_dir: str | None = None, lengths: str | tuple = "1000,2000,4000", depths: str | tuple = "0.1,0.5,0.9",
         quant: str = "int8", device: str | None = None, dtype: str | None = None, attention: str | None = None,
         sliding_window: int | None = None, prefill_chunk: int | None = None, kv_cache: str = "model",
         seed: int = 0, json: bool = False) -> None:
    """Hit or miss for each length x depth, and peak memory per length (see the module docstring)."""
    setup_logging()
    source = Path(ckpt_dir) if ckpt_dir else demo_gguf_path()
    length_list, depth_list = parse_list(lengths, int), parse_list(depths, float)
    bad = [d for d in depth_list if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"depths: {bad} are outside 0..1 (0 = start of the text, 1 = end)")
    llm = Llama.build(source, max_seq_len=2, quant=quant, device=device, dtype=dtype, attention=attention,
                      sliding_window=sliding_window, prefill_chunk=prefill_chunk,
                      kv_cache=kv_cache)  # caches resized per length
    model_dtype = llm.model.norm.weight.dtype  # the activations' (a quantized embedding has int8 rows)
    rng = random.Random(seed)
    rows = [measure_length(llm, n, depth_list, rng, model_dtype, prefill_chunk)
            for n in tqdm(length_list, desc="Lengths", unit="length")]
    args = llm.model.args
    report("Needle in a haystack", rows, json,
           extra={"checkpoint": str(source), "quant": quant, "kv_cache": kv_cache,
                  "sliding_window": args.sliding_window, "prefill_chunk": llm.model.prefill_chunk, "seed": seed})


if __name__ == "__main__":
    fire.Fire(main)
