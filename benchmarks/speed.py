"""Prefill and decode speed, ours against transformers + bitsandbytes or llama.cpp on the same weights.

    python -m benchmarks.speed --quant int8 --compare transformers
    python -m benchmarks.speed --ckpt_dir 7B --quant nf4 --batch 1,8 --new_tokens 64 --json
    python -m benchmarks.speed --quant int8 --batch 1 --runs 3 --compare llama.cpp \
        --llama_cpp_python /path/to/llama-cpp-venv/bin/python
    python -m benchmarks.speed --quant none --batch 1 --prompt_tokens 448 --kv_cache model,int8
    python -m benchmarks.speed --quant int8,nf4 --int8_matmul llm.int8,weight_only --batch 1 --compare llama.cpp
    python -m benchmarks.speed --quant nf4 --device cuda --cuda_graph false,true

--compare llama.cpp runs llama.cpp (llama-cpp-python, in a child process started with
--llama_cpp_python, or with this Python when it has llama_cpp) on the same weights at the same
precision, F32 / Q8_0 / Q4_0 for none / int8 / the 4-bit modes, made by llama.cpp's own quantizer
(see benchmarks/versus_llama_cpp.py); at batch 1 only, its single-sequence case. Several --quant,
--kv_cache, --int8_matmul or --cuda_graph values run ours once per combination, the first as
"llama_int8" and each other beside it like an engine compared; each row of ours gives its decode and
prefill speed as a ratio of the compared engine's (of the first variant's when no engine is compared). --cuda_graph true replays decode steps from CUDA
graphs (cuda_graphs.py; not for int8, whose layers wait on the host).

Both engines generate greedily from the same random prompts. Prefill is the time to the first token
(prompt forward plus the generator's setup); decode tokens/s counts the new_tokens - 1 tokens after
it: (generate new_tokens) - (generate 1), each a median of --runs runs after a warm-up, the device
synchronized around each run. With --compare the two engines' runs alternate, so a machine shared
with other work slows both alike and the ratio stays meaningful when the absolute figures do not.

Achieved bandwidth is the weight bytes a decode step reads (every block linear, the norms and the
output head; the embedding is a row lookup; of a mixture of experts, the experts its tokens are
expected to pick) times steps per second, set against one large copy.
Ops per token are the operators torch's profiler sees called from Python in one decode step of ours
(nested calls not counted): at batch 1 on small models a step costs about its number of kernels.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fire
import torch
from tqdm import tqdm

from benchmarks.common import report, synchronize
from benchmarks.versus_llama_cpp import LLAMA_CPP_TYPES, llama_cpp_generate, load_llama_cpp
from benchmarks.reference import load_transformers, transformers_folder
from llama_int8 import Llama
from llama_int8.formats import CheckpointError
from llama_int8.demo import demo_gguf_path
from llama_int8.flags import parse_bool
from llama_int8.logs import setup_logging
from llama_int8.memory import tensor_bytes, weight_bytes

log = logging.getLogger(__name__)

Generate = Callable[[int], object]  # runs one greedy generation of that many new tokens


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 29) -> float:
    """Bytes read plus bytes written per second by one large copy (larger than any CPU cache): the
    practical bandwidth ceiling."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = min(timed(lambda: dst.copy_(src), device) for _ in range(5))
    del src, dst
    return 2 * nbytes / seconds / 1e9


def decode_read_bytes(llm: Llama, batch: int = 1) -> int:
    """Bytes of weights one decode step of batch sequences reads: all of them but an embedding table of
    its own (a row lookup); a table the head shares is read whole by the head. Of a mixture of experts'
    experts, the share a step is expected to read when each of batch tokens picks experts_per_token (k)
    of n_experts (n) at random: 1 - (1 - k/n)^batch, k/n for one sequence."""
    model = llm.model
    embedding = getattr(model.tok_embeddings, "weight", None)  # None: the quantized head's table
    own_table = embedding is not None and getattr(model.output, "weight", None) is not embedding
    total = weight_bytes(model) - (embedding.numel() * embedding.element_size() if own_table else 0)
    args = model.args
    if not args.n_experts:
        return total
    experts = sum(tensor_bytes(layer.feed_forward.experts) for layer in model.layers)
    unread_share = (1 - args.experts_per_token / args.n_experts) ** batch
    return total - round(experts * unread_share)


def prompt_batch(vocab_size: int, batch: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab_size - 1, (batch, length), generator=generator).tolist()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def ops_per_token(llm: Llama, prompt: list[int], steps: int = 4) -> float:
    """Operators called from Python per decode step of one sequence (the profiler's top-level events)."""
    from torch.profiler import ProfilerActivity, profile

    tokens = llm.iter_generate([prompt], max_gen_len=steps + 1, temperature=0, stop_ids=())
    next(tokens)  # the prefill, not counted
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in tokens:
            pass
    return sum(1 for event in prof.events() if event.cpu_parent is None) / steps


def ours_generate(llm: Llama, prompts: list[list[int]]) -> Generate:
    def run(n: int) -> None:
        llm.generate(prompts, max_gen_len=n, temperature=0, stop_ids=())
    return run


def transformers_generate(model, prompts: list[list[int]]) -> Generate:
    tokens = torch.tensor(prompts, device=model.device)

    def run(n: int) -> None:
        with torch.inference_mode():
            model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    return run


def measure(engines: dict[str, Generate], device: torch.device, batch: int, prompt_len: int, new_tokens: int,
            runs: int) -> dict[str, dict]:
    """Prefill and decode figures of each engine, their runs interleaved; median of runs after a warm-up."""
    times: dict[str, dict[int, list[float]]] = {name: {1: [], new_tokens: []} for name in engines}
    for name, run in engines.items():  # warm-up: allocator, kernels' first-call work, caches
        run(new_tokens)
    for _ in range(runs):
        for n in (1, new_tokens):
            for name, run in engines.items():
                times[name][n].append(timed(lambda: run(n), device))
    figures = {}
    for name in engines:
        prefill_s, total_s = (sorted(times[name][n])[runs // 2] for n in (1, new_tokens))
        decode_s = max(total_s - prefill_s, 1e-9)
        figures[name] = {"prefill tok/s": batch * prompt_len / prefill_s,
                         "decode tok/s": batch * (new_tokens - 1) / decode_s,
                         "steps/s": (new_tokens - 1) / decode_s}
    return figures


def build_ours(source: Path, variant: Variant, max_seq_len: int, max_batch: int, device: str | None,
               dtype: str | None, quantize_head: bool | None) -> tuple[Llama, Path]:
    """Our engine on source; a GGUF our loader refuses is read from its HF export instead."""
    settings = dict(max_seq_len=max_seq_len, max_batch_size=max_batch, quant=variant.quant, device=device,
                    dtype=dtype, quantize_head=quantize_head, kv_cache=variant.kv_cache,
                    int8_matmul=variant.int8_matmul, cuda_graph=variant.cuda_graph)
    try:
        return Llama.build(source, **settings), source
    except CheckpointError as e:
        if source.suffix != ".gguf":
            raise
        log.warning("%s; measuring its Hugging Face export instead", e)
        folder = transformers_folder(source)
        return Llama.build(folder, **settings), folder


@dataclass(frozen=True)
class Variant:
    """One way of running our engine: Llama.build's quant, kv_cache, int8_matmul and cuda_graph."""

    quant: str
    kv_cache: str
    int8_matmul: str
    cuda_graph: bool = False

    def name(self, first: Variant) -> str:
        """"llama_int8" for the first variant, else what differs from it, e.g. "llama_int8, int8 KV cache"."""
        parts = [self.quant if self.quant != first.quant else None,
                 f"{self.kv_cache} KV cache" if self.kv_cache != first.kv_cache else None,
                 self.int8_matmul if self.int8_matmul != first.int8_matmul else None,
                 ("CUDA graph" if self.cuda_graph else "no CUDA graph") if self.cuda_graph != first.cuda_graph else None]
        return ", ".join(["llama_int8", *(p for p in parts if p)])


def variants(quant: list[str], kv_cache: list[str], int8_matmul: list[str],
             cuda_graph: list[bool] = (False,)) -> list[Variant]:
    """Every combination asked for; int8_matmul only varies for int8, the mode it applies to, and
    cuda_graph for the other modes (int8 runs without)."""
    return [Variant(q, k, m, g) for q in quant for k in kv_cache
            for m in (int8_matmul if q == "int8" else int8_matmul[:1])
            for g in ([False] if q == "int8" else cuda_graph)]


def listed(value: str | int | tuple) -> list[str]:
    """A comma-separated flag as a list (fire gives "a,b" as a tuple)."""
    return str(value).split(",") if isinstance(value, (str, int)) else [str(v) for v in value]


def main(ckpt_dir: str | None = None, quant: str | tuple = "int8", batch: str | int | tuple = "1,8",
         prompt_tokens: int = 128, new_tokens: int = 64, runs: int = 5, device: str | None = None,
         dtype: str | None = None, threads: int | None = None, compare: str | None = None,
         llama_cpp_python: str | None = None, quantize_head: bool | None = None, kv_cache: str | tuple = "model",
         int8_matmul: str | tuple = "llm.int8", cuda_graph: str | bool | tuple = False, json: bool = False) -> None:
    """Prefill and decode tokens/s for each batch size; --compare transformers adds HF + bitsandbytes,
    --compare llama.cpp adds llama.cpp (batch 1) run by llama_cpp_python at the first quant's precision.
    quant, kv_cache, int8_matmul and cuda_graph may each list several comma-separated values: ours
    then runs once per combination (int8_matmul for int8 only, cuda_graph for the others), the first
    as "llama_int8" and each other beside it like an engine compared; every row of ours gives its
    decode speed against the compared engine.

    threads: CPU threads for every engine (torch's default when None). On a machine shared with
    other busy processes, 1 thread avoids threads waiting on each other at every small kernel.
    quantize_head: Llama.build's (None: quantized in the quantized modes).
    """
    setup_logging()
    if compare not in (None, "transformers", "llama.cpp"):
        raise ValueError(f"compare: {compare!r} is not 'transformers' or 'llama.cpp'")
    if new_tokens < 2 or runs < 1:
        raise ValueError(f"new_tokens ({new_tokens}) must be >= 2 and runs ({runs}) >= 1")
    if threads is not None:
        torch.set_num_threads(threads)
    sizes = [int(b) for b in listed(batch)]
    source = Path(ckpt_dir) if ckpt_dir else demo_gguf_path()
    max_seq_len = prompt_tokens + new_tokens + 1
    runs_of = variants(listed(quant), listed(kv_cache), listed(int8_matmul), [parse_bool(g) for g in listed(cuda_graph)])
    first = runs_of[0]
    llm, ours_source = build_ours(source, first, max_seq_len, max(sizes), device, dtype, quantize_head)
    ours = {first.name(first): (first, llm)}
    for variant in runs_of[1:]:
        ours[variant.name(first)] = (variant, build_ours(ours_source, variant, max_seq_len, max(sizes), device,
                                                         dtype, quantize_head)[0])
    dev = llm.model.device
    model_dtype = llm.model.norm.weight.dtype  # the activations' (a quantized embedding has int8 rows)
    hf = (load_transformers(transformers_folder(ours_source), first.quant, dev, model_dtype)
          if compare == "transformers" else None)
    llama_cpp, gguf_path = (load_llama_cpp(source, first.quant, llama_cpp_python, max_seq_len)
                            if compare == "llama.cpp" else (None, None))
    bandwidth = copy_bandwidth_gbps(dev)
    prompt = prompt_batch(llm.model.args.vocab_size, 1, prompt_tokens)[0]
    ops = {name: ops_per_token(engine, prompt) for name, (_, engine) in ours.items()}
    rows = []
    for b in tqdm(sizes, desc="Batch sizes", unit="batch"):
        prompts = prompt_batch(llm.model.args.vocab_size, b, prompt_tokens)
        engines = {name: ours_generate(engine, prompts) for name, (_, engine) in ours.items()}
        theirs = None
        if hf is not None:
            theirs = "transformers+bnb" if first.quant != "none" else "transformers"
            engines[theirs] = transformers_generate(hf, prompts)
        if llama_cpp is not None and b == 1:
            theirs = f"llama.cpp {LLAMA_CPP_TYPES[first.quant]}"
            engines[theirs] = llama_cpp_generate(llama_cpp, prompts[0])
        if theirs is None and len(ours) > 1:  # no other engine: the variants against the first
            theirs = first.name(first)
        figures = measure(engines, dev, b, prompt_tokens, new_tokens, runs)
        for name, fig in figures.items():
            variant, engine = ours.get(name, (None, None))
            achieved = None if engine is None else decode_read_bytes(engine, b) * fig["steps/s"] / 1e9
            versus = figures.get(theirs) if engine is not None else None
            row = {"engine": name, "quant": first.quant if variant is None else variant.quant,
                   "KV cache": None if variant is None else variant.kv_cache, "batch": b,
                   "prefill tok/s": fig["prefill tok/s"],
                   "decode tok/s": fig["decode tok/s"],
                   "weights GB/s": achieved,
                   "of bandwidth": None if achieved is None else f"{achieved / bandwidth:.0%}",
                   "ops/token": round(ops[name]) if name in ops and b == 1 else None}
            if theirs is not None:
                row[f"decode vs {theirs}"] = f"{fig['decode tok/s'] / versus['decode tok/s']:.2f}x" if versus else None
                row["prefill vs it"] = f"{fig['prefill tok/s'] / versus['prefill tok/s']:.2f}x" if versus else None
            rows.append(row)
    read_bytes = {b: decode_read_bytes(llm, b) for b in {1, *sizes}}  # by batch size; they differ for experts
    del llm, hf, ours
    if llama_cpp is not None:
        llama_cpp.close()
    gc.collect()
    report(f"Speed: {source.name}, {str(model_dtype).removeprefix('torch.')}, {prompt_tokens}-token "
           f"prompt, {new_tokens} greedy tokens, {torch.get_num_threads()} CPU thread(s), median of {runs} runs",
           rows, json, {"copy_bandwidth_gbps": bandwidth, "decode_read_bytes": read_bytes[1],
                        "decode_read_bytes_by_batch": {b: read_bytes[b] for b in sizes}, "ops_per_token": ops,
                        "llama_cpp_gguf": None if gguf_path is None else str(gguf_path)})


if __name__ == "__main__":
    fire.Fire(main)
