"""The batch runner never damages a file it did not write: an --output that is the --input under any
name, a file that is not this command's results, a symbolic link to either, a FIFO, are refused
with one line naming the file, before the model loads and with every byte of every file as it was;
a link to a results file of ours is followed and resumed as the file itself would be."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from conftest import tiny_hf_model, write_hf_folder
from llama_int8 import Llama, batch
from llama_int8.batch_files import LINE_START, RequestLine, error_record, read_done, result_record
from llama_int8.flags import run_cli
from test_batch import model_flags, read_results, write_lines

PROG = "python -m llama_int8.batch"
FOREIGN_LINE = (PROG + ": error: {path} line {number}: not a result of a batch run (expected a JSON object with the "
                "fields id, text, finish_reason, prompt_tokens, completion_tokens; or id, error, line; or id, "
                "custom_id, response, error; or id, custom_id, response, error, line); give another --output or "
                "remove that line")
FOREIGN_LAST_LINE = (PROG + ': error: {path} line {number}: not the start of a result cut short by an interrupted run '
                     '(a last line without a newline, expected to begin {{"id":); give another --output or remove '
                     'that line')
# Requests whose last line has no newline: what a resume that took them for results would cut.
REQUESTS = b'{"id": "a", "prompt": "x", "max_tokens": 2}\n{"id": "b", "prompt": "y", "max_tokens": 2}'
RESULT = b'{"id": "old", "text": "kept", "finish_reason": "stop", "prompt_tokens": 2, "completion_tokens": 1}\n'


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, sp_model) -> Path:
    return write_hf_folder(tiny_hf_model(seed=31, num_key_value_heads=2), tmp_path_factory.mktemp("model"),
                           tokenizer=sp_model)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The run's folder, and its working directory, so that paths can be spelt relative to it."""
    folder = tmp_path.resolve()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def no_model(monkeypatch) -> None:
    monkeypatch.setattr(Llama, "build", lambda *a, **k: pytest.fail("loaded a model before refusing the files"))


def run(folder: Path, requests: str | Path, results: str | Path) -> None:
    run_cli(batch.build_parser(), batch.main, [*model_flags(folder), "--input", str(requests), "--output",
                                                str(results)])


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under folder: a link's target (never followed), a file's bytes, a FIFO's kind."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            entries[name] = "link to " + os.readlink(path)
        elif path.is_file():
            entries[name] = path.read_bytes()
        else:
            entries[name] = "folder" if path.is_dir() else "FIFO"
    return entries


def assert_refused(folder: Path, work: Path, requests: str | Path, results: str | Path, capsys,
                   message: str, code: int = 1) -> None:
    """The run ends with exactly message, alone on stderr, and every file under work is as it was."""
    before = snapshot(work)
    with pytest.raises(SystemExit) as exit:
        run(folder, requests, results)
    assert exit.value.code == code
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert snapshot(work) == before


# --- The results file is the requests file ---------------------------------------------------------

def same_file_by_name(work: Path) -> tuple[str, str]:
    return "requests.jsonl", "requests.jsonl"


def same_file_with_dot(work: Path) -> tuple[str, str]:
    return "requests.jsonl", "./requests.jsonl"


def same_file_absolute(work: Path) -> tuple[str, str]:
    return "requests.jsonl", str(work / "requests.jsonl")


def same_file_by_hard_link(work: Path) -> tuple[str, str]:
    os.link("requests.jsonl", "hard.jsonl")
    return "requests.jsonl", "hard.jsonl"


def same_file_by_link_to_input(work: Path) -> tuple[str, str]:
    os.symlink("requests.jsonl", "link.jsonl")
    return "requests.jsonl", "link.jsonl"


def same_file_by_link_from_input(work: Path) -> tuple[str, str]:
    os.symlink("requests.jsonl", "input-link.jsonl")
    return "input-link.jsonl", "requests.jsonl"


@pytest.mark.parametrize("spelling", [same_file_by_name, same_file_with_dot, same_file_absolute, same_file_by_hard_link,
                                      same_file_by_link_to_input, same_file_by_link_from_input],
                         ids=lambda f: f.__name__)
def test_an_output_that_is_the_input_under_any_name_is_refused_untouched(tiny_folder, work, no_model, capsys,
                                                                          spelling):
    (work / "requests.jsonl").write_bytes(REQUESTS)
    requests, results = spelling(work)
    assert_refused(tiny_folder, work, requests, results, capsys,
                   f"{PROG}: error: --output {Path(results)} is the --input file {requests}; give the results a file "
                   "of their own")


# --- A file that is not this command's results -----------------------------------------------------

FOREIGN_FILES = {  # contents, and the line refused
    "csv": (b"name,score\nada,3\n", 1),
    "our-requests": (REQUESTS + b"\n", 1),
    "batch-api-requests": (b'{"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {}}\n', 1),
    "a-result-missing-fields": (b'{"id": "a", "text": "kept", "finish_reason": "stop"}\n', 1),
    "a-result-with-a-field-more": (RESULT.replace(b"}\n", b', "note": "mine"}\n'), 1),
    "an-array-id": (RESULT + b'{"id": [1], "error": {"message": "m"}, "line": 2}\n', 2),
    "no-id-and-no-line": (b'{"id": null, "error": {"message": "m"}, "line": "two"}\n', 1),
    "a-note-after-results": (RESULT + b"\n# notes\n", 3),
    "not-utf8": (RESULT + b"\xff\xfe\n", 2),
}
FOREIGN_LAST_LINES = {  # contents, and the line refused: all but the last end in a newline
    "text-without-newline": (b"precious notes", 1),
    "a-note-after-results": (RESULT + b"# notes", 2),
    "a-request-after-results": (RESULT + b'{"custom_id": "c", "body": {}}', 2),
    "nul-bytes-after-results": (RESULT + b"\0\0\0\0", 2),
}


@pytest.mark.parametrize("name", FOREIGN_FILES)
def test_a_file_of_complete_lines_that_are_not_results_is_refused_untouched(tiny_folder, work, no_model, capsys,
                                                                             name):
    contents, number = FOREIGN_FILES[name]
    (work / "requests.jsonl").write_bytes(REQUESTS)
    (work / "other.jsonl").write_bytes(contents)
    assert_refused(tiny_folder, work, "requests.jsonl", "other.jsonl", capsys,
                   FOREIGN_LINE.format(path="other.jsonl", number=number))


@pytest.mark.parametrize("name", FOREIGN_LAST_LINES)
def test_a_last_line_without_newline_that_is_no_cut_result_is_refused_untouched(tiny_folder, work, no_model, capsys,
                                                                                name):
    contents, number = FOREIGN_LAST_LINES[name]
    (work / "requests.jsonl").write_bytes(REQUESTS)
    (work / "other.txt").write_bytes(contents)
    assert_refused(tiny_folder, work, "requests.jsonl", "other.txt", capsys,
                   FOREIGN_LAST_LINE.format(path="other.txt", number=number))


def test_a_link_to_a_file_that_is_not_results_is_refused_naming_that_file(tiny_folder, work, no_model, capsys):
    (work / "requests.jsonl").write_bytes(REQUESTS)
    (work / "notes.txt").write_bytes(b"precious notes, no newline at the end")
    os.symlink("notes.txt", "results.jsonl")
    assert_refused(tiny_folder, work, "requests.jsonl", "results.jsonl", capsys,
                   FOREIGN_LAST_LINE.format(path=work / "notes.txt", number=1))


def test_a_link_chain_into_a_foreign_line_is_refused_before_the_last_line_is_judged(tiny_folder, work, no_model,
                                                                                      capsys):
    (work / "requests.jsonl").write_bytes(REQUESTS)
    (work / "notes.txt").write_bytes(b"precious notes\n" + b'{"id": "looks like the start of a result')
    os.symlink("notes.txt", "one.jsonl")
    os.symlink("one.jsonl", "results.jsonl")
    assert_refused(tiny_folder, work, "requests.jsonl", "results.jsonl", capsys,
                   FOREIGN_LINE.format(path=work / "notes.txt", number=1))


# --- Paths no results file can be ------------------------------------------------------------------

def test_a_link_in_a_loop_is_refused_as_a_flag(tiny_folder, work, no_model, capsys):
    (work / "requests.jsonl").write_bytes(REQUESTS)
    os.symlink("b.jsonl", "a.jsonl")
    os.symlink("a.jsonl", "b.jsonl")
    assert_refused(tiny_folder, work, "requests.jsonl", "a.jsonl", capsys,
                   f"{PROG}: error: argument --output: a.jsonl: a symbolic link that leads back to itself; expected a "
                   "file to append results to (--help lists the flags)", code=2)


def test_a_link_into_a_missing_folder_is_refused_as_a_flag(tiny_folder, work, no_model, capsys):
    (work / "requests.jsonl").write_bytes(REQUESTS)
    os.symlink("gone/results.jsonl", "results.jsonl")
    assert_refused(tiny_folder, work, "requests.jsonl", "results.jsonl", capsys,
                   f"{PROG}: error: argument --output: results.jsonl (a link to {work / 'gone' / 'results.jsonl'}): "
                   f"the folder {work / 'gone'} does not exist; create it first (--help lists the flags)", code=2)


def test_a_fifo_is_refused_as_a_flag_without_waiting_on_it(tiny_folder, work, no_model, capsys):
    (work / "requests.jsonl").write_bytes(REQUESTS)
    os.mkfifo("results.jsonl")
    assert_refused(tiny_folder, work, "requests.jsonl", "results.jsonl", capsys,
                   f"{PROG}: error: argument --output: results.jsonl: is not a regular file; expected a file to "
                   "append results to (--help lists the flags)", code=2)


# --- Files that are ours ---------------------------------------------------------------------------

def test_every_line_this_command_writes_is_recognised_as_a_result(tmp_path):
    lines = [RequestLine(1, "ours", False, "completion", {}), RequestLine(2, "api", True, "chat", {}),
             RequestLine(3, "ours-refused", False, error="bad"), RequestLine(4, "api-refused", True, error="bad"),
             RequestLine(5, None, False, error="no id"), RequestLine(6, None, True, error="no id")]
    records = [result_record(line, "text", "stop", 3, 1, {"object": "chat.completion"}) for line in lines[:2]]
    records += [error_record(line, "invalid_request", line.error) for line in lines[2:]]
    encoded = [(json.dumps(record, ensure_ascii=False) + "\n").encode() for record in records]  # as ResultsFile writes
    assert all(line.startswith(LINE_START) for line in encoded)
    results = tmp_path / "results.jsonl"
    results.write_bytes(b"".join(encoded))
    done = read_done(results)
    assert done.ids == {"ours", "api", "ours-refused", "api-refused"} and done.id_less_lines == {5, 6}
    assert results.read_bytes() == b"".join(encoded)


@pytest.mark.parametrize("left", [b'{"i', b'{"id": "b", "text": "cut sho'], ids=["shorter-than-a-line-start", "half"])
def test_a_link_to_our_results_is_followed_and_only_their_cut_last_line_is_dropped(tiny_folder, work, caplog, left):
    requests = write_lines(work / "requests.jsonl", [{"id": "a", "prompt": "x", "max_tokens": 2},
                                                     {"id": "b", "prompt": "y", "max_tokens": 2}])
    kept = RESULT.replace(b'"old"', b'"a"')
    (work / "real.jsonl").write_bytes(kept + left)
    os.symlink("real.jsonl", "results.jsonl")
    caplog.set_level(logging.INFO, logger="llama_int8")
    run(tiny_folder, requests, "results.jsonl")
    assert f"--output results.jsonl is a link to {work / 'real.jsonl'}: results go there" in caplog.text
    assert f"dropping a partly written last line ({len(left)} bytes)" in caplog.text
    assert os.readlink("results.jsonl") == "real.jsonl"
    written = (work / "real.jsonl").read_bytes()
    assert written.startswith(kept) and [r["id"] for r in read_results(work / "real.jsonl")] == ["a", "b"]


def test_an_empty_results_file_and_a_dangling_link_are_written_through(tiny_folder, work):
    requests = write_lines(work / "requests.jsonl", [{"id": "a", "prompt": "x", "max_tokens": 2}])
    (work / "empty.jsonl").write_bytes(b"")
    os.symlink("new.jsonl", "dangling.jsonl")
    run(tiny_folder, requests, "empty.jsonl")
    run(tiny_folder, requests, "dangling.jsonl")
    assert os.readlink("dangling.jsonl") == "new.jsonl"
    assert [r["id"] for r in read_results(work / "empty.jsonl")] == ["a"]
    assert [r["id"] for r in read_results(work / "new.jsonl")] == ["a"]
