"""Load time and peak private host memory of loading a checkpoint to the CPU, quantized: ours (quantizing
while reading a Meta checkpoint), ours from a pre-baked folder, and transformers + bitsandbytes
(`from_pretrained` with a BitsAndBytesConfig) on the same weights in Hugging Face's format.

    python -m benchmarks.load                          # TinyLlama-1.1B shapes, random bf16 weights, int8
    python -m benchmarks.load --quant int8,nf4 --json
    python -m benchmarks.load --shape Mixtral-1B --quant int8,nf4 --engines llama_int8,prebaked
    python -m benchmarks.load --engines prebaked --verify false   # without the shard checksums
    python -m benchmarks.load --ckpt_dir 7B --hf_dir 7B-hf --work_dir /data/bench

Without --ckpt_dir, random bf16 weights in --shape's shapes (benchmarks.synthetic; TinyLlama-1.1B by
default) are written once under --work_dir as a Meta checkpoint cut into 2 shards, with an HF copy of
the same weights; a mixture of experts (Mixtral), which has no Meta format here, as one HF folder
that every engine reads (transformers quantizes nn.Linear modules only, so there a Mixtral's experts
stay 16-bit: read its row against its "weights GiB"). Several --quant modes, comma-separated, run one
after another. The pre-baked folder is made with quantize_offline's writer. Each load runs in a fresh
process that has already imported its libraries: "load s" is the load call alone. Peak RssAnon is
sampled every 2 ms over the whole process; "imports" is its RssAnon just before the load call. Files
are read once beforehand, so every engine reads from the page cache.
"""

from __future__ import annotations

import json as jsonlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fire
import torch

from benchmarks.common import report
from benchmarks.hostmem import rss_anon_bytes, run_sampled

GiB = 1024**3
ENGINES = ("llama_int8", "prebaked", "transformers")
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "llama_int8-bench-load"


def measure_here(engine: str, folder: str, quant: str, dtype: str, verify: bool = True) -> dict:
    """Load folder with one engine in this process (imports first, then the timed load call);
    verify: check a pre-baked folder's shard checksums."""
    torch_dtype = getattr(torch, dtype)
    if engine in ("llama_int8", "prebaked"):
        from llama_int8 import Llama
        from llama_int8.memory import weight_bytes

        before = rss_anon_bytes()
        start = time.perf_counter()
        llm = Llama.build(folder, max_seq_len=8, quant=quant, device="cpu", dtype=torch_dtype, verify=verify)
        seconds = time.perf_counter() - start
        footprint = weight_bytes(llm.model)
    elif engine == "transformers":
        import bitsandbytes  # noqa: F401  (imported before the clock starts, as ours is)
        from transformers import AutoModelForCausalLM

        from benchmarks.reference import bnb_config

        config = bnb_config(quant, torch_dtype)
        before = rss_anon_bytes()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, quantization_config=config,
                                                     device_map={"": "cpu"})
        seconds = time.perf_counter() - start
        footprint = model.get_memory_footprint()
    else:
        raise ValueError(f"engine: {engine!r} is not one of {ENGINES}")
    return {"seconds": seconds, "footprint": footprint, "rss_anon_before": before}


def prepare_synthetic(work_dir: Path, shape_name: str) -> tuple[Path, Path, str]:
    """Random bf16 weights in a named shape: a 2-shard Meta checkpoint and its HF copy, or for a mixture
    of experts one HF folder for both; and a title naming them."""
    from benchmarks.synthetic import (parameter_count, shape, write_hf_checkpoint, write_meta_checkpoint,
                                      write_random_hf_checkpoint, write_word_tokenizer)

    args = shape(shape_name)
    described = f"{shape_name} shapes ({parameter_count(args) / 1e9:.2f} B parameters), random bf16 weights"
    meta, hf = work_dir / f"{shape_name.lower()}-meta", work_dir / f"{shape_name.lower()}-hf"
    if args.n_experts:
        if not (hf / "config.json").exists():  # written whole or not at all (the writer renames it into place)
            write_random_hf_checkpoint(hf, args, dtype=torch.bfloat16)
        return hf, hf, f"{described}, Hugging Face format"
    if not (meta / "done").exists():
        write_meta_checkpoint(meta, args, shards=2, dtype=torch.bfloat16)
        write_word_tokenizer(meta)
        (meta / "done").touch()
    if not (hf / "done").exists():
        write_hf_checkpoint(meta, hf, args, dtype=torch.bfloat16)
        write_word_tokenizer(hf)
        (hf / "done").touch()
    return meta, hf, f"{described}, Meta format in 2 shards"


def prepare_prebaked(source: Path, work_dir: Path, quant: str) -> Path:
    """The pre-baked folder of source, written again when missing or of an older format version."""
    from llama_int8.formats import CheckpointError, open_checkpoint
    from llama_int8.formats.prebaked import read_manifest, write_prebaked
    from llama_int8.quantize import parse_quant_mode

    out = work_dir / f"{source.name}-{quant}"
    try:
        read_manifest(out, verify=False)
    except CheckpointError:
        write_prebaked(open_checkpoint(source), out, parse_quant_mode(quant), force=True)
    return out


def read_files(folder: Path) -> None:
    """Read every file once so that no engine pays for the disk."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def measure_engine(name: str, folder: Path, quant: str, dtype: str, verify: bool, runs: int) -> dict:
    """One engine's row: its median load time and highest peak RssAnon over runs, each in a fresh process."""
    read_files(folder)
    results = []
    for _ in range(runs):
        child = run_sampled([sys.executable, "-m", "benchmarks.load", "--engine", name, "--ckpt_dir", str(folder),
                             "--quant", quant, "--dtype", dtype, "--verify", str(verify)],
                            cwd=Path(__file__).parent.parent)
        results.append({**child.last_json(), "peak": child.peak_rss_anon})
    seconds = statistics.median(r["seconds"] for r in results)
    peak = max(r["peak"] for r in results)
    footprint = results[0]["footprint"]
    return {"engine": name, "quant": quant, "load s": seconds, "peak RssAnon GiB": peak / GiB,
            "weights GiB": footprint / GiB, "peak - weights GiB": (peak - footprint) / GiB,
            "imports GiB": results[0]["rss_anon_before"] / GiB}


def main(ckpt_dir: str | None = None, hf_dir: str | None = None, quant: str | tuple = "int8",
         dtype: str = "bfloat16", engines: str | tuple = ENGINES, runs: int = 1, work_dir: str = str(DEFAULT_WORK_DIR),
         json: bool = False, engine: str | None = None, verify: bool = True, shape: str = "TinyLlama-1.1B") -> None:
    """Measure each engine's load in its own process, for each quant mode (comma-separated); --engine E
    --ckpt_dir D measures one load here. --verify false loads pre-baked folders without checking their
    shard checksums; shape: benchmarks.synthetic's shape of the random weights, without --ckpt_dir."""
    if engine is not None:  # the child's side
        print(jsonlib.dumps(measure_here(engine, str(ckpt_dir), quant, dtype, verify)))
        return
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if ckpt_dir is None:
        meta, hf, title = prepare_synthetic(work, shape)
    else:
        meta, hf = Path(ckpt_dir), Path(hf_dir) if hf_dir else None
        title = meta.name
    chosen = engines.split(",") if isinstance(engines, str) else list(engines)
    quants = quant.split(",") if isinstance(quant, str) else list(quant)  # fire: "a,b" -> tuple
    rows = []
    for mode in quants:
        folders = {"llama_int8": meta, "transformers": hf,
                   "prebaked": prepare_prebaked(meta, work, mode) if "prebaked" in chosen else None}
        mode_rows = [measure_engine(name, folder, mode, dtype, verify, runs)
                     for name in chosen if (folder := folders.get(name)) is not None]
        base = next((r["load s"] for r in mode_rows if r["engine"] == "transformers"), None)
        for r in mode_rows:
            r["x transformers time"] = None if base is None else r["load s"] / base
        rows += mode_rows
    report(f"Load to the CPU: {title}, {dtype}", rows, json, {"runs": runs, "verify": verify})


if __name__ == "__main__":
    fire.Fire(main)
