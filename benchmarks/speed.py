"""Prefill and decode speed, ours against transformers + bitsandbytes on the same weights.

    python -m benchmarks.speed --quant int8 --compare transformers
    python -m benchmarks.speed --ckpt_dir 7B --quant nf4 --batch_sizes 1,8 --json

Decode tokens/s counts generated tokens only, after a warm-up, median of --runs runs, with the device
synchronized around each run; prefill is timed separately. Achieved bandwidth is the weight bytes a
decode step must read (every block linear, the norms and the output head; the embedding is a gather)
times steps per second, set against a large device-to-device copy measured once.
"""

from __future__ import annotations

import gc
from pathlib import Path

import fire
import torch

from benchmarks.common import median_seconds, report
from benchmarks.reference import load_transformers, transformers_folder
from llama_int8 import Llama
from llama_int8.demo import demo_gguf_path
from llama_int8.logs import setup_logging
from llama_int8.memory import weight_bytes


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes read plus bytes written per second by one large copy: the practical bandwidth ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, runs=5)
    del src, dst
    return 2 * nbytes / seconds / 1e9


def decode_read_bytes(llm: Llama) -> int:
    """Bytes of weights one decode step reads: all of them but the embedding table (a row lookup)."""
    model = llm.model
    embedding = model.tok_embeddings.weight
    tied = model.output.weight is embedding
    return weight_bytes(model) - (0 if tied else embedding.numel() * embedding.element_size())


def prompt_batch(vocab_size: int, batch: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab_size - 1, (batch, length), generator=generator).tolist()


def measure_ours(llm: Llama, batch: int, prompt_len: int, gen_tokens: int, runs: int) -> dict:
    device = llm.model.rope_cos.device
    prompts = prompt_batch(llm.model.args.vocab_size, batch, prompt_len)
    tokens = torch.tensor(prompts, device=device)

    def prefill() -> None:
        with torch.inference_mode():
            llm.model(tokens, 0, last_only=True)

    def generate() -> None:
        llm.generate(prompts, max_gen_len=gen_tokens, temperature=0, stop_ids=())

    prefill_s = median_seconds(prefill, device, runs)
    total_s = median_seconds(generate, device, runs)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"prefill_tok_s": batch * prompt_len / prefill_s, "decode_tok_s": batch * (gen_tokens - 1) / decode_s,
            "decode_steps_s": (gen_tokens - 1) / decode_s}


def measure_transformers(model, batch: int, prompt_len: int, gen_tokens: int, runs: int) -> dict:
    device = model.device
    tokens = torch.tensor(prompt_batch(model.config.vocab_size, batch, prompt_len), device=device)

    def run(n: int) -> None:
        with torch.inference_mode():
            model.generate(tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    prefill_s = median_seconds(lambda: run(1), device, runs)
    total_s = median_seconds(lambda: run(gen_tokens), device, runs)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"prefill_tok_s": batch * prompt_len / prefill_s, "decode_tok_s": batch * (gen_tokens - 1) / decode_s,
            "decode_steps_s": (gen_tokens - 1) / decode_s}


def main(ckpt_dir: str | None = None, quant: str = "int8", batch_sizes: str | tuple = "1,8",
         prompt_tokens: int = 128, gen_tokens: int = 64, runs: int = 5, device: str | None = None,
         dtype: str | None = None, compare: str | None = None, json: bool = False) -> None:
    """Measure prefill and decode tokens/s for each batch size; --compare transformers adds HF + bnb."""
    setup_logging()
    source = Path(ckpt_dir) if ckpt_dir else demo_gguf_path()
    sizes = [int(b) for b in (batch_sizes.split(",") if isinstance(batch_sizes, str) else batch_sizes)]
    llm = Llama.build(source, max_seq_len=prompt_tokens + gen_tokens + 1, max_batch_size=max(sizes),
                      quant=quant, device=device, dtype=dtype)
    dev = llm.model.rope_cos.device
    bandwidth = copy_bandwidth_gbps(dev)
    read_bytes = decode_read_bytes(llm)
    rows = []
    for batch in sizes:
        ours = measure_ours(llm, batch, prompt_tokens, gen_tokens, runs)
        achieved = read_bytes * ours["decode_steps_s"] / 1e9
        rows.append({"engine": "llama_int8", "quant": quant, "batch": batch, "prefill tok/s": ours["prefill_tok_s"],
                     "decode tok/s": ours["decode_tok_s"], "weights GB/s": achieved,
                     "of bandwidth": f"{achieved / bandwidth:.1%}"})
    model_dtype = llm.model.tok_embeddings.weight.dtype
    del llm
    gc.collect()
    if compare == "transformers":
        hf = load_transformers(transformers_folder(source), quant, dev, model_dtype)
        for batch in sizes:
            theirs = measure_transformers(hf, batch, prompt_tokens, gen_tokens, runs)
            ours_row = next(r for r in rows if r["batch"] == batch and r["engine"] == "llama_int8")
            ours_row["x transformers"] = ours_row["decode tok/s"] / theirs["decode_tok_s"]
            rows.append({"engine": "transformers+bnb", "quant": quant, "batch": batch,
                         "prefill tok/s": theirs["prefill_tok_s"], "decode tok/s": theirs["decode_tok_s"]})
    elif compare is not None:
        raise ValueError(f"compare: {compare!r} is not 'transformers'")
    report(f"Speed: {source.name}, {prompt_tokens}-token prompt, {gen_tokens} greedy tokens", rows, json,
           {"copy_bandwidth_gbps": bandwidth, "decode_read_bytes": read_bytes})


if __name__ == "__main__":
    fire.Fire(main)
