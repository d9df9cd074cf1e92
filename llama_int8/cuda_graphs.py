"""Decode steps replayed from CUDA graphs.

At batch 1 a GPU decode step launches a few hundred small kernels, and the host's time to launch
them, not the GPU's to read the weights, can be the step. A CUDA graph records the launches of one
step once and replays them with one call. What it records must take the same shapes and addresses at
every replay and never wait on the host: Transformer.decode_hidden is that step (attention over the
whole cache, masked; the positions a tensor), and CapturedStep keeps its inputs and output in fixed
buffers. The head runs outside the graph, after it: an int8 head (LLM.int8(), the quantized modes'
default) reads its outlier columns back to the host at every call, which a capture cannot hold.

DecodeGraphs captures one graph per batch size, at the first decode step of that size; Llama.build
refuses a model a graph cannot hold before loading it (capture_refusal), and a capture that fails
all the same leaves every later step to forward's own blocks, with a warning.
"""

from __future__ import annotations

import logging

import torch

from .model import KVCache, RollingKVCache, Transformer
from .quantize import QuantConfig

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager runs on a side stream before the capture, as torch's CUDA graph notes ask


def capture_refusal(device: torch.device, cfg: QuantConfig, n_experts: int) -> str | None:
    """Why a graph cannot hold the decode step of a model quantized as cfg with n_experts experts a
    block (0: dense) on device, or None where it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; the model is on {device.type}"
    if cfg.mode == "int8" and cfg.int8_threshold > 0:
        return ("LLM.int8() layers with an outlier threshold read their outlier columns back to the host "
                "at every call; --int8_threshold 0 and the other modes have no such read")
    if n_experts:
        return "a mixture-of-experts block reads its experts' choices back to the host at every call"
    return None


class CapturedStep:
    """Transformer.decode_hidden for rows 0..batch-1, captured once; each call copies the tokens and
    the position in, replays, and returns the hidden states, a buffer the next call overwrites."""

    def __init__(self, model: Transformer, batch: int):
        device = model.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.full((batch,), model.max_seq_len - 1, dtype=torch.long, device=device)
        kept = kept_cache_slots(model, batch, model.max_seq_len - 1)  # the warm-up writes there
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    model.decode_hidden(self.tokens, self.positions)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # Captured on the warm-up's stream: libraries that keep a handle per stream (cuBLAS's
            # workspace) made theirs during the warm-up, not inside the capture.
            with torch.cuda.graph(self.graph, stream=side):
                self.hidden = model.decode_hidden(self.tokens, self.positions)
        finally:
            torch.cuda.current_stream(device).wait_stream(side)
            for slot, saved in kept:
                slot.copy_(saved)

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.fill_(position)
        self.graph.replay()
        return self.hidden


def kept_cache_slots(model: Transformer, batch: int, position: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(each cache buffer's slot that rows 0..batch-1 keep position in, a copy of what it holds now):
    a graph is captured when the first step of its batch size comes, when the rows may hold a text
    already, and the warm-up's keys and values must not stay there."""
    slots = []
    for m in model.modules():
        if isinstance(m, (KVCache, RollingKVCache)):
            for buffer in (m.k, m.v):
                slot = buffer[:batch, :, position % buffer.shape[2]]
                slots.append((slot, slot.clone()))
    return slots


class DecodeGraphs:
    """A model's decode steps at one position for all rows (what Llama.generate runs), replayed from
    one CUDA graph per batch size: what Transformer.decode_graph takes, for a model capture_refusal
    accepts. It holds the graphs and their buffers, not the model, which passes itself."""

    def __init__(self) -> None:
        self.steps: dict[int, CapturedStep] = {}
        self.failure: str | None = None  # why a capture failed, after which every step runs eagerly

    def __call__(self, model: Transformer, tokens: torch.Tensor, position: int) -> torch.Tensor | None:
        if self.failure is not None:
            return None
        b = tokens.shape[0]
        if b not in self.steps:
            log.info("Capturing the decode step of %d row(s) as a CUDA graph", b)
            try:
                self.steps[b] = CapturedStep(model, b)
            except RuntimeError as e:  # a kernel that waits on the host, which capture_refusal does not know
                self.failure = str(e).splitlines()[0]
                log.warning("Decode steps run without a CUDA graph: capturing one failed: %s", self.failure)
                return None
        return self.steps[b](tokens, position)
