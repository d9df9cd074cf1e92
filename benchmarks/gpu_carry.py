"""What benchmarks.gpu_check needs on a GPU machine that reaches no package registry, gathered into one
folder small enough (under 60 MiB) to copy there with the working tree:

    python -m benchmarks.gpu_carry                    # here: writes .cache/gpu_check (about 58 MB)
    python3 -m benchmarks.gpu_check                   # there, with .cache/gpu_check carried along

- site/: the pure-Python packages the GPU machine's image lacks (MISSING_THERE), copied from this
  environment's installation, file by file as their metadata lists them, so their versions are the
  ones tested here. Of bitsandbytes' native libraries only the CPU one and those for --cuda_versions
  are kept: the image's torch is built for CUDA 13.0, and bitsandbytes falls back within a major
  version. gpu_check puts site/ on its parts' PYTHONPATH.
- The demo model cut to its first --blocks blocks (embedding, final norm and tokenizer kept, every
  tensor copied as it is stored): the whole file (98 MB) does not fit beside the rest.

torch (built for CUDA), transformers, pytest, sentencepiece, tokenizers, safetensors, tqdm, numpy,
jinja2 and pyyaml must be on the GPU machine already: torch's CUDA wheels alone are gigabytes.
"""

from __future__ import annotations

import argparse
import re
import shutil
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from llama_int8.flags import make_parser, positive_int, run_cli

DEFAULT_FOLDER = Path(".cache/gpu_check")
# What the GPU machine this was written for lacked (its Python holds torch, transformers and pytest),
# all pure Python: bitsandbytes loads its native libraries with ctypes, whatever the Python version.
MISSING_THERE = ("bitsandbytes", "gguf", "fire", "termcolor")
BITSANDBYTES_LIBRARY = re.compile(r"libbitsandbytes_(cuda|rocm|xpu)(\d+)\.so$")
# What may travel with the working tree, leaving room for the tree itself.
CARRY_LIMIT_BYTES = 60 * 1024**2


def copy_installed(name: str, site: Path, cuda_versions: tuple[str, ...]) -> int:
    """Copy distribution name's installed files (not its byte code, scripts or other bitsandbytes
    libraries) into site; returns the bytes copied."""
    try:
        files = distribution(name).files or []
    except PackageNotFoundError:
        raise ValueError(f"{name} is not installed here: install it (requirements.txt) before gathering it") from None
    copied = 0
    for file in files:
        if file.parts[0] == ".." or "__pycache__" in file.parts or file.suffix == ".pyc":
            continue  # a console script outside site-packages, or byte code the other Python rebuilds
        library = BITSANDBYTES_LIBRARY.search(file.name)
        if library and not (library[1] == "cuda" and library[2] in cuda_versions):
            continue
        source, target = Path(file.locate()), site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copied += target.stat().st_size
    return copied


def cut_gguf(source: Path, target: Path, blocks: int) -> Path:
    """A GGUF holding source's first `blocks` blocks and everything outside the blocks (metadata,
    tokenizer, embedding, final norm), its tensors copied byte for byte."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    total = reader.fields[f"{arch}.block_count"].contents()
    if not 1 <= blocks <= total:
        raise ValueError(f"blocks: {source} has {total} blocks, asked for {blocks}")
    writer = GGUFWriter(target, arch)  # writes general.architecture itself
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the file's header, which the writer makes
        value = blocks if field.name == f"{arch}.block_count" else field.contents()
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        block = re.match(r"blk\.(\d+)\.", tensor.name)
        if block is None or int(block[1]) < blocks:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def gather(folder: Path, model: Path, blocks: int, cuda_versions: tuple[str, ...]) -> dict[str, int]:
    """Fill folder with site/ and the model's cut; returns the bytes of each, refusing more than travels."""
    site = folder / "site"
    if site.exists():
        shutil.rmtree(site)
    sizes = {name: copy_installed(name, site, cuda_versions) for name in MISSING_THERE}
    for old in folder.glob("*.gguf"):
        old.unlink()
    cut = cut_gguf(model, folder / f"{model.stem}.{blocks}-blocks.gguf", blocks)
    sizes[cut.name] = cut.stat().st_size
    if sum(sizes.values()) > CARRY_LIMIT_BYTES:
        raise ValueError(f"{folder} would hold {sum(sizes.values()) / 1024**2:.0f} MiB, more than the "
                         f"{CARRY_LIMIT_BYTES / 1024**2:.0f} MiB that travel: ask for fewer --blocks")
    return sizes


def main(args: argparse.Namespace) -> None:
    from llama_int8.demo import demo_gguf_path

    model = Path(args.model) if args.model else demo_gguf_path()
    sizes = gather(Path(args.folder), model, args.blocks, tuple(args.cuda_versions.split(",")))
    for name, size in sizes.items():
        print(f"{size / 1024**2:7.1f} MiB  {name}")
    print(f"{sum(sizes.values()) / 1024**2:7.1f} MiB in {args.folder}: carry it with the working tree and run "
          f"python3 -m benchmarks.gpu_check there")


def parser() -> argparse.ArgumentParser:
    p = make_parser("python -m benchmarks.gpu_carry", "Gather what benchmarks.gpu_check needs on a GPU machine "
                    "without a package registry into one folder to carry.")
    p.add_argument("--folder", default=str(DEFAULT_FOLDER), metavar="PATH",
                   help=f"where to write (default: {DEFAULT_FOLDER}, which git ignores)")
    p.add_argument("--model", metavar="PATH", help="the GGUF to cut (default: the demo model, fetched on first use)")
    p.add_argument("--blocks", type=positive_int, default=8,
                   help="blocks of the model to keep (default: 8 of SmolLM2's 30, 49 MB)")
    p.add_argument("--cuda_versions", default="130,132", metavar="LIST",
                   help="bitsandbytes CUDA libraries to keep (default: 130,132, for a torch built for CUDA 13)")
    return p


if __name__ == "__main__":
    run_cli(parser(), main)
