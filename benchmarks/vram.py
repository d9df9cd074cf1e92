"""Memory of each quantization mode for the real LLaMA shapes: computed, and measured where possible.

    python -m benchmarks.vram                                    # every shape, none/int8/nf4/nf4-dq/fp4
    python -m benchmarks.vram --measure False                    # the computed figures only, at once
    python -m benchmarks.vram --max_seq_len 4096 --max_batch_size 1 --models 7B,13B --quant int8,nf4 --json
    python -m benchmarks.vram --ckpt_dir 13B --quant int8        # a real checkpoint

For each shape and mode: weight bytes, computed exactly from the tensors the quantizer makes
(`quantize.expected_quantized_tensors`) plus the 16-bit embedding, norms and head; KV-cache bytes for
--max_batch_size x --max_seq_len in 16 bits and in int8 (`--kv_cache int8`: a byte per key and value
element plus a 16-bit scale per position and head), and, for a sliding-window model, what a 16-bit
cache of the window alone would hold; the 16-bit total; and the most tokens (batch x context) whose
cache, 16-bit or int8, fits --budget_gb beside the weights; the host memory a load from a 16-bit
checkpoint peaks at (beyond the imports), to a GPU and to the CPU (computed_host_peak_bytes). The KV
bytes per token of either cache are also measured, from the tensors of a cache allocated for a few
positions.

Measured, with random weights built layer by layer through the real loader and quantization hook:
- on a GPU: peak allocated and reserved memory after load, during a prefill of --prefill_tokens and,
  apart, during --decode_tokens decode steps, with what each peak adds to the memory held (weights
  and cache): a 4-bit prefill dequantizes each layer's weight to 16 bits inside bitsandbytes, decode
  does not (shapes whose computed total exceeds the GPU are skipped);
- on the CPU: peak private host memory (RssAnon, sampled from a child process) of the load, for the
  --cpu_models x --cpu_modes whose computed footprint fits --cpu_budget_gb; the others show the
  computed figures only.
--n_layers builds each shape with that many blocks: its real layer shapes, and so its real per-layer
transients, in a fraction of the time (the computed figures are for the same blocks).
"""

from __future__ import annotations

import gc
import json as jsonlib
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import fire
import torch
from tqdm import tqdm

from benchmarks.common import report
from benchmarks.hostmem import rss_anon_bytes, run_sampled
from benchmarks.synthetic import SHAPES, random_piece
from llama_int8.formats import NamedTensor
from llama_int8.loader import fill_model
from llama_int8.memory import weight_bytes
from llama_int8.model import KV_CACHES, ModelArgs, empty_model, kv_cache_bytes
from llama_int8.quantize import (CHUNK_ELEMENTS, QuantConfig, parse_quant_mode, quantized_layer_names,
                                 quantized_weight_bytes)
from llama_int8.quantized_layers import make_linear_hook

GiB = 1024**3
MiB = 1024**2
# The shapes reported, with their published configurations; Mistral-7B v0.1 attends within 4096 tokens.
MODELS: dict[str, ModelArgs] = {
    **{name: SHAPES[name] for name in ("SmolLM2-135M", "TinyLlama-1.1B", "7B", "13B", "70B", "Llama-3-8B")},
    "Mistral-7B": replace(SHAPES["Mistral-7B"], sliding_window=4096),
    "Mixtral-8x7B": SHAPES["Mixtral-8x7B"],
}
DEFAULT_MODES = ("none", "int8", "nf4", "nf4-dq", "fp4")
# What the CPU measures by default: building TinyLlama in a 4-bit mode takes ~1 min on one core
# (bitsandbytes' CPU quantizer), so the default run measures three modes and stays near two minutes.
CPU_MODELS = ("SmolLM2-135M", "TinyLlama-1.1B")
CPU_MODES = ("none", "int8", "nf4")
WEIGHT_DTYPE = torch.bfloat16  # what the unquantized parts, the cache (or its scales) and activations are held in
# What quantizing one weight holds beyond its source: a chunk of CHUNK_ELEMENTS at about 10 bytes each
# (quantize.py), and the quantized result, counted in the weights.
QUANTIZE_TRANSIENT_BYTES = 10 * CHUNK_ELEMENTS


# --- Computed -------------------------------------------------------------------------------------

def computed_weight_bytes(args: ModelArgs, cfg: QuantConfig) -> int:
    """Bytes of the model's weights: quantized block linears (and head, if asked) + 16-bit rest (a
    mixture of experts' routers included)."""
    model = empty_model(args)  # meta: shapes only
    quantized = set(quantized_layer_names(args.n_layers, cfg.quantize_head, args.n_experts)) if cfg.enabled else set()
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name == "output" and args.tie_word_embeddings:
                continue  # shares the embedding's storage
            if name in quantized:
                total += quantized_weight_bytes(module.out_features, module.in_features, cfg)
                continue
        total += sum(p.numel() * WEIGHT_DTYPE.itemsize for p in module.parameters(recurse=False))
    return total


def computed_host_peak_bytes(args: ModelArgs, cfg: QuantConfig, weights: int, to_gpu: bool) -> int:
    """Host memory a load from a 16-bit checkpoint peaks at, beyond the imports: the loader holds one
    source tensor at a time (the largest, in WEIGHT_DTYPE) and the quantizer a chunk of it
    (QUANTIZE_TRANSIENT_BYTES); a load to the CPU holds the weights loaded so far besides."""
    largest = max(p.numel() for p in empty_model(args).parameters()) * WEIGHT_DTYPE.itemsize
    return largest + (QUANTIZE_TRANSIENT_BYTES if cfg.enabled else 0) + (0 if to_gpu else weights)


def kv_bytes_per_token(args: ModelArgs, batch: int, kv_cache: str = "model") -> int:
    """Keys and values of one position, for every layer and sequence of the batch."""
    return kv_cache_bytes(args, batch, 1, WEIGHT_DTYPE, kv_cache=kv_cache)


def longest_context(budget: int, weights: int, per_token: int, window: int | None) -> int | str:
    """Most tokens whose cache fits beside the weights in budget bytes; 'any' when a window's does."""
    room = budget - weights
    if room < per_token:
        return 0
    if window is not None and room >= window * per_token:
        return "any"
    return room // per_token


def computed_row(name: str, args: ModelArgs, mode: str, max_seq_len: int, batch: int, budget: int) -> dict:
    cfg = parse_quant_mode(mode)
    weights = computed_weight_bytes(args, cfg)
    per_token = kv_bytes_per_token(args, batch)
    int8_per_token = kv_bytes_per_token(args, batch, "int8")
    kv = per_token * max_seq_len
    window_kv = per_token * min(max_seq_len, args.sliding_window) if args.sliding_window else None
    room = f"max tokens in {budget / GiB:g} GiB"
    return {"model": name, "quant": cfg.name, "weights GiB": weights / GiB, "KV MiB": kv / MiB,
            "int8 KV MiB": int8_per_token * max_seq_len / MiB,
            "KV window MiB": None if window_kv is None else window_kv / MiB, "total GiB": (weights + kv) / GiB,
            "host peak GiB, load to GPU": computed_host_peak_bytes(args, cfg, weights, to_gpu=True) / GiB,
            "host peak GiB, load to CPU": computed_host_peak_bytes(args, cfg, weights, to_gpu=False) / GiB,
            room: longest_context(budget, weights, per_token, args.sliding_window),
            f"{room}, int8 KV": longest_context(budget, weights, int8_per_token, args.sliding_window),
            "weight bytes": weights, "kv bytes": kv}


def allocated_kv_bytes_per_token(args: ModelArgs, kv_cache: str, positions: int = 16) -> float:
    """KV bytes per token of one sequence, measured: the tensors of a cache allocated for a few
    positions (on the CPU: the layout is the same on a GPU), divided by them."""
    model = empty_model(args)
    model.setup_caches(1, positions, WEIGHT_DTYPE, "cpu", kv_cache=kv_cache)
    return model.cache_bytes() / positions


# --- Measured -------------------------------------------------------------------------------------

def random_tensors(args: ModelArgs, seed: int = 0) -> Iterator[NamedTensor]:
    """Random bf16 weights in the loader's order, made one at a time (norms are ones)."""
    for name, p in empty_model(args).named_parameters():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        yield NamedTensor(name, random_piece(name, 0, tuple(p.shape), WEIGHT_DTYPE, seed), "random")


def build_random_model(args: ModelArgs, cfg: QuantConfig, device: torch.device):
    model = empty_model(args)
    fill_model(model, random_tensors(args), device, WEIGHT_DTYPE, make_linear_hook(cfg, device, WEIGHT_DTYPE))
    return model.eval()


def build_checkpoint_model(ckpt_dir: str, mode: str, device: torch.device, max_seq_len: int, batch: int):
    from llama_int8 import Llama

    # The computed figures keep the head 16-bit: measure what they describe, not the quantized default.
    return Llama.build(ckpt_dir, quant=mode, device=device, dtype=WEIGHT_DTYPE, max_seq_len=max_seq_len,
                       max_batch_size=batch, quantize_head=False).model


@torch.inference_mode()
def measure_gpu(args: ModelArgs, mode: str, ckpt_dir: str | None, max_seq_len: int, batch: int,
                prefill_tokens: int, decode_tokens: int) -> dict:
    """Peak allocated/reserved CUDA memory after load, during a prefill and during decode steps."""
    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if ckpt_dir is None:
        model = build_random_model(args, parse_quant_mode(mode), device)
        model.setup_caches(batch, max_seq_len, WEIGHT_DTYPE, device)
    else:
        model = build_checkpoint_model(ckpt_dir, mode, device, max_seq_len, batch)
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device)  # weights and cache: what the peaks below add to
    out = {"load s": time.perf_counter() - start, "measured weights GiB": weight_bytes(model) / GiB,
           "load alloc GiB": torch.cuda.max_memory_allocated(device) / GiB,
           "load reserved GiB": torch.cuda.max_memory_reserved(device) / GiB}
    tokens = torch.randint(0, args.vocab_size, (batch, prefill_tokens + decode_tokens), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    model(tokens[:, :prefill_tokens], 0, last_only=True)
    torch.cuda.synchronize(device)
    out["prefill alloc GiB"] = torch.cuda.max_memory_allocated(device) / GiB
    out["prefill over held MiB"] = (torch.cuda.max_memory_allocated(device) - held) / MiB
    out["prefill reserved GiB"] = torch.cuda.max_memory_reserved(device) / GiB
    torch.cuda.reset_peak_memory_stats(device)
    for pos in range(prefill_tokens, prefill_tokens + decode_tokens):
        model(tokens[:, pos:pos + 1], pos, last_only=True)
    torch.cuda.synchronize(device)
    out["decode alloc GiB"] = torch.cuda.max_memory_allocated(device) / GiB
    out["decode over held MiB"] = (torch.cuda.max_memory_allocated(device) - held) / MiB
    out["decode reserved GiB"] = torch.cuda.max_memory_reserved(device) / GiB
    del model
    return out


def measure_cpu_here(model_name: str, mode: str, ckpt_dir: str | None, max_seq_len: int, batch: int,
                     n_layers: int | None) -> dict:
    """The child's side of a CPU measurement: load, allocate the cache, report what it holds."""
    device = torch.device("cpu")
    before = rss_anon_bytes()
    start = time.perf_counter()
    if ckpt_dir is None:
        model = build_random_model(with_blocks(MODELS[model_name], n_layers), parse_quant_mode(mode), device)
        model.setup_caches(batch, max_seq_len, WEIGHT_DTYPE, device)
    else:
        model = build_checkpoint_model(ckpt_dir, mode, device, max_seq_len, batch)
    return {"seconds": time.perf_counter() - start, "weights": weight_bytes(model), "cache": model.cache_bytes(),
            "rss_anon_before": before}


def measure_cpu(model_name: str, mode: str, ckpt_dir: str | None, max_seq_len: int, batch: int,
                n_layers: int | None) -> dict:
    """Peak RssAnon of loading in a fresh child process, beyond what its imports hold."""
    cmd = [sys.executable, "-m", "benchmarks.vram", "--child", model_name, "--quant", mode,
           "--max_seq_len", str(max_seq_len), "--max_batch_size", str(batch)]
    if ckpt_dir is not None:
        cmd += ["--ckpt_dir", ckpt_dir]
    if n_layers is not None:
        cmd += ["--n_layers", str(n_layers)]
    child = run_sampled(cmd, cwd=Path(__file__).parent.parent)
    result = child.last_json()
    peak = child.peak_rss_anon - result["rss_anon_before"]
    return {"load s": result["seconds"], "measured weights GiB": result["weights"] / GiB,
            "peak RssAnon GiB": peak / GiB,
            "transient MiB": (peak - result["weights"] - result["cache"]) / MiB}


# --- CLI ------------------------------------------------------------------------------------------

def with_blocks(args: ModelArgs, n_layers: int | None) -> ModelArgs:
    return args if n_layers is None else replace(args, n_layers=n_layers)


def as_list(value: str | tuple | list) -> list[str]:
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]


def main(max_seq_len: int = 2048, max_batch_size: int = 1, models: str | tuple = tuple(MODELS),
         quant: str | tuple = DEFAULT_MODES, budget_gb: float = 24.0, cpu_budget_gb: float = 4.0,
         cpu_models: str | tuple = CPU_MODELS, cpu_modes: str | tuple = CPU_MODES,
         prefill_tokens: int | None = None, decode_tokens: int = 16, measure: bool = True,
         ckpt_dir: str | None = None, json: bool = False, child: str | None = None,
         n_layers: int | None = None) -> None:
    """Weights, KV cache and peak memory per shape and mode; --measure False prints computed figures only."""
    if n_layers is not None and (n_layers < 1 or ckpt_dir is not None):
        raise ValueError(f"n_layers ({n_layers}) must be >= 1, and applies to --models, not to --ckpt_dir")
    if child is not None:  # a CPU measurement's child process
        print(jsonlib.dumps(measure_cpu_here(child, str(quant), ckpt_dir, max_seq_len, max_batch_size, n_layers)))
        return
    if ckpt_dir is not None:
        from llama_int8.formats import open_checkpoint

        checkpoint = open_checkpoint(ckpt_dir)
        shapes = {checkpoint.folder.name: checkpoint.args}
    else:
        unknown = [m for m in as_list(models) if m not in MODELS]
        if unknown:
            raise ValueError(f"models: {unknown} not among {', '.join(MODELS)}")
        shapes = {m: with_blocks(MODELS[m], n_layers) for m in as_list(models)}
    modes = [parse_quant_mode(m).name for m in as_list(quant)]
    cpu_mode_names = [parse_quant_mode(m).name for m in as_list(cpu_modes)]
    gpu = torch.cuda.is_available()
    if prefill_tokens is None:
        prefill_tokens = max(1, max_seq_len - decode_tokens)
    if prefill_tokens + decode_tokens > max_seq_len:
        raise ValueError(f"prefill_tokens + decode_tokens ({prefill_tokens + decode_tokens}) exceed max_seq_len "
                         f"({max_seq_len})")
    limit = torch.cuda.get_device_properties(0).total_memory if gpu else int(cpu_budget_gb * GiB)
    rows, to_measure = [], []
    for name, args in shapes.items():
        measured = {f"{'' if kind == 'model' else kind + ' '}KV bytes/token": allocated_kv_bytes_per_token(args, kind)
                    for kind in KV_CACHES}
        for mode in modes:
            label = name if n_layers is None else f"{name} ({n_layers} block{'s' if n_layers > 1 else ''})"
            row = computed_row(label, args, mode, max_seq_len, max_batch_size, int(budget_gb * GiB)) | measured
            fits = row["weight bytes"] + row["kv bytes"] < (0.9 * limit if gpu else limit)
            chosen = gpu or ckpt_dir is not None or (name in as_list(cpu_models) and mode in cpu_mode_names)
            if measure and fits and chosen:
                to_measure.append((row, name, args, mode))
            rows.append(row)
    if to_measure:
        print(f"Measuring {len(to_measure)} loads, up to a minute or two each on a CPU; --measure False prints the "
              "computed figures at once", file=sys.stderr)
    for row, name, args, mode in tqdm(to_measure, desc="Measuring", unit="load"):
        if gpu:
            row.update(measure_gpu(args, mode, ckpt_dir, max_seq_len, max_batch_size, prefill_tokens, decode_tokens))
        else:
            row.update(measure_cpu(name, mode, ckpt_dir, max_seq_len, max_batch_size, n_layers))
    if not json:
        for row in rows:
            row.pop("weight bytes"), row.pop("kv bytes")
        columns = list(dict.fromkeys(k for row in rows for k in row))
        rows = [{c: row.get(c) for c in columns} for row in rows]
    where = "GPU" if gpu else f"CPU (measured: shapes whose footprint fits {cpu_budget_gb:g} GiB)"
    report(f"Memory per mode, batch {max_batch_size} x {max_seq_len} tokens, bf16 or int8 KV cache and 16-bit "
           f"embeddings/norms/head, {where}", rows, json,
           {"max_seq_len": max_seq_len, "max_batch_size": max_batch_size, "budget_gb": budget_gb})


if __name__ == "__main__":
    fire.Fire(main)
