"""The files of a batch run (batch.py): requests read from JSON lines, results appended as JSON lines.

A request line is ours or the OpenAI Batch API's:

    {"id": "a", "prompt": "Once upon a time", "max_tokens": 32}
    {"id": "b", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7, "seed": 3}
    {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...]}}

Results are appended one line per request, flushed and fsync'd as each completes, so a killed run
loses only the requests in flight. A rerun skips the ids the results already hold; a last line cut
short by the kill is dropped first. Nothing here imports torch: a bad file is reported at once.

No file but our own is changed. The results file is only appended to, but for that one cut, and it
is made only once the whole file is known to be ours: every complete line one of the objects
result_record and error_record write (blank lines aside), the cut line the start of one. Any other
file is refused, naming its first foreign line, with not a byte of it changed. An --output that is
the --input under any name (another spelling, a hard link, a symbolic link either way) is refused
before anything is read. An --output that is a symbolic link is followed to the file it leads to
(resolve_output), which is then judged as any other path: results go there, and messages name it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

log = logging.getLogger("llama_int8.batch")

Kind = Literal["chat", "completion"]
# The OpenAI Batch API's endpoints this engine answers, and the kind of request each takes.
BATCH_API_URLS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
RequestId = str | int


@dataclass(frozen=True)
class RequestLine:
    """One line of the requests file. kind and body are None for a line that cannot run, and error
    then says why; id is None where the line has no usable id."""

    number: int  # 1-based, as an editor counts lines
    id: RequestId | None
    openai: bool  # an OpenAI Batch API line, answered in that API's output shape
    kind: Kind | None = None
    body: dict[str, Any] | None = None
    error: str | None = None


# --- Requests ----------------------------------------------------------------------------------------

def read_requests(path: Path) -> list[RequestLine]:
    """Every non-blank line of path; a malformed one comes back with its error, never raised."""
    lines = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                lines.append(parse_request_line(raw, number))
    return lines


def parse_request_line(raw: bytes, number: int) -> RequestLine:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return RequestLine(number, None, False, error=f"not UTF-8 text (byte {e.start + 1})")
    except json.JSONDecodeError as e:
        return RequestLine(number, None, False, error=f"not valid JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return RequestLine(number, None, False, error=f"expected a JSON object, got {json_type(obj)}")
    if "custom_id" in obj:
        return parse_batch_api_line(obj, number)
    return parse_own_line(obj, number)


def parse_own_line(obj: dict[str, Any], number: int) -> RequestLine:
    """{"id": ..., "prompt" or "messages": ..., sampling fields...}: the body is the line without its id."""
    if "id" not in obj:
        return RequestLine(number, None, False, error="no 'id' (or OpenAI Batch API 'custom_id') field")
    request_id = obj["id"]
    if (problem := id_problem(request_id, "id")) is not None:
        return RequestLine(number, None, False, error=problem)
    body = {k: v for k, v in obj.items() if k != "id"}
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        found = "both" if has_prompt else "neither"
        return RequestLine(number, request_id, False, error=f"expected one of 'prompt' (text to complete) and "
                                                            f"'messages' (a chat), got {found}")
    return RequestLine(number, request_id, False, "chat" if has_messages else "completion", body)


def parse_batch_api_line(obj: dict[str, Any], number: int) -> RequestLine:
    """{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}."""
    request_id = obj["custom_id"]
    if (problem := id_problem(request_id, "custom_id")) is not None:
        return RequestLine(number, None, True, error=problem)
    method, url, body = obj.get("method", "POST"), obj.get("url"), obj.get("body")
    if method != "POST":
        return RequestLine(number, request_id, True, error=f"method: expected 'POST', got {method!r}")
    if url not in BATCH_API_URLS:
        return RequestLine(number, request_id, True, error=f"url: expected one of {', '.join(BATCH_API_URLS)}, "
                                                           f"got {url!r}")
    if not isinstance(body, dict):
        return RequestLine(number, request_id, True, error=f"body: expected a JSON object, got {json_type(body)}")
    return RequestLine(number, request_id, True, BATCH_API_URLS[url], body)


def id_problem(value: Any, field: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return f"{field}: expected a non-empty string or an integer, got {json.dumps(value)}"
    return None


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def check_unique_ids(lines: list[RequestLine], path: Path) -> None:
    """Raise ValueError naming both lines of the first id that appears twice."""
    first_seen: dict[RequestId, int] = {}
    for line in lines:
        if line.id is None:
            continue
        if line.id in first_seen:
            raise ValueError(f"{path}: id {json.dumps(line.id)} is on line {first_seen[line.id]} and on line "
                             f"{line.number}; every request needs an id of its own")
        first_seen[line.id] = line.number


# --- Results -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Done:
    """What a results file already holds: the ids answered, and the lines without an id reported."""

    ids: frozenset[RequestId]
    id_less_lines: frozenset[int]

    def covers(self, line: RequestLine) -> bool:
        return line.id in self.ids if line.id is not None else line.number in self.id_less_lines


# The fields of each kind of line this command writes (result_record, error_record): ours completed,
# ours refused, the OpenAI Batch API's completed and refused. A line with any other set is not ours.
RESULT_FIELDS: tuple[tuple[str, ...], ...] = (
    ("id", "text", "finish_reason", "prompt_tokens", "completion_tokens"),
    ("id", "error", "line"),
    ("id", "custom_id", "response", "error"),
    ("id", "custom_id", "response", "error", "line"),
)
SCORES = ("logprobs", "prompt_logprobs")  # what a completed line of ours adds when it asked to be scored
RESULT_FIELD_SETS = frozenset(frozenset(fields) for fields in RESULT_FIELDS) | frozenset(
    frozenset(RESULT_FIELDS[0] + scores) for scores in (SCORES[:1], SCORES[1:], SCORES))
# How every line written begins (json.dumps, "id" first): a cut last line must begin so, or be shorter.
LINE_START = b'{"id": '


def resolve_output(path: Path) -> Path:
    """The file results go to: path, or where it leads if it is a symbolic link (a chain followed to
    its end). ValueError for a link that leads back to itself."""
    if not path.is_symlink():
        return path
    try:
        target = path.resolve()
    except RuntimeError:  # a loop, as Python 3.11 and 3.12 report it; 3.13 returns a link of the loop
        target = path
    if target.is_symlink():
        raise ValueError(f"{path}: a symbolic link that leads back to itself; expected a file to append results to")
    return target


def check_output_is_not_input(output: Path, input_path: Path) -> None:
    """Raise ValueError if output is input under any name: the results would be appended to the
    requests, and a resume would take the requests for results and cut their last line."""
    if output.exists() and os.path.samefile(output, input_path):
        raise ValueError(f"--output {output} is the --input file {input_path}; give the results a file of their own")


def read_done(path: Path) -> Done:
    """The results already in path (none if it does not exist). Every complete line must be a result
    of ours, else ValueError naming it; only then is a last line a killed run left half written cut
    off, so that no file but a results file is ever changed. A link is judged by the file it leads to."""
    path = resolve_output(path)
    if not path.exists():
        return Done(frozenset(), frozenset())
    ids, id_less = set(), set()
    complete = 0  # bytes of complete lines so far: what stays if the last line is cut short
    # One descriptor for judging and cutting, so the file cut is the file judged; the path is resolved,
    # so a link found here was put there since and is refused, not followed.
    with os.fdopen(os.open(path, os.O_RDWR | os.O_NOFOLLOW), "rb+") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):  # the last line, so every line before it has passed as ours
                check_partial_line(raw, path, number)
                drop_partial_last_line(f, path, complete, len(raw))
                break
            complete += len(raw)
            if not raw.strip():
                continue
            record = parse_result_line(raw, path, number)
            request_id = record.get("custom_id", record["id"])
            if request_id is None:
                id_less.add(record["line"])
            else:
                ids.add(request_id)
    return Done(frozenset(ids), frozenset(id_less))


def parse_result_line(raw: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not is_result(record):
        expected = "; or ".join(", ".join(fields) for fields in RESULT_FIELDS)
        raise ValueError(f"{path} line {number}: not a result of a batch run (expected a JSON object with the fields "
                         f"{expected}); give another --output or remove that line")
    return record


def is_result(record: Any) -> bool:
    """A line as result_record or error_record write it: their fields, and an id a request can have
    (None only on the error of a line that had none, which then names its line)."""
    if not isinstance(record, dict) or frozenset(record) not in RESULT_FIELD_SETS:
        return False
    request_id = record.get("custom_id", record["id"])
    if request_id is None:
        return isinstance(record.get("line"), int) and not isinstance(record["line"], bool)
    return id_problem(request_id, "id") is None


def check_partial_line(raw: bytes, path: Path, number: int) -> None:
    """A last line without its newline is ours only if it begins as every line written does."""
    if raw[:len(LINE_START)] != LINE_START[:len(raw)]:
        raise ValueError(f"{path} line {number}: not the start of a result cut short by an interrupted run (a last "
                         f"line without a newline, expected to begin {LINE_START.decode().strip()}); give another "
                         "--output or remove that line")


def drop_partial_last_line(f: BinaryIO, path: Path, keep: int, partial: int) -> None:
    """Every result is written with its newline in one piece, so bytes after the last newline are
    what a killed run left of the line it was writing: truncate them away."""
    log.warning("%s: dropping a partly written last line (%d bytes) left by an interrupted run; its request runs "
                "again", path, partial)
    f.truncate(keep)


class ResultsFile:
    """The results file, appended to: each record one line, on disk before write returns."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# --- Result records ----------------------------------------------------------------------------------

def result_record(line: RequestLine, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                  response_body: dict[str, Any], scores: dict[str, Any] | None = None) -> dict[str, Any]:
    """A completed request: ours flat, with the SCORES it asked for (logprobs, prompt_logprobs), an
    OpenAI Batch API line in that API's output shape, whose response body is the chat or completion
    response the server would send (response_body)."""
    if line.openai:
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.id,
                "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": response_body},
                "error": None}
    return {"id": line.id, "text": text, "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, **(scores or {})}


def error_record(line: RequestLine, code: str, message: str, param: str | None = None,
                 type: str = "invalid_request_error") -> dict[str, Any]:
    """A request that could not run, with its line number: the only name of a line without an id."""
    error = {"message": message, "type": type, "param": param, "code": code}
    if line.openai:
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.id, "response": None, "error": error,
                "line": line.number}
    return {"id": line.id, "error": error, "line": line.number}
