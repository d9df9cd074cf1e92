"""Complete prompts with a LLaMA-family checkpoint, streaming the answer as it is generated.

    python example.py --ckpt_dir 13B --max_batch_size=1
    python example.py --ckpt_dir 13B --prompt "Simply put, the theory of relativity states that"
    python example.py --ckpt_dir 13B --quant nf4          # int8 (LLM.int8()) by default; none for 16-bit
    python example.py --ckpt_dir 13B-int8                 # pre-baked by quantize_offline.py: no re-quantizing
"""

from __future__ import annotations

import logging
import sys

import fire
import torch

from llama_int8 import Llama
from llama_int8.logs import setup_logging

BUILT_IN_PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that",
    "Building a website can be done in 10 simple steps:\n",
]


def main(ckpt_dir: str | list[str], tokenizer_path: str | None = None, prompt: str | list[str] | None = None,
         max_batch_size: int = 1, max_seq_len: int = 512, max_gen_len: int = 256, temperature: float = 0.6,
         top_p: float = 0.9, repetition_penalty: float = 1.0, seed: int = 1, device: str | None = None,
         dtype: str | None = None, quant: str = "int8", attention: str | None = None,
         int8_threshold: float | None = None, blocksize: int | None = None, quantize_head: bool = False) -> None:
    setup_logging()
    prompts = BUILT_IN_PROMPTS if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
    llm = Llama.build(ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                      max_batch_size=max_batch_size, quant=quant, device=device, dtype=dtype, attention=attention,
                      int8_threshold=int8_threshold, blocksize=blocksize, quantize_head=quantize_head)
    sampling = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len,
                    repetition_penalty=repetition_penalty, seed=seed)
    if max_batch_size == 1:
        for text in prompts:
            print(f"{text}", end="", flush=True)
            for piece in llm.stream_completion(text, **sampling):
                print(piece, end="", flush=True)
            print("\n\n==================================\n", flush=True)
        return
    for start in range(0, len(prompts), max_batch_size):
        batch = prompts[start:start + max_batch_size]
        for text, result in zip(batch, llm.text_completion(batch, **sampling)):
            print(f"{text}{result['generation']}\n\n==================================\n", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    try:
        fire.Fire(main)
    except (ValueError, FileNotFoundError) as e:
        logging.getLogger("example").error("%s", e)
        sys.exit(1)
