"""Serving: N concurrent streaming clients (the openai client) against our server, our in-process
generator at one client as the no-HTTP reference, and llama-cpp-python's server on the same GGUF.

    python -m benchmarks.serve --quant int8,nf4 --clients 1,2,4,8 --max_batch_size 8
    python -m benchmarks.serve --compare llama.cpp --llama_cpp_python /path/to/venv/bin/python --json
    python -m benchmarks.serve --quant int8 --clients 1,8 --temperature 0,1   # what sampling costs
    python -m benchmarks.serve --quant int8 --clients 1,8 --structured        # what a json_schema costs

Each server runs in a process of its own, started here, on 127.0.0.1. Every client sends
--requests_per_client legacy completions one after the other, streamed, greedy (or at each
--temperature, seeded, top_p 1: what sampling costs beside greedy), each with its own
prompt of --prompt_tokens tokens (windows of benchmarks/data/lighthouses.txt) and max_tokens
--new_tokens; every request asks for exactly that many tokens, its stop tokens biased away
(logit_bias -100, which both servers honour). After one warm-up request per server:

- tok/s: generated tokens of all clients over the wall time from the first request to the last answer;
- TTFT: from sending a request to its first text chunk; ITL: between consecutive text chunks;
  p50 and p95 over all requests (inter-token gaps over all requests' gaps).

--structured measures our server at each client count twice, unconstrained and with a
response_format json_schema: one string property without maxLength, the tokens with a `"`
biased away too, so that the string never closes and every request makes --new_tokens tokens
(tokens/request shows it). It also times the compile of a schema the cache has not seen and the
one-off grammar setup.

The in-process row runs `Llama.iter_generate` on the same prompts one after the other (prefill
included, as for the server). llama-cpp-python's server (`python -m llama_cpp.server`, when that
interpreter has it) serves one request at a time; it gets as many threads as the machine has cores
unless --threads says otherwise.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import fire
import httpx
import torch

from benchmarks.common import report
from llama_int8 import Llama
from llama_int8.demo import demo_gguf_path
from llama_int8.grammar import Grammars, GrammarSpec, token_bytes
from llama_int8.logs import setup_logging

TEXT = Path(__file__).parent / "data" / "lighthouses.txt"
STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 900
COMPILE_RUNS = 20
STRUCTURED_COLUMNS = ("constraint", "tokens/request", "vs unconstrained")


def text_schema(name: str = "text") -> dict:
    """One string property without maxLength: the answer can go on for as many tokens as asked."""
    return {"type": "object", "properties": {name: {"type": "string"}}, "required": [name],
            "additionalProperties": False}


JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "text", "schema": text_schema()}}


@dataclass
class RequestTiming:
    """One streamed request: when it was sent, when each text chunk came, how many tokens it made."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(engine: str, quant: str, clients: int, timings: list[RequestTiming], wall: float,
            temperature: float = 0.0, constraint: str = "-") -> dict:
    gaps = [g for t in timings for g in t.gaps]
    ttfts = [t.ttft for t in timings]
    return {"engine": engine, "quant": quant, "temperature": temperature, "constraint": constraint,
            "clients": clients, "requests": len(timings), "tokens/request": token_range(timings),
            "tok/s": sum(t.tokens for t in timings) / wall,
            "TTFT p50 s": percentile(ttfts, 0.5), "TTFT p95 s": percentile(ttfts, 0.95),
            "ITL p50 ms": 1000 * percentile(gaps, 0.5), "ITL p95 ms": 1000 * percentile(gaps, 0.95),
            "vs 1 client": None, "vs unconstrained": None}


def token_range(timings: list[RequestTiming]) -> str:
    """The tokens each request made: "64" when all made as many, else "min-max"."""
    low, high = min(t.tokens for t in timings), max(t.tokens for t in timings)
    return str(low) if low == high else f"{low}-{high}"


# --- Prompts -------------------------------------------------------------------------------------

def prompt_texts(llm: Llama, count: int, length: int) -> list[str]:
    """count different prompts of about length tokens: windows of the text at different offsets."""
    ids = llm.tokenizer.encode(" ".join(TEXT.read_text().split()), bos=False, eos=False)
    step = max(1, (len(ids) - length) // max(1, count))
    return [llm.tokenizer.decode(ids[i * step:i * step + length]) for i in range(count)]


# --- Servers in processes of their own -----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(command: list[str], url: str, ready_path: str, threads: int | None) -> Iterator[str]:
    """Run a server (with OMP_NUM_THREADS=threads when given) until ready_path answers 200 (ours:
    /health, once the model is loaded), yield its /v1 URL, then stop it."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    # Its log goes to a file: a pipe nobody reads fills up and stops a chatty server (llama.cpp's) mid-load.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}: {log.read()[-2000:]}")
            try:
                if httpx.get(f"{url}{ready_path}", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command)} did not answer within {STARTUP_TIMEOUT_S} s")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def ours_command(ckpt: Path, quant: str, max_batch_size: int, max_seq_len: int, port: int) -> list[str]:
    return [sys.executable, "-m", "llama_int8.serve", "--ckpt_dir", str(ckpt), "--quant", quant,
            "--max_batch_size", str(max_batch_size), "--max_seq_len", str(max_seq_len), "--port", str(port)]


def llama_cpp_command(python: str, gguf: Path, n_ctx: int, port: int, threads: int | None) -> list[str]:
    cores = str(threads or os.cpu_count())
    return [python, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", str(n_ctx), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", cores, "--n_threads_batch", cores]


def has_llama_cpp_server(python: str) -> bool:
    return subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0


# --- Clients -------------------------------------------------------------------------------------

async def stream_one(client, model: str, prompt: str, new_tokens: int, bias: dict[str, float],
                     temperature: float, response_format: dict | None) -> RequestTiming:
    timing = RequestTiming(time.perf_counter())
    # The openai client's legacy completions take no response_format argument; our server reads it from the body.
    extra_body = {"response_format": response_format} if response_format else None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens,
                                             temperature=temperature, top_p=1.0, seed=0, stream=True, logit_bias=bias,
                                             stream_options={"include_usage": True}, extra_body=extra_body)
    counted = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            timing.chunks.append(time.perf_counter())
            counted += 1
        if getattr(chunk, "usage", None) is not None:
            timing.tokens = chunk.usage.completion_tokens
    timing.tokens = timing.tokens or counted  # a server without usage in streams: one chunk per token
    return timing


async def run_clients(base_url: str, prompts: list[str], clients: int, per_client: int, new_tokens: int,
                      bias: dict[str, float], temperature: float,
                      response_format: dict | None) -> tuple[list[RequestTiming], float]:
    """clients concurrent clients, each sending per_client requests in a row; their timings and the wall time."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="benchmark", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    model = (await client.models.list()).data[0].id

    async def one_client(c: int) -> list[RequestTiming]:
        return [await stream_one(client, model, prompts[(c * per_client + r) % len(prompts)], new_tokens, bias,
                                 temperature, response_format) for r in range(per_client)]

    await stream_one(client, model, prompts[-1], new_tokens, bias, temperature, response_format)  # warm-up
    start = time.perf_counter()
    results = await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return [t for r in results for t in r], wall


def measure_server(base_url: str, engine: str, quant: str, client_counts: list[int], prompts: list[str],
                   per_client: int, new_tokens: int, bias: dict[str, float], temperature: float = 0.0,
                   json_schema_bias: dict[str, float] | None = None) -> list[dict]:
    """A row per client count; with json_schema_bias, a json_schema row right after each, its requests
    biased by it, measured on the same server at once, so that a drift in the machine's load hits both alike."""
    variants = [(None, bias)] + ([(JSON_SCHEMA_FORMAT, json_schema_bias)] if json_schema_bias else [])
    rows = []
    for n in client_counts:
        for response_format, request_bias in variants:
            timings, wall = asyncio.run(run_clients(base_url, prompts, n, per_client, new_tokens, request_bias,
                                                    temperature, response_format))
            constraint = response_format["type"] if response_format else "-"
            rows.append(summary(engine, quant, n, timings, wall, temperature, constraint))
            print(f"{engine} {quant} T={temperature} {constraint} {n} client(s): {rows[-1]['tok/s']:.1f} tok/s "
                  f"({rows[-1]['tokens/request']} tokens/request)", file=sys.stderr, flush=True)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """vs 1 client: against the same constraint's first row, where that is 1 client; vs unconstrained
    (constrained rows): against the unconstrained row at the same client count."""
    for row in rows:
        alike = [r for r in rows if r["constraint"] == row["constraint"]]
        if alike[0]["clients"] == 1:
            row["vs 1 client"] = f"{row['tok/s'] / alike[0]['tok/s']:.2f}x"
        if row["constraint"] != "-":
            plain = next(r for r in rows if r["constraint"] == "-" and r["clients"] == row["clients"])
            row["vs unconstrained"] = f"{row['tok/s'] / plain['tok/s']:.2f}x"


def quote_bias(llm: Llama) -> dict[str, float]:
    """A bias against every token with a `"`: in the schema's one string it would close the string, and
    the grammar would then end the answer before new_tokens. Where the string opens, every token the
    grammar allows has a quote: those with one (`"`, `"The`) get -50, those with more (`"]["`, which
    opens and closes at once) -100, so that an opening one wins there, and past it any token without a
    quote beats a closing one."""
    return {str(i): -50.0 * min(piece.count(b'"'), 2) for i, piece in enumerate(token_bytes(llm.tokenizer)[0])
            if b'"' in piece}


def measure_grammar_compile(llm: Llama) -> dict:
    """The one-off Grammars setup (reading the vocabulary) and the median compile of a json_schema the
    cache has not seen (a property name of its own each time), on llm's tokenizer, in seconds."""
    start = time.perf_counter()
    grammars = Grammars(llm.tokenizer, llm.model.args.vocab_size)
    setup_s = time.perf_counter() - start
    compile_s = []
    for i in range(COMPILE_RUNS):
        spec = GrammarSpec("json_schema", jsonlib.dumps(text_schema(f"text_{i}")))
        start = time.perf_counter()
        grammars.compile(spec)
        compile_s.append(time.perf_counter() - start)
    return {"grammars_setup_s": setup_s, "json_schema_compile_median_s": statistics.median(compile_s)}


def measure_in_process(llm: Llama, quant: str, prompts: list[str], requests: int, new_tokens: int) -> dict:
    """Our generator without HTTP, one request at a time, as the server's 1-client reference."""
    timings = []
    tokens = [llm.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    for _ in llm.iter_generate([tokens[-1]], new_tokens, temperature=0, stop_ids=()):  # warm-up
        pass
    start = time.perf_counter()
    for i in range(requests):
        timing = RequestTiming(time.perf_counter())
        for step in llm.iter_generate([tokens[i % len(tokens)]], new_tokens, temperature=0, stop_ids=()):
            if step[0] is not None:
                timing.chunks.append(time.perf_counter())
                timing.tokens += 1
        timings.append(timing)
    return summary("llama_int8 in-process (Llama.iter_generate)", quant, 1, timings, time.perf_counter() - start)


def main(ckpt_dir: str | None = None, quant: str | tuple = "int8,nf4", clients: str | int | tuple = "1,2,4,8",
         max_batch_size: int = 8, prompt_tokens: int = 64, new_tokens: int = 64, requests_per_client: int = 2,
         compare: str | None = None, llama_cpp_python: str | None = None, threads: int | None = None,
         temperature: str | float | tuple = 0.0, structured: bool = False, json: bool = False) -> None:
    """Aggregate tokens/s, TTFT and inter-token latency of our server at each client count, per quant
    mode, with the in-process reference; --compare llama.cpp adds llama-cpp-python's server on the
    same GGUF (--llama_cpp_python: the interpreter that has it, default this one). --temperature
    "0,1" measures our server at each (seeded, top_p 1), one after the other on the same server.
    --structured measures our server at each client count unconstrained and with a json_schema, and
    the schema's compile time.

    threads: CPU threads of every engine (default: torch's for ours, every core for llama.cpp's). On a
    machine shared with other busy processes, 1 spares them waiting on each other at every kernel.
    """
    setup_logging()
    if threads is not None:
        torch.set_num_threads(threads)
    for name in ("httpx", "httpx2", "openai"):  # a line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    if compare not in (None, "llama.cpp"):
        raise ValueError(f"compare: {compare!r} is not 'llama.cpp'")
    modes = quant.split(",") if isinstance(quant, str) else list(quant)
    counts = [int(c) for c in (str(clients).split(",") if isinstance(clients, (str, int)) else clients)]
    temperatures = [float(t) for t in (str(temperature).split(",") if isinstance(temperature, (str, int, float))
                                       else temperature)]
    ckpt = Path(ckpt_dir) if ckpt_dir else demo_gguf_path()
    max_seq_len = prompt_tokens + new_tokens + 64  # room for the prompt's re-tokenization by each server
    total_requests = max(counts) * requests_per_client
    rows, grammar_timing = [], {}
    for mode in modes:
        llm = Llama.build(ckpt, quant=mode, max_seq_len=max_seq_len, max_batch_size=1)
        prompts = prompt_texts(llm, total_requests + 1, prompt_tokens)
        bias = {str(t): -100.0 for t in llm.tokenizer.stop_ids}
        json_schema_bias = bias | quote_bias(llm) if structured else None
        if structured and not grammar_timing:  # one tokenizer for every mode
            grammar_timing = measure_grammar_compile(llm)
        rows.append(measure_in_process(llm, mode, prompts, max(counts[0], 1) * requests_per_client, new_tokens))
        del llm
        port = free_port()
        with server_process(ours_command(ckpt, mode, max_batch_size, max_seq_len, port),
                            f"http://127.0.0.1:{port}", "/health", threads) as url:
            for t in temperatures:
                rows += measure_server(url, "llama_int8 server", mode, counts, prompts, requests_per_client,
                                       new_tokens, bias, t, json_schema_bias)
    if compare == "llama.cpp":
        python = llama_cpp_python or sys.executable
        if ckpt.suffix != ".gguf":
            raise ValueError(f"--compare llama.cpp needs a .gguf checkpoint, got {ckpt}")
        if not has_llama_cpp_server(python):
            raise ValueError(f"{python} cannot import llama_cpp.server: pass --llama_cpp_python")
        port = free_port()
        kind = re.search(r"\.(Q\w+|F16|F32|BF16)\.gguf$", ckpt.name, re.I)
        command = llama_cpp_command(python, ckpt, max_seq_len, port, threads)
        with server_process(command, f"http://127.0.0.1:{port}", "/v1/models", threads) as url:
            rows += measure_server(url, "llama-cpp-python server", kind.group(1) if kind else "gguf", counts,
                                   prompts, requests_per_client, new_tokens, bias)
    title = (f"Serving: {ckpt.name}, {max_batch_size} slots, {prompt_tokens}-token prompts, {new_tokens} greedy "
             f"tokens per request, {requests_per_client} requests per client, {torch.get_num_threads()} CPU thread(s)")
    if structured:
        title += (f"; json_schema compile {1000 * grammar_timing['json_schema_compile_median_s']:.2f} ms (uncached, "
                  f"median of {COMPILE_RUNS}), grammar setup {grammar_timing['grammars_setup_s']:.2f} s (once)")
    else:
        rows = [{k: v for k, v in row.items() if k not in STRUCTURED_COLUMNS} for row in rows]
    report(title, rows, json, grammar_timing)


if __name__ == "__main__":
    fire.Fire(main)
