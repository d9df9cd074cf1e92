"""Llama.build lets go of the checkpoint's file pages once loaded: its memory maps closed, then the
page cache released (posix_fadvise DONTNEED), so a container's memory holds the model, not its source.
(A parameter read in its stored dtype may stay a view of the file's map: those pages are the weights,
and the kernel keeps pages a process maps.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llama_int8 import Llama
from conftest import tiny_hf_model, write_hf_folder


def mapped_files() -> set[str]:
    """The files this process has memory-mapped now."""
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/maps").exists(),
                    reason="posix_fadvise and /proc/self/maps are Linux's")
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_build_releases_the_source_pages_once_nothing_maps_them(tmp_path, sp_model, monkeypatch, quant):
    folder = write_hf_folder(tiny_hf_model().to(torch.bfloat16), tmp_path / "m", tokenizer=sp_model)
    weights = str((folder / "model.safetensors").resolve())
    released: list[str] = []
    advise = os.posix_fadvise

    def recording_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        assert path not in mapped_files(), "released while still mapped: the kernel would keep its pages"
        released.append(path)
        advise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", recording_fadvise)
    llm = Llama.build(folder, quant=quant, device="cpu", dtype="float32", max_seq_len=16)  # every tensor copied
    assert weights in released
    assert weights not in mapped_files()
    assert llm.generate([[1, 5, 9]], max_gen_len=2, temperature=0)
