"""llama.cpp on the same weights, for `benchmarks.speed --compare llama.cpp`.

llama.cpp runs in a child process (benchmarks/llama_cpp_runner.py) started with the Python given as
--llama_cpp_python, or with this one when it can import llama_cpp: llama-cpp-python builds llama.cpp
from source at install time (minutes, a C++ compiler), so it often lives in an environment of its
own, and the runner needs nothing else from this one.

Same weights, same precision: the checkpoint is given to llama.cpp's own quantizer as F32 (for
--quant none), Q8_0 (int8) or Q4_0 (the 4-bit modes), with its default settings; a GGUF source is
requantized from its own weights, so a Q4_1 file is compared as the dequantized Q4_1 weights both
engines read. A Meta or Hugging Face folder is first written as a 16-bit GGUF with the `gguf` package
(Meta's rotary layout, which llama.cpp's llama architecture expects; a stand-in vocabulary, since
both engines are fed token ids). The files are kept under ~/.cache/llama_int8/llama_cpp.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from llama_int8.formats import open_checkpoint
from llama_int8.model import ModelArgs

RUNNER = Path(__file__).with_name("llama_cpp_runner.py")
CACHE = Path.home() / ".cache" / "llama_int8" / "llama_cpp"
# llama.cpp's type for each of our modes: the same number of bits per weight, or the nearest below.
LLAMA_CPP_TYPES = {"none": "F32", "int8": "Q8_0", "nf4": "Q4_0", "nf4-dq": "Q4_0", "fp4": "Q4_0", "fp4-dq": "Q4_0",
                   "gguf": "Q4_0"}


def llama_cpp_python(given: str | None) -> str:
    """The Python that runs llama.cpp: the one given, or this one when it has llama_cpp."""
    if given is not None:
        return given
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    raise ValueError("--compare llama.cpp needs llama-cpp-python: `pip install llama-cpp-python` here, or pass "
                     "--llama_cpp_python /path/to/bin/python of an environment that has it")


class LlamaCppProcess:
    """The runner in a child process, one JSON request and answer per line."""

    def __init__(self, python: str):
        self.process = subprocess.Popen([python, str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def request(self, op: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp's runner exited (code {self.process.wait()}) on {op!r}")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise RuntimeError(f"llama.cpp's runner, {op!r}: {answer['error']}")
        return answer

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def llama_cpp_gguf(source: Path, quant: str, runner: LlamaCppProcess) -> Path:
    """The GGUF llama.cpp runs for source at quant's precision, made (once, cached) by its quantizer."""
    kind = LLAMA_CPP_TYPES[quant]
    CACHE.mkdir(parents=True, exist_ok=True)
    if source.suffix == ".gguf":
        base = source
    else:
        base = CACHE / f"{source.resolve().name}.F16.gguf"
        if not base.exists():
            write_f16_gguf(source, base)
    target = CACHE / f"{base.stem}.{kind}.gguf"
    if not target.exists() or target.stat().st_mtime < base.stat().st_mtime:
        partial = target.with_suffix(".partial")
        runner.request("quantize", source=str(base), target=str(partial), type=kind)
        partial.rename(target)
    return target


# --- A Meta or Hugging Face folder as a 16-bit GGUF ------------------------------------------------

GGUF_LAYER_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
                    "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
                    "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
GGUF_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                  "output.weight": "output.weight"}


def gguf_name(meta_name: str) -> str:
    """llama.cpp's name for a parameter of ours (`layers.3.attention.wq.weight` -> `blk.3.attn_q.weight`)."""
    if meta_name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[meta_name]
    _, index, *rest = meta_name.split(".")
    return f"blk.{index}.{GGUF_LAYER_NAMES['.'.join(rest[:-1])]}.weight"


def write_f16_gguf(folder: Path, path: Path) -> None:
    """folder's weights as a GGUF llama.cpp loads: 2-D tensors float16, norms float32."""
    import gguf

    checkpoint = open_checkpoint(folder)
    if checkpoint.quant is not None:
        raise ValueError(f"{folder} holds {checkpoint.quant.name} layers; compare llama.cpp on its 16-bit source")
    partial = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    add_hyperparameters(writer, checkpoint.args)
    add_stand_in_vocabulary(writer, checkpoint.args.vocab_size)
    for item in checkpoint.tensors():
        value = item.tensor.float().numpy()
        writer.add_tensor(gguf_name(item.name), value.astype("float16") if value.ndim == 2 else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(path)


def add_hyperparameters(writer, args: ModelArgs) -> None:
    import gguf

    writer.add_context_length(args.max_position_embeddings or 4096)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def add_stand_in_vocabulary(writer, vocab_size: int) -> None:
    """A SentencePiece-style vocabulary of vocab_size pieces: what llama.cpp needs to load a model
    it is only ever given token ids for."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # unknown, control, control, byte
    pieces += [f"\u2581w{i}" for i in range(vocab_size - len(pieces))]
    types += [1] * (vocab_size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([-float(i) for i in range(vocab_size)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def llama_cpp_generate(runner: LlamaCppProcess, prompt: list[int]):
    """A speed.Generate for llama.cpp: one greedy generation of n tokens at batch 1."""
    def run(n: int) -> list[int]:
        return runner.request("generate", prompt=prompt, n=n)["tokens"]
    return run


def load_llama_cpp(source: Path, quant: str, python: str | None, n_ctx: int) -> tuple[LlamaCppProcess, Path]:
    """A runner with source loaded at quant's precision, on torch's number of threads."""
    runner = LlamaCppProcess(llama_cpp_python(python))
    gguf_path = llama_cpp_gguf(source, quant, runner)
    runner.request("load", path=str(gguf_path), threads=torch.get_num_threads(), n_ctx=n_ctx)
    return runner, gguf_path
