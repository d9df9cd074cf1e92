"""Perplexity of a text under each quantization mode: what each mode costs in quality.

    python -m benchmarks.perplexity --ckpt_dir D --quant nf4 --text_file F
    python -m benchmarks.perplexity --quant none,int8,nf4,nf4-dq,fp4,fp4-dq --compare transformers

The text is tokenized once (BOS first when the tokenizer uses one) and scored in consecutive windows
of --window tokens, each a fresh forward pass; perplexity is exp(mean negative log-likelihood of
every token after the first of its window). With --compare transformers, Hugging Face transformers
+ bitsandbytes scores the same token ids with the same weights (an HF folder, or a GGUF exported to
one). With one mode, the last line printed is `perplexity: X`.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

from benchmarks.common import report
from llama_int8 import Llama
from llama_int8.logs import setup_logging
from llama_int8.memory import weight_bytes

DEFAULT_TEXT = Path(__file__).with_name("data") / "lighthouses.txt"


def windows(tokens: list[int], window: int) -> list[torch.Tensor]:
    """Consecutive [1, <= window] slices of tokens; a last slice of one token scores nothing and is dropped."""
    ids = torch.tensor(tokens, dtype=torch.long)
    return [ids[i:i + window][None] for i in range(0, len(tokens), window) if len(tokens) - i > 1]


def negative_log_likelihood(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of ids[:, 1:] under logits [1, s, vocab] (position i predicts token i + 1), and the count."""
    nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device), reduction="sum")
    return float(nll), ids.shape[1] - 1


@torch.inference_mode()
def perplexity_ours(llm: Llama, tokens: list[int], window: int) -> float:
    device = llm.model.device
    total, count = 0.0, 0
    for ids in windows(tokens, window):
        nll, n = negative_log_likelihood(llm.model(ids.to(device), 0), ids)
        total, count = total + nll, count + n
    return math.exp(total / count)


@torch.inference_mode()
def perplexity_transformers(model, tokens: list[int], window: int) -> float:
    total, count = 0.0, 0
    for ids in windows(tokens, window):
        nll, n = negative_log_likelihood(model(ids.to(model.device)).logits, ids)
        total, count = total + nll, count + n
    return math.exp(total / count)


def transformers_weight_bytes(model) -> int:
    return model.get_memory_footprint()


def main(ckpt_dir: str | None = None, quant: str | tuple = "int8", text_file: str = str(DEFAULT_TEXT),
         window: int = 1024, device: str | None = None, dtype: str | None = None, compare: str | None = None,
         json: bool = False) -> None:
    """Perplexity of text_file for each mode in quant (comma-separated); --compare transformers adds HF + bnb."""
    setup_logging()
    if compare not in (None, "transformers"):
        raise ValueError(f"compare: {compare!r} is not 'transformers'")
    if ckpt_dir is None:
        from llama_int8.demo import demo_gguf_path

        source = demo_gguf_path()
    else:
        source = Path(ckpt_dir)
    modes = quant.split(",") if isinstance(quant, str) else list(quant)
    text = Path(text_file).read_text()
    rows = []
    tokens: list[int] = []
    for mode in modes:
        llm = Llama.build(source, max_seq_len=window, quant=mode, device=device, dtype=dtype)
        tokens = llm.tokenizer.encode(text, bos=True, eos=False)
        model_dtype = llm.model.tok_embeddings.weight.dtype
        dev = llm.model.device
        rows.append({"engine": "llama_int8", "quant": mode, "perplexity": perplexity_ours(llm, tokens, window),
                     "weights MiB": weight_bytes(llm.model) / 2**20})
        del llm
        gc.collect()
        if compare == "transformers":
            from benchmarks.reference import load_transformers, transformers_folder

            hf = load_transformers(transformers_folder(source), mode, dev, model_dtype)
            rows.append({"engine": "transformers+bnb", "quant": mode,
                         "perplexity": perplexity_transformers(hf, tokens, window),
                         "weights MiB": transformers_weight_bytes(hf) / 2**20})
            del hf
            gc.collect()
    baseline = next((r["perplexity"] for r in rows if r["quant"] == "none" and r["engine"] == "llama_int8"), None)
    for r in rows:
        r["vs none"] = None if baseline is None else f"{r['perplexity'] / baseline - 1:+.1%}"
    name = Path(text_file).name
    report(f"Perplexity: {Path(source).name}, {name} ({len(tokens)} tokens, window {window})", rows, json,
           {"text_file": name, "tokens": len(tokens)})
    if len(modes) == 1 and not json:
        print(f"perplexity: {rows[0]['perplexity']:.4f}")


if __name__ == "__main__":
    fire.Fire(main)
