"""llama.cpp's side of `benchmarks.speed --compare llama.cpp`, run by a Python that has llama_cpp.

    /path/to/python benchmarks/llama_cpp_runner.py

It imports only llama_cpp (llama-cpp-python) and numpy, so it runs from a virtual environment that
has neither torch nor this project. One JSON request per line on stdin, one JSON answer per line on
stdout (llama.cpp's own messages go to stderr):

    {"op": "quantize", "source": PATH, "target": PATH, "type": "Q8_0"}   llama.cpp's quantizer
    {"op": "load", "path": PATH, "threads": 2, "n_ctx": 256}               one model and context
    {"op": "generate", "prompt": [ids], "n": 64}                           greedy, from an empty cache
    {"op": "info"}                                                         versions, system info

Every answer is {"ok": true, ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import json
import sys

import llama_cpp
import numpy as np

# llama.cpp's file types for the precisions benchmarks.speed compares (LLAMA_FTYPE_<name>).
FTYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0"}


def quantize(source: str, target: str, kind: str) -> dict:
    """llama.cpp's quantizer with its default settings; a quantized source is requantized (its
    weights dequantized first), as `llama-quantize --allow-requantize` does."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{FTYPES[kind]}")
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {target}, {kind}) returned {rc}")
    return {}


class Model:
    """One llama.cpp model and context, generating greedily at batch 1."""

    def __init__(self, path: str, threads: int, n_ctx: int):
        self.llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=n_ctx, n_ubatch=n_ctx, verbose=False)
        self.vocab = self.llm.n_vocab()

    def generate(self, prompt: list[int], n: int) -> dict:
        """n greedy tokens after prompt, the cache cleared first (a fresh prefill every call)."""
        llm = self.llm
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        llm.eval(prompt)
        tokens = [self.last_argmax()]
        while len(tokens) < n:
            llm.eval([tokens[-1]])
            tokens.append(self.last_argmax())
        return {"tokens": tokens}

    def last_argmax(self) -> int:
        """The greedy token from the last position's logits (eval does not copy them out)."""
        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.vocab,))))


def serve() -> None:
    model: Model | None = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            op = request["op"]
            if op == "quantize":
                answer = quantize(request["source"], request["target"], request["type"])
            elif op == "load":
                model = Model(request["path"], int(request["threads"]), int(request["n_ctx"]))
                answer = {}
            elif op == "generate":
                if model is None:
                    raise RuntimeError("generate before load")
                answer = model.generate(request["prompt"], int(request["n"]))
            elif op == "info":
                answer = {"version": llama_cpp.__version__, "system": llama_cpp.llama_print_system_info().decode()}
            else:
                raise ValueError(f"unknown op {op!r}")
            print(json.dumps({"ok": True, **answer}), flush=True)
        except Exception as e:  # reported to the benchmark, which raises it there
            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)


if __name__ == "__main__":
    serve()
