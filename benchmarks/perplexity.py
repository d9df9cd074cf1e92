"""Perplexity of texts under each quantization mode: what each mode costs in quality.

    python -m benchmarks.perplexity --ckpt_dir D --quant nf4 --text_file F
    python -m benchmarks.perplexity --quant none,int8,nf4,nf4-dq,fp4,fp4-dq --compare transformers
    python -m benchmarks.perplexity --quant none,int8,nf4 --kv_cache model,int8 --window 2048 --join

Each text is tokenized once (BOS first when the tokenizer uses one) and scored in consecutive
windows of --window tokens, each a fresh forward pass; perplexity is exp(mean negative
log-likelihood of every token after the first of its window). Several texts (comma-separated; by
default the two under benchmarks/data, about 2000 tokens) are reported one by one and pooled, the
mean taken over all their tokens: a mode's cost measured on one short text moves by a few tenths of
a percent with the text. With --compare transformers, Hugging Face transformers + bitsandbytes
scores the same token ids with the same weights (an HF folder, or a GGUF exported to one). With one
mode, the last line printed is `perplexity: X`, pooled over the texts. --join scores the texts as one
(BOS once, blank lines between them), so that a window longer than each of them sees a context that
long. --kv_cache model,int8 scores each mode with each KV cache, the int8 one against the model's.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from pathlib import Path

import fire
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import report
from llama_int8 import Llama
from llama_int8.logs import setup_logging
from llama_int8.memory import weight_bytes

DATA = Path(__file__).with_name("data")
DEFAULT_TEXTS = f"{DATA / 'lighthouses.txt'},{DATA / 'bread.txt'}"


def windows(tokens: list[int], window: int) -> list[torch.Tensor]:
    """Consecutive [1, <= window] slices of tokens; a last slice of one token scores nothing and is dropped."""
    ids = torch.tensor(tokens, dtype=torch.long)
    return [ids[i:i + window][None] for i in range(0, len(tokens), window) if len(tokens) - i > 1]


def negative_log_likelihood(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of ids[:, 1:] under logits [1, s, vocab] (position i predicts token i + 1), and the count."""
    nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device), reduction="sum")
    return float(nll), ids.shape[1] - 1


Logits = Callable[[torch.Tensor], torch.Tensor]  # token ids [1, s] -> logits [1, s, vocab]


@torch.inference_mode()
def score(logits: Logits, texts: dict[str, list[int]], window: int) -> dict[str, float]:
    """Perplexity of each text's tokens, and of all of them pooled (key "all")."""
    per_text, total, count = {}, 0.0, 0
    for name, tokens in texts.items():
        text_nll, text_count = 0.0, 0
        for ids in windows(tokens, window):
            nll, n = negative_log_likelihood(logits(ids), ids)
            text_nll, text_count = text_nll + nll, text_count + n
        per_text[name] = math.exp(text_nll / text_count)
        total, count = total + text_nll, count + text_count
    return {**per_text, "all": math.exp(total / count)}


def ours_logits(llm: Llama, one_at_a_time: bool = False) -> Logits:
    """Our logits for a window in one forward pass, or one_at_a_time: token by token through the KV
    cache, each position computed as a decode step computes it."""
    model = llm.model
    if not one_at_a_time:
        return lambda ids: model(ids.to(model.device), 0)
    return lambda ids: torch.cat([model(ids[:, i:i + 1].to(model.device), i) for i in range(ids.shape[1])], dim=1)


def transformers_logits(model) -> Logits:
    return lambda ids: model(ids.to(model.device)).logits


def transformers_weight_bytes(model) -> int:
    return model.get_memory_footprint()


def main(ckpt_dir: str | None = None, quant: str | tuple = "int8", text_file: str | tuple = DEFAULT_TEXTS,
         window: int = 1024, device: str | None = None, dtype: str | None = None, int8_threshold: float = 6.0,
         quantize_head: str | bool | None = None, kv_cache: str | tuple = "model", join: bool = False,
         compare: str | None = None, int8_matmul: str | tuple = "llm.int8", json: bool = False) -> None:
    """Perplexity of the texts in text_file (comma-separated) for each mode in quant (comma-separated);
    --compare transformers adds HF + bitsandbytes (with the same int8_threshold).

    int8_matmul: Llama.build's, or both comma-separated (int8 scored with each); weight_only scores
    token by token, as decoding runs it (a window's forward pass would take LLM.int8()'s product).

    quantize_head: Llama.build's (None: quantized in the quantized modes); "both" scores each
    quantized mode twice, with a 16-bit and with a quantized head, to show what the head costs.
    kv_cache: Llama.build's, or several comma-separated. join: score the texts as one text.
    """
    setup_logging()
    if compare not in (None, "transformers"):
        raise ValueError(f"compare: {compare!r} is not 'transformers'")
    if ckpt_dir is None:
        from llama_int8.demo import demo_gguf_path

        source = demo_gguf_path()
    else:
        source = Path(ckpt_dir)
    modes = comma_list(quant)
    paths = [Path(p) for p in comma_list(text_file)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"text_file: no such file: {', '.join(missing)}")
    rows = []
    texts: dict[str, list[int]] = {}
    kinds = comma_list(kv_cache)
    matmuls = comma_list(int8_matmul)
    runs = [(mode, head, kind, matmul) for mode in modes for head in head_choices(quantize_head, mode)
            for kind in kinds for matmul in (matmuls if mode == "int8" else matmuls[:1])]
    for mode, head, kind, matmul in tqdm(runs, desc="Modes", unit="mode"):
        llm = Llama.build(source, max_seq_len=window, quant=mode, device=device, dtype=dtype,
                          int8_threshold=int8_threshold, quantize_head=head, kv_cache=kind, int8_matmul=matmul)
        if not texts:  # every mode shares the checkpoint's tokenizer: encode once
            texts = encode_texts(llm, paths, join)
        model_dtype = llm.model.norm.weight.dtype  # the activations' (a quantized embedding has int8 rows)
        dev = llm.model.device
        weight_only = mode == "int8" and matmul == "weight_only"
        rows.append({"engine": "llama_int8" + (", weight_only" if weight_only else ""), "quant": mode,
                     "head": head_name(llm), "KV cache": kind,
                     **score(ours_logits(llm, one_at_a_time=weight_only), texts, window),
                     "weights MiB": weight_bytes(llm.model) / 2**20})
        del llm
        gc.collect()
        if compare == "transformers" and head is not True and kind == kinds[0]:
            from benchmarks.reference import load_transformers, transformers_folder

            hf = load_transformers(transformers_folder(source), mode, dev, model_dtype, int8_threshold)
            rows.append({"engine": "transformers+bnb", "quant": mode, "head": str(model_dtype).removeprefix("torch."), **score(transformers_logits(hf), texts, window),
                         "weights MiB": transformers_weight_bytes(hf) / 2**20})
            del hf
            gc.collect()
    for r in rows:  # each engine (and KV cache) against its own float baseline, when it ran one
        same = [b for b in rows if b["engine"] == r["engine"] and b.get("KV cache") == r.get("KV cache")]
        family = [b for b in rows if b["engine"].split(",")[0] == r["engine"].split(",")[0]
                  and b.get("KV cache") == r.get("KV cache")]  # ours, whatever its int8 product
        baseline = next((b["all"] for b in family if b["quant"] == "none"), None)
        r["all vs none"] = None if baseline is None else f"{r['all'] / baseline - 1:+.2%}"
        float_head = next((b["all"] for b in same if b["quant"] == r["quant"] and b["head"] != "quantized"), None)
        r["head's cost"] = (f"{r['all'] / float_head - 1:+.2%}" if r["head"] == "quantized" and float_head
                            else None)
        model_cache = next((b["all"] for b in rows if b["engine"] == r["engine"] and b["quant"] == r["quant"]
                            and b["head"] == r["head"] and b.get("KV cache") == "model"), None)
        r["KV cache's cost"] = (f"{r['all'] / model_cache - 1:+.2%}" if r.get("KV cache") not in (None, "model")
                                and model_cache else None)
    sizes = ", ".join(f"{name} {len(tokens)}" for name, tokens in texts.items())
    report(f"Perplexity: {Path(source).name}, tokens: {sizes} (window {window})", rows, json,
           {"texts": {name: len(tokens) for name, tokens in texts.items()}})
    if len(modes) == 1 and len(kinds) == 1 and not json:
        print(f"perplexity: {rows[0]['all']:.4f}")


def encode_texts(llm: Llama, paths: list[Path], join: bool) -> dict[str, list[int]]:
    """Each text's token ids (BOS first when the tokenizer uses one), or, joined, all of them as one."""
    if join:
        joined = "\n\n".join(p.read_text().strip() for p in paths)
        return {"+".join(p.name for p in paths): llm.tokenizer.encode(joined, bos=True, eos=False)}
    return {p.name: llm.tokenizer.encode(p.read_text(), bos=True, eos=False) for p in paths}


def head_choices(quantize_head: str | bool | None, mode: str) -> list[bool | None]:
    """The quantize_head values to score mode with."""
    if quantize_head != "both":
        return [quantize_head]
    return [False] if mode == "none" else [False, True]


def head_name(llm: Llama) -> str:
    """The output head's dtype: the model's float one, or "quantized"."""
    weight = llm.model.output.weight
    return str(weight.dtype).removeprefix("torch.") if weight.is_floating_point() else "quantized"


def comma_list(value: str | tuple) -> list[str]:
    """fire passes "a,b" as a tuple and "a" as a string."""
    return [v for v in (value.split(",") if isinstance(value, str) else map(str, value)) if v]


if __name__ == "__main__":
    fire.Fire(main)
