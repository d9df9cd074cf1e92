"""Offline batch runs (python -m llama_int8.batch) on a tiny random float32 model: every result
against the same request run alone on an engine of its own, built here from the test's own reading
of the line (never batch.py's), a run killed partway and resumed, and every kind of bad input."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORPUS, tiny_hf_model, write_hf_folder
from llama_int8 import Llama, batch
from llama_int8.batch_files import read_requests
from llama_int8.batch_runner import BatchSettings, run_batch
from llama_int8.flags import run_cli
from llama_int8.engine import Completion, Engine, Request
from llama_int8.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
SLOTS = 4
MAX_SEQ_LEN = 192
PREFILL_CHUNK = 8
WORDS = CORPUS.split()
SYSTEM = "Answer in one line."
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, sp_model) -> Path:
    return write_hf_folder(tiny_hf_model(seed=31, num_key_value_heads=2), tmp_path_factory.mktemp("batch"),
                           tokenizer=sp_model)


@pytest.fixture(scope="module")
def llm(tiny_folder) -> Llama:
    """The model the runs load, built the same way, for the references."""
    return Llama.build(tiny_folder, quant="none", dtype="float32", device="cpu", max_seq_len=MAX_SEQ_LEN,
                       max_batch_size=SLOTS, prefill_chunk=PREFILL_CHUNK)


def model_flags(folder: Path) -> list[str]:
    return ["--ckpt_dir", str(folder), "--quant", "none", "--dtype", "float32", "--device", "cpu",
            "--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", str(SLOTS), "--prefill_chunk", str(PREFILL_CHUNK)]


def run_batch_cli(folder: Path, requests: Path, results: Path, *flags: str) -> None:
    run_cli(batch.build_parser(), batch.main, [*model_flags(folder), "--input", str(requests), "--output",
                                                str(results), *flags])


def write_lines(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(results: list[dict]) -> dict:
    return {r.get("custom_id", r["id"]): r for r in results}


def text_of(n_words: int, start: int) -> str:
    return " ".join(WORDS[start:start + n_words])


def alone(llm: Llama, request: Request) -> Completion:
    """The request by itself on a fresh engine: what the batch run must give it."""
    return Engine(llm.model, llm.tokenizer).run([request])[0]


def completion_request(llm: Llama, text: str, max_tokens: int, sampling: SamplingParams = GREEDY,
                       stop: tuple[str, ...] = ()) -> Request:
    prompt = llm.tokenizer.encode(text, bos=True, eos=False)
    return Request(prompt, max_tokens, sampling, llm.tokenizer.stop_ids, stop)


def chat_request(llm: Llama, dialog: list[dict], max_tokens: int, sampling: SamplingParams = GREEDY) -> Request:
    return Request(llm.encode_dialog(dialog), max_tokens, sampling, llm.tokenizer.stop_ids)


def assert_result_is(result: dict, expected: Completion) -> None:
    assert "error" not in result, result
    assert (result["text"], result["finish_reason"]) == (expected.text, expected.finish_reason)
    assert (result["prompt_tokens"], result["completion_tokens"]) == (expected.prompt_tokens,
                                                                     expected.completion_tokens)


def mixed_lines(n: int, max_tokens: int) -> list[dict]:
    """n requests, prompts and chats alternating, of 1 to 24 words."""
    lines = []
    for i in range(n):
        text = text_of(1 + (i * 7) % 24, (i * 13) % 200)
        if i % 3 == 2:
            lines.append({"id": f"r{i}", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens})
        else:
            lines.append({"id": f"r{i}", "prompt": text, "max_tokens": max_tokens})
    return lines


def reference_of(llm: Llama, line: dict) -> Completion:
    if "messages" in line:
        return alone(llm, chat_request(llm, line["messages"], line["max_tokens"]))
    return alone(llm, completion_request(llm, line["prompt"], line["max_tokens"]))


# --- Resuming ----------------------------------------------------------------------------------------

def test_a_killed_run_resumes_and_every_id_is_answered_once_as_alone(tiny_folder, llm, tmp_path):
    lines = mixed_lines(48, max_tokens=60)
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "llama_int8.batch", *model_flags(tiny_folder), "--input", str(requests),
               "--output", str(results)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and results.read_bytes().count(b"\n") >= 3):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no results after 120 s"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    written = results.read_bytes().count(b"\n")
    assert 3 <= written < len(lines), "killed too late to test resuming"

    run_batch_cli(tiny_folder, requests, results)
    answered = read_results(results)
    assert sorted(r["id"] for r in answered) == sorted(line["id"] for line in lines)
    for line in lines:
        assert_result_is(by_id(answered)[line["id"]], reference_of(llm, line))


def test_a_partly_written_last_line_is_dropped_and_its_request_runs_again(tiny_folder, llm, tmp_path, caplog):
    lines = mixed_lines(3, max_tokens=12)
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    run_batch_cli(tiny_folder, requests, results)
    complete = results.read_text().splitlines(keepends=True)
    results.write_text("".join(complete[:-1]) + complete[-1][:len(complete[-1]) // 2])  # as a kill mid-write leaves it
    run_batch_cli(tiny_folder, requests, results)
    assert "dropping a partly written last line" in caplog.text
    answered = read_results(results)
    assert sorted(r["id"] for r in answered) == ["r0", "r1", "r2"]
    for line in lines:
        assert_result_is(by_id(answered)[line["id"]], reference_of(llm, line))


def test_a_finished_run_does_nothing_again(tiny_folder, tmp_path, caplog, monkeypatch):
    requests, results = write_lines(tmp_path / "requests.jsonl", mixed_lines(2, 4)), tmp_path / "results.jsonl"
    run_batch_cli(tiny_folder, requests, results)
    before = results.read_bytes()
    monkeypatch.setattr(Llama, "build", lambda *a, **k: pytest.fail("loaded a model with nothing to do"))
    caplog.set_level(logging.INFO, logger="llama_int8")
    run_batch_cli(tiny_folder, requests, results)
    assert results.read_bytes() == before
    assert "Nothing to do: all 2 requests" in caplog.text


# --- What lines ask for ------------------------------------------------------------------------------

def test_prompt_and_chat_lines_with_their_own_parameters(tiny_folder, llm, tmp_path):
    story, capital = text_of(12, 0), text_of(9, 40)
    greedy_story = alone(llm, completion_request(llm, story, 30)).text
    stop = greedy_story[8:10]  # a stop string the greedy answer does contain
    chat = [{"role": "user", "content": capital}]
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": story}]
    lines = [
        {"id": "greedy", "prompt": story, "max_tokens": 30},
        {"id": "short", "prompt": story, "max_tokens": 3},
        {"id": "stop", "prompt": story, "max_tokens": 30, "stop": [stop]},
        {"id": "seeded", "prompt": capital, "max_tokens": 20, "temperature": 0.9, "top_p": 0.8, "seed": 7},
        {"id": "flag-defaults", "prompt": capital, "max_tokens": 20, "temperature": 1.0},
        {"id": "chat", "messages": chat, "max_tokens": 16},
        {"id": "own-system", "messages": own_system, "max_tokens": 16},
        {"id": "token-ids", "prompt": [1, 40, 50, 60], "max_tokens": 10},
        {"id": "flag-max-tokens", "prompt": capital},
    ]
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    run_batch_cli(tiny_folder, requests, results, "--system", SYSTEM, "--max_tokens", "7", "--top_p", "0.5",
                  "--seed", "11")
    got = by_id(read_results(results))
    assert len(got) == len(lines)
    expected = {
        "greedy": completion_request(llm, story, 30),
        "short": completion_request(llm, story, 3),
        "stop": completion_request(llm, story, 30, stop=(stop,)),
        "seeded": completion_request(llm, capital, 20, SamplingParams(temperature=0.9, top_p=0.8, seed=7)),
        # What a line leaves out comes from the flags: --top_p, --seed, --max_tokens.
        "flag-defaults": completion_request(llm, capital, 20, SamplingParams(temperature=1.0, top_p=0.5, seed=11)),
        "chat": chat_request(llm, [{"role": "system", "content": SYSTEM}, *chat], 16),
        "own-system": chat_request(llm, own_system, 16),
        "token-ids": Request([1, 40, 50, 60], 10, GREEDY, llm.tokenizer.stop_ids),
        "flag-max-tokens": completion_request(llm, capital, 7),
    }
    for name, request in expected.items():
        assert_result_is(got[name], alone(llm, request))
    assert got["short"]["completion_tokens"] == 3 and got["short"]["finish_reason"] == "length"
    assert got["stop"]["text"] == greedy_story[:greedy_story.index(stop)]
    assert got["stop"]["finish_reason"] == "stop"
    assert got["seeded"]["text"] != got["flag-defaults"]["text"]


def test_sort_by_length_starts_the_longest_prompts_first_and_keeps_ids(tiny_folder, llm, tmp_path):
    lines = [{"id": f"p{n}", "prompt": text_of(n, n), "max_tokens": 5} for n in (3, 30, 10, 20, 1)]
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    run_batch_cli(tiny_folder, requests, results, "--sort_by_length", "--max_batch_size", "1")
    answered = read_results(results)
    assert [r["id"] for r in answered] == ["p30", "p20", "p10", "p3", "p1"]  # one slot: in the order started
    for line in lines:
        assert_result_is(by_id(answered)[line["id"]], reference_of(llm, line))


def test_openai_batch_api_lines_get_openai_batch_results(tiny_folder, llm, tmp_path):
    chat = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": text_of(6, 3)}]
    lines = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": chat, "max_tokens": 12}},
        {"custom_id": "completion-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": text_of(5, 9), "max_tokens": 8, "temperature": 0}},
        {"custom_id": "embeddings-1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    ]
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    run_batch_cli(tiny_folder, requests, results)
    got = by_id(read_results(results))

    chat_expected = alone(llm, chat_request(llm, [{"role": "system", "content": "Be brief."}, chat[1]], 12))
    response = got["chat-1"]["response"]
    assert got["chat-1"]["error"] is None and response["status_code"] == 200
    assert response["body"]["object"] == "chat.completion"
    assert response["body"]["choices"][0]["message"] == {"role": "assistant", "content": chat_expected.text}
    assert response["body"]["choices"][0]["finish_reason"] == chat_expected.finish_reason
    assert response["body"]["usage"] == {"prompt_tokens": chat_expected.prompt_tokens,
                                         "completion_tokens": chat_expected.completion_tokens,
                                         "total_tokens": chat_expected.prompt_tokens + chat_expected.completion_tokens}

    text_expected = alone(llm, completion_request(llm, text_of(5, 9), 8))
    body = got["completion-1"]["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == text_expected.text

    refused = got["embeddings-1"]
    assert refused["response"] is None and refused["line"] == 3
    assert "url: expected one of /v1/chat/completions, /v1/completions" in refused["error"]["message"]


# --- Bad input ---------------------------------------------------------------------------------------

def test_bad_lines_get_errors_naming_their_line_and_the_run_goes_on(tiny_folder, llm, tmp_path):
    long_prompt = text_of(120, 0)  # far more than MAX_SEQ_LEN tokens
    lines = [
        {"id": "first", "prompt": text_of(4, 0), "max_tokens": 6},
        '{"id": "cut", "prompt": "The quick',
        '["a", "list"]',
        {"prompt": "no id"},
        {"id": "both", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"id": "role", "messages": [{"role": "robot", "content": "hi"}]},
        {"id": "hot", "prompt": "a", "temperature": "hot"},
        {"id": "too-long", "prompt": long_prompt},
        {"id": "answer-too-long", "prompt": "a", "max_tokens": MAX_SEQ_LEN},
        {"id": "turns", "messages": [{"role": "assistant", "content": "hi"}]},
        {"id": "last", "messages": [{"role": "user", "content": text_of(3, 5)}], "max_tokens": 6},
    ]
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    run_batch_cli(tiny_folder, requests, results)
    answered = read_results(results)
    assert len(answered) == len(lines)
    errors = {r["line"]: r for r in answered if "error" in r}
    assert sorted(errors) == list(range(2, 11))
    expected = {2: (None, "not valid JSON"), 3: (None, "expected a JSON object, got an array"),
                4: (None, "no 'id'"), 5: ("both", "got both"), 6: ("role", "messages[0].role"),
                7: ("hot", "temperature"), 8: ("too-long", "maximum context length is 192"),
                9: ("answer-too-long", "maximum context length is 192"), 10: ("turns", "expected role 'user'")}
    for number, (request_id, words) in expected.items():
        assert errors[number]["id"] == request_id and words in errors[number]["error"]["message"], errors[number]
    assert errors[8]["error"]["code"] == errors[9]["error"]["code"] == "context_length_exceeded"
    assert errors[7]["error"]["param"] == "temperature"
    got = by_id([r for r in answered if r["id"] is not None])
    assert_result_is(got["first"], reference_of(llm, lines[0]))
    assert_result_is(got["last"], reference_of(llm, lines[-1]))

    run_batch_cli(tiny_folder, requests, results)  # id-less lines are not reported twice
    assert len(read_results(results)) == len(lines)


def test_duplicate_ids_fail_before_any_work_naming_both_lines(tiny_folder, tmp_path, capsys, monkeypatch):
    lines = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}]
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    results.write_text('{"id": "old", "text": "kept", "finish_reason": "stop"}\n{"id": "half')
    before = results.read_bytes()
    monkeypatch.setattr(Llama, "build", lambda *a, **k: pytest.fail("loaded a model before refusing the input"))
    with pytest.raises(SystemExit) as exit:
        run_batch_cli(tiny_folder, requests, results)
    assert exit.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'id "a" is on line 1 and on line 3' in err[0]
    assert results.read_bytes() == before


def test_a_missing_output_folder_is_one_line_before_anything_loads(tiny_folder, tmp_path, capsys):
    requests = write_lines(tmp_path / "requests.jsonl", [{"id": "a", "prompt": "x"}])
    with pytest.raises(SystemExit) as exit:
        run_batch_cli(tiny_folder, requests, tmp_path / "no" / "such" / "results.jsonl")
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the folder {tmp_path / 'no' / 'such'} does not exist" in err[0]


def test_a_results_file_of_something_else_is_refused(tiny_folder, tmp_path, capsys):
    requests = write_lines(tmp_path / "requests.jsonl", [{"id": "a", "prompt": "x"}])
    results = tmp_path / "results.jsonl"
    results.write_text("name,score\nada,3\n")
    with pytest.raises(SystemExit):
        run_batch_cli(tiny_folder, requests, results)
    assert "line 1: not a result of a batch run" in capsys.readouterr().err
    assert results.read_text() == "name,score\nada,3\n"


# --- The real model ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_chat_lines_follow_its_template_and_stop_at_end_of_turn(smollm2_gguf, tmp_path):
    """SmolLM2's ChatML template and <|im_end|>: each answer among others equals chat_completion's for
    the dialog alone (the runner on the test's model: one load instead of two)."""
    questions = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Say hello."]
    lines = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}], "max_tokens": 32}
             for i, q in enumerate(questions)]
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    llm = Llama.build(smollm2_gguf, quant="none", dtype="float32", device="cpu", max_seq_len=128, max_batch_size=4)
    run_batch(llm, read_requests(requests), requests, results, BatchSettings(32, {"temperature": 0.0}), "smollm2")
    got = by_id(read_results(results))
    for line in lines:
        dialog = line["messages"]
        reference = llm.chat_completion([dialog], temperature=0, max_gen_len=32)[0]
        assert got[line["id"]]["text"] == reference["generation"]["content"]
        assert got[line["id"]]["prompt_tokens"] == len(llm.encode_dialog(dialog))
    assert any(got[line["id"]]["finish_reason"] == "stop" for line in lines)  # ended by <|im_end|>, not the limit


# --- One serving layer -------------------------------------------------------------------------------

def test_a_batch_line_is_answered_as_the_server_answers_its_body(tiny_folder, llm, tmp_path):
    from test_serve import running_server, wait_ready

    from llama_int8.serve import served_name
    from llama_int8.server import ServerSettings, create_app

    bodies = {
        "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": text_of(6, 3)}], "max_tokens": 6,
                                          "n": 2, "temperature": 0.8, "top_p": 1.0, "seed": 5, "logprobs": True,
                                          "top_logprobs": 2}),
        "echo": ("/v1/completions", {"prompt": text_of(7, 20), "max_tokens": 0, "echo": True, "logprobs": 2,
                                     "temperature": 0}),
        "scored": ("/v1/completions", {"prompt": text_of(5, 9), "max_tokens": 4, "prompt_logprobs": 1, "top_k": 3,
                                       "temperature": 1.0, "top_p": 1.0, "seed": 2}),
    }
    # The flags fill in what a line leaves out (top_p 0.9 here): the bodies say what the server's defaults are.
    lines = [{"custom_id": name, "method": "POST", "url": url, "body": body} for name, (url, body) in bodies.items()]
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    run_batch_cli(tiny_folder, requests, results)
    got = by_id(read_results(results))
    with running_server(create_app(ServerSettings(model_name=served_name(str(tiny_folder))), lambda: llm)) as url:
        wait_ready(url)
        for name, (route, body) in bodies.items():
            served = httpx_post(f"{url}{route}", body)
            batched = got[name]["response"]["body"]
            for answer in (served, batched):
                answer.pop("id"), answer.pop("created")
            assert batched == served, name


def test_a_line_of_ours_gets_the_scores_it_asks_for(tiny_folder, llm, tmp_path):
    text = text_of(8, 30)
    lines = [{"id": "echo", "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1},
             {"id": "prompt", "prompt": text, "max_tokens": 3, "prompt_logprobs": 0, "temperature": 0}]
    requests, results = write_lines(tmp_path / "requests.jsonl", lines), tmp_path / "results.jsonl"
    run_batch_cli(tiny_folder, requests, results)
    got = by_id(read_results(results))
    prompt = llm.tokenizer.encode(text, bos=True, eos=False)
    (scored,) = Engine(llm.model, llm.tokenizer).run([Request(prompt, 0, GREEDY, prompt_logprobs=1)])
    expected = [None] + [s.logprob for s in scored.prompt_logprobs[1:]]
    assert got["echo"]["text"] == text and got["echo"]["logprobs"]["token_logprobs"] == expected
    assert "prompt_logprobs" not in got["echo"] and "logprobs" not in got["prompt"]
    assert [None if p is None else p[str(t)]["logprob"] for p, t in zip(got["prompt"]["prompt_logprobs"], prompt)] \
        == expected
    assert_result_is({k: v for k, v in got["prompt"].items() if k != "prompt_logprobs"},
                     alone(llm, completion_request(llm, text, 3)))


def httpx_post(url: str, body: dict) -> dict:
    import httpx

    response = httpx.post(url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()
