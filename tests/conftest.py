"""Shared fixtures: tiny random LLaMA models from transformers written in each checkpoint layout, a
SentencePiece tokenizer trained on the spot, and the real SmolLM2-135M-Instruct weights when cached."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from llama_int8.formats.meta import META_SHARD_DIM
from llama_int8.demo import demo_gguf_path

CORPUS = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
          "To be or not to be, that is the question. All that glitters is not gold. Paris is the capital of "
          "France, and Berlin is the capital of Germany. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. ") * 20

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=256, rms_norm_eps=1e-5)


def tiny_hf_model(seed: int = 0, **overrides):
    """A random float32 transformers LlamaForCausalLM (or Mistral with model_type='mistral')."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    settings = {**TINY, **overrides}
    mistral = settings.pop("model_type", "llama") == "mistral"
    config = (MistralConfig if mistral else LlamaConfig)(**settings)
    torch.manual_seed(seed)
    model = (MistralForCausalLM if mistral else LlamaForCausalLM)(config)
    with torch.no_grad():  # random init leaves norms at 1: perturb them so the test sees their weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation by full recomputation at every step: no cache to disagree with."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 1e-4 relative to the largest logit, elementwise."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale)


def write_hf_folder(model, folder: Path, sharded: bool = False, tokenizer: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="20KB" if sharded else "10GB")
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return folder


def hf_to_meta_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under Meta's names, q/k rows back in Meta's interleaved rotary layout."""
    from llama_int8.formats.common import hf_to_meta_name, unpermute_rotary_rows

    cfg = model.config
    state = {}
    for key, t in model.state_dict().items():
        name = hf_to_meta_name(key)
        if name is None:
            continue
        if name.endswith("attention.wq.weight"):
            t = unpermute_rotary_rows(t, cfg.num_attention_heads, head_dim(cfg))
        elif name.endswith("attention.wk.weight"):
            t = unpermute_rotary_rows(t, cfg.num_key_value_heads, head_dim(cfg))
        state[name] = t.clone()
    if cfg.tie_word_embeddings:
        state.pop("output.weight", None)
    return state


def write_meta_folder(model, folder: Path, n_shards: int = 1, tokenizer: Path | None = None,
                      params_extra: dict | None = None) -> Path:
    """The model as Meta's consolidated.NN.pth shards, split as model parallelism splits them."""
    cfg = model.config
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_to_meta_state(model)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, t in state.items():
        dim = META_SHARD_DIM[name.split(".")[-2]]
        pieces = [t] * n_shards if dim is None else t.chunk(n_shards, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "norm_eps": cfg.rms_norm_eps,
              "hidden_dim": cfg.intermediate_size, "rope_theta": hf_rope_theta(cfg), "head_dim": head_dim(cfg),
              "tie_word_embeddings": cfg.tie_word_embeddings, **(params_extra or {})}
    (folder / "params.json").write_text(json.dumps(params))
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return folder


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def hf_rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A SentencePiece BPE model of 128 pieces trained on a small corpus, with <s>=1 and </s>=2."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    (folder / "corpus.txt").write_text(CORPUS.replace(". ", ".\n"))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=128, model_type="bpe", character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    return folder / "tokenizer.model"


# --- Real weights ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return demo_gguf_path(fetch=False)
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 weights not cached ({e})")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder, exported from the GGUF by transformers."""
    from benchmarks.reference import transformers_folder

    return transformers_folder(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_hf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_server(smollm2_gguf: Path) -> Iterator[str]:
    """The OpenAI server on SmolLM2 (float32, 8 slots of 1024 tokens, no API key), model name "smollm2",
    on 127.0.0.1 for the whole session: its base URL."""
    from llama_int8 import Llama
    from llama_int8.server import ServerSettings, create_app

    llm = Llama.build(smollm2_gguf, quant="none", dtype="float32", device="cpu", max_seq_len=1024, max_batch_size=8)
    with running_server(create_app(ServerSettings(model_name="smollm2"), lambda: llm)) as url:
        wait_ready(url)
        yield url


@contextmanager
def running_server(app) -> Iterator[str]:
    """Serve app from a thread on 127.0.0.1 at a port the system picks; yields the base URL."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of many small ops: on a shared 2-core machine two OpenMP
    threads spin at every one of them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gguf_writer(path: Path, arch: str, cfg):
    """A GGUFWriter for path with a transformers config's shape (blocks, context, widths, heads, norm
    epsilon) already added: what every tiny GGUF the tests write starts with."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    return writer
