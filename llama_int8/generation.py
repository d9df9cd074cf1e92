"""The user-facing generator: `Llama.build`, `generate`, `text_completion`, `chat_completion` and streaming."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

import torch

from .chat import ChatPrediction, Dialog, encode_dialog
from .cuda_graphs import DecodeGraphs, capture_refusal
from .engine import DEFAULT_MAX_QUEUE, Engine
from .formats import Checkpoint, open_checkpoint
from .loader import (check_memory_fits, choose_attention_backend, default_device, default_dtype, gguf_packed_weights,
                     load_weights, never_generate, release_page_cache)
from .memory import describe_memory
from .model import Transformer, empty_model
from .params import (check_dialogs, check_integer, check_max_gen_len, check_one_dialog, check_prompt_tokens,
                     check_prompts, check_sampling_args, check_text, check_token_ids, effective_temperature)
from .quantize import QuantConfig, parse_quant_mode
from .quantized_layers import INT8_MATMULS, fused_product
from .sampling import next_tokens
from .tokenizer import Tokenizer, check_tokenizer_fits, ids_beyond_tokenizer

log = logging.getLogger(__name__)

class CompletionPrediction(TypedDict):
    generation: str
    tokens: list[int]


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @staticmethod
    def build(ckpt_dir: str | Path | list[str | Path], tokenizer_path: str | Path | None = None,
              max_seq_len: int = 512, max_batch_size: int = 1, quant: str = "int8",
              device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
              attention: str | None = None, int8_threshold: float | None = None, int8_matmul: str = "llm.int8",
              blocksize: int | None = None,
              quantize_head: bool | None = None, delta: str | Path | list[str | Path] | None = None,
              sliding_window: int | None = None, prefill_chunk: int | None = None, kv_cache: str = "model",
              verify: bool = True, cuda_graph: bool = False) -> Llama:
        """Load a checkpoint (Meta, Hugging Face, GGUF or pre-baked) and its tokenizer, ready to generate.

        ckpt_dir may list several folders: a base, then overlays (partial checkpoints whose tensors
        replace the base's, PEFT LoRA adapters) merged in order before quantizing; delta lists
        folders added to the weights (base + delta). See formats/stack.py; the tokenizer is the base's.

        quant: int8 (LLM.int8()), nf4, nf4-dq, fp4, fp4-dq, gguf or none; the linear layers of the blocks
        are quantized on the host as they are read, and only their quantized bytes reach the device;
        gguf packs a GGUF file's Q4_0/Q4_1 block weights as they are stored (int4pack.py).
        quantize_head: quantize the output head too, int8 in every mode, a head tied to the embedding
        as one table the embedding reads its rows from; None (the default) does so in the quantized
        modes, False keeps the head and embedding 16-bit as the checkpoint has them. A pre-baked folder (quantize_offline.py) loads in the mode
        it was baked in. int8_threshold: LLM.int8()'s outlier threshold (default 6.0, or the baked one);
        int8_matmul: "llm.int8" computes int8 layers as bitsandbytes does; "weight_only" has CPU steps of
        up to a few rows multiply bfloat16 activations by the same int8 weights (quantized_layers.Int8Product).
        blocksize: 4-bit weights per scale (default 64, 32 for the -dq modes).
        max_seq_len x max_batch_size sizes the KV cache, allocated once here. attention picks the
        backend ("flash", "sdpa", "math"); None takes flash-attn where it is installed and usable.
        sliding_window: each token attends to itself and the sliding_window - 1 before it, overriding
        the checkpoint's (None keeps it); the KV cache then holds only that many positions.
        prefill_chunk: prompts longer than this are prefilled in chunks of it (at most the window).
        kv_cache: "model" keeps keys and values in the model's dtype; "int8" stores them as int8 with
        one scale per position and key/value head, quantized as they are written and dequantized
        inside attention a chunk at a time: half a 16-bit cache's bytes plus the scales (model.Int8KVCache).
        verify: check a pre-baked folder's shard checksums (reads the folder once; on by default).
        cuda_graph: on a CUDA device, replay each decode step of generate from a CUDA graph, captured at
        the first step of each batch size (cuda_graphs.py); refused with the reason for a model a graph
        cannot hold (LLM.int8() layers with an outlier threshold, mixture-of-experts blocks) and off
        a CUDA device.

        Before anything is allocated, the configuration is checked (formats/model_config.py), the
        tokenizer against the model's vocabulary, and the weights plus the KV cache against the
        device's free memory.
        """
        start = time.perf_counter()
        cfg = parse_quant_mode(quant, 6.0 if int8_threshold is None else int8_threshold, blocksize, quantize_head)
        if int8_matmul not in INT8_MATMULS:
            raise ValueError(f"int8_matmul: {int8_matmul!r} is not one of {', '.join(INT8_MATMULS)}")
        check_integer("max_batch_size", max_batch_size, 1)
        check_integer("max_seq_len", max_seq_len, 2)
        if sliding_window is not None:
            check_integer("sliding_window", sliding_window, 1)
        checkpoint = open_checkpoint(ckpt_dir, delta, verify)
        tokenizer = checkpoint.tokenizer(tokenizer_path)
        check_tokenizer_fits(tokenizer, checkpoint.args.vocab_size, checkpoint.location)
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(dtype, device)
        backend = choose_attention_backend(attention, device, dtype)
        args = checkpoint.args if sliding_window is None else replace(checkpoint.args, sliding_window=sliding_window)
        model = empty_model(args, backend)
        cfg = quantization_to_load(checkpoint, cfg, quant, int8_threshold)
        refusal = capture_refusal(device, cfg, args.n_experts) if cuda_graph else None
        if refusal is not None:
            raise ValueError(f"cuda_graph: {refusal}")
        check_memory_fits(model, cfg, device, dtype, max_batch_size, max_seq_len, kv_cache,
                          gguf_packed_weights(checkpoint, cfg))
        load_weights(model, checkpoint, cfg, device, dtype)
        source, sources = f"{checkpoint.format} checkpoint {checkpoint.location}", checkpoint.paths()
        del checkpoint  # closes its memory maps, so that the kernel may drop the pages they held
        release_page_cache(sources)
        model.fuse_projections(partial(fused_product, int8_matmul=int8_matmul))
        model.setup_caches(max_batch_size, max_seq_len, dtype, device, prefill_chunk, kv_cache)
        model.eval()
        if cuda_graph:
            model.decode_graph = DecodeGraphs()
        never_generate(model, ids_beyond_tokenizer(tokenizer, args.vocab_size))
        log.info("Loaded %s in %.1f s (%s, %s, %s, %s attention): %s", source, time.perf_counter() - start,
                 cfg.name, device, str(dtype).removeprefix("torch."), backend, describe_memory(model, device))
        return Llama(model, tokenizer)

    @torch.inference_mode()
    def iter_generate(self, prompt_tokens: list[list[int]], max_gen_len: int | None = None,
                      temperature: float = 0.6, top_p: float = 0.9, repetition_penalty: float = 1.0,
                      seed: int | None = None, stop_ids: Collection[int] | None = None
                      ) -> Iterator[list[int | None]]:
        """Yield, at each step, the token each sequence generated, or None where it is still reading
        its prompt or has stopped. Prompts of different lengths share the batch: all run together
        from the shortest prompt's end, and a longer prompt's own tokens are fed instead of samples.
        stop_ids: tokens that end a sequence (the tokenizer's by default; empty runs to max_gen_len).
        max_gen_len 0 yields nothing. Every argument is checked (params.py) before any model work."""
        self.check_generation_args(prompt_tokens, max_gen_len, temperature, top_p, repetition_penalty, seed,
                                   stop_ids)
        if max_gen_len == 0:
            return
        temperature = effective_temperature(temperature)
        model = self.model
        bsz, max_prompt = len(prompt_tokens), max(len(t) for t in prompt_tokens)
        if max_gen_len is None:
            max_gen_len = model.max_seq_len - 1
        total_len = min(model.max_seq_len, max_gen_len + max_prompt)
        device = model.device
        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)
        is_prompt = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
        for i, t in enumerate(prompt_tokens):
            tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long, device=device)
            is_prompt[i, :len(t)] = True
        seen = None  # tokens each sequence holds so far: only the repetition penalty reads it
        if repetition_penalty != 1.0:
            seen = torch.zeros((bsz, model.args.vocab_size), dtype=torch.bool, device=device)
            for i, t in enumerate(prompt_tokens):
                seen[i, t] = True
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        stop_ids = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        n_generated = torch.zeros(bsz, dtype=torch.long, device=device)  # shorter prompts must stop at max_gen_len too
        prev_pos = 0
        for cur_pos in range(min(len(t) for t in prompt_tokens), total_len):
            logits = model(tokens[:, prev_pos:cur_pos], prev_pos, last_only=True)[:, -1]
            sampled = next_tokens(logits, temperature, top_p, repetition_penalty, seen, generator)
            forced = is_prompt[:, cur_pos]
            nxt = torch.where(forced, tokens[:, cur_pos], sampled)
            tokens[:, cur_pos] = nxt
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            emitted = ~forced & ~done
            n_generated += emitted
            done |= (emitted & torch.isin(nxt, stop_tensor)) | (n_generated >= max_gen_len)
            prev_pos = cur_pos
            # One device-to-host copy per step, the loop's only wait on a GPU: the tokens, and what to do
            # next. (int8 layers with an outlier threshold wait too, inside bitsandbytes: README, Quantization.)
            step_tokens, step_emitted, step_done = torch.stack((nxt, emitted.long(), done.long())).tolist()
            yield [t if e else None for t, e in zip(step_tokens, step_emitted)]
            if all(step_done):
                break

    def check_generation_args(self, prompt_tokens: list[list[int]], max_gen_len: int | None, temperature: float,
                              top_p: float, repetition_penalty: float, seed: int | None,
                              stop_ids: Collection[int] | None) -> None:
        """Refuse bad arguments with a ValueError naming the argument (see params.py)."""
        if isinstance(prompt_tokens, (list, tuple)) and not prompt_tokens:
            raise ValueError("prompt_tokens: no prompts given")
        check_prompt_tokens(prompt_tokens, self.model.args.vocab_size)
        check_max_gen_len(max_gen_len)
        check_sampling_args(temperature, top_p, repetition_penalty, seed)
        if stop_ids is not None:
            if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Collection):
                raise ValueError(f"stop_ids: expected a collection of token ids, got {type(stop_ids).__name__}")
            check_token_ids(stop_ids, "stop_ids", self.model.args.vocab_size)
        self.check_batch(prompt_tokens)

    def check_batch(self, prompt_tokens: list[list[int]]) -> None:
        """Refuse what the preallocated cache cannot hold, before any work is done."""
        model = self.model
        if not prompt_tokens:
            raise ValueError("no prompts given")
        if len(prompt_tokens) > model.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size={model.max_batch_size}; "
                             "raise --max_batch_size or pass fewer prompts")
        for i, t in enumerate(prompt_tokens):
            if not t:
                raise ValueError(f"prompt {i} is empty after tokenization")
            if len(t) >= model.max_seq_len:
                raise ValueError(f"prompt {i} has {len(t)} tokens; max_seq_len={model.max_seq_len} leaves no "
                                 "room to generate: raise --max_seq_len or shorten the prompt")

    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int | None = None, temperature: float = 0.6,
                 top_p: float = 0.9, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_ids: Collection[int] | None = None) -> list[list[int]]:
        """The generated tokens of each prompt, stop token excluded."""
        self.check_generation_args(prompt_tokens, max_gen_len, temperature, top_p, repetition_penalty, seed, stop_ids)
        stop_ids = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        out: list[list[int]] = [[] for _ in prompt_tokens]
        for step in self.iter_generate(prompt_tokens, max_gen_len, temperature, top_p, repetition_penalty, seed,
                                       stop_ids):
            for seq, t in zip(out, step):
                if t is not None:
                    seq.append(t)
        return [cut_at_stop(seq, stop_ids) for seq in out]

    def text_completion(self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, repetition_penalty: float = 1.0,
                        seed: int | None = None) -> list[CompletionPrediction]:
        """The completion of each prompt (a list of strings), generated as one batch."""
        check_prompts(prompts)
        check_max_gen_len(max_gen_len)
        check_sampling_args(temperature, top_p, repetition_penalty, seed)
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        generated = self.generate(prompt_tokens, max_gen_len, temperature, top_p, repetition_penalty, seed)
        return [{"generation": self.tokenizer.decode(t), "tokens": t} for t in generated]

    def stream_completion(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9,
                          max_gen_len: int | None = None, repetition_penalty: float = 1.0,
                          seed: int | None = None) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as it is generated."""
        check_text(prompt, "prompt")
        tokens = self.tokenizer.encode(prompt, bos=True, eos=False)
        yield from self.stream_tokens(tokens, temperature, top_p, max_gen_len, repetition_penalty, seed)

    def engine(self, max_queue: int = DEFAULT_MAX_QUEUE, whole_prompts: bool = False) -> Engine:
        """A continuous-batching engine over this model's cache slots (engine.py). whole_prompts:
        prefill each prompt in one step where the model allows it (a sliding window or prefill_chunk
        bounds the chunks), which is faster when no stream waits on its next token."""
        return Engine(self.model, self.tokenizer, max_queue, self.model.max_seq_len if whole_prompts else None)

    def encode_dialog(self, dialog: Dialog, continue_final: bool = False,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt tokens of a dialog in this model's chat format (see chat.encode_dialog)."""
        return encode_dialog(self.tokenizer, dialog, continue_final, tools)

    def chat_completion(self, dialogs: list[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, repetition_penalty: float = 1.0,
                        seed: int | None = None) -> list[ChatPrediction]:
        """The assistant's next message for each dialog, generated as one batch."""
        check_dialogs(dialogs)
        check_max_gen_len(max_gen_len)
        check_sampling_args(temperature, top_p, repetition_penalty, seed)
        prompt_tokens = [self.encode_dialog(d) for d in dialogs]
        generated = self.generate(prompt_tokens, max_gen_len, temperature, top_p, repetition_penalty, seed)
        return [{"generation": {"role": "assistant", "content": self.tokenizer.decode(t)}, "tokens": t}
                for t in generated]

    def stream_chat(self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: int | None = None, repetition_penalty: float = 1.0,
                    seed: int | None = None) -> Iterator[str]:
        """Yield the assistant's next message in a dialog piece by piece as it is generated."""
        check_one_dialog(dialog)
        yield from self.stream_tokens(self.encode_dialog(dialog), temperature, top_p, max_gen_len,
                                      repetition_penalty, seed)

    def stream_tokens(self, prompt_tokens: list[int], temperature: float, top_p: float,
                      max_gen_len: int | None, repetition_penalty: float, seed: int | None) -> Iterator[str]:
        # Decoding one piece at a time loses SentencePiece's leading spaces and splits multi-byte
        # characters: decode everything so far and yield what is new.
        ids: list[int] = []
        text = ""
        for (t,) in self.iter_generate([prompt_tokens], max_gen_len, temperature, top_p, repetition_penalty, seed):
            if t is None or t in self.tokenizer.stop_ids:
                continue
            ids.append(t)
            new_text = self.tokenizer.decode(ids)
            if new_text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 sequence: wait for its remaining bytes
            yield new_text[len(text):]
            text = new_text


def quantization_to_load(checkpoint: Checkpoint, requested: QuantConfig, quant: str,
                         int8_threshold: float | None) -> QuantConfig:
    """The mode the checkpoint loads in: the requested one, or the one its layers were stored in
    (with int8_threshold, when given, replacing the stored threshold)."""
    stored = checkpoint.quant
    if stored is None:
        return requested
    if requested.mode == "gguf":  # its layers are a GGUF file's, repacked: never another mode's
        raise ValueError(f"quant='gguf' serves the Q4_0/Q4_1 weights of a GGUF file as they are stored, but "
                         f"{checkpoint.location} was quantized offline to {stored.name}: load it without --quant gguf")
    if stored.name != requested.name:
        log.warning("%s was quantized offline to %s: loading it as it is (quant=%r ignored)",
                    checkpoint.location, stored.name, quant)
    return stored if int8_threshold is None else replace(stored, int8_threshold=float(int8_threshold))


def cut_at_stop(tokens: list[int], stop_ids: Collection[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype: {dtype!r} is not one of float32, bfloat16, float16")
    return names[dtype]
