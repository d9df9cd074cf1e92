"""The files of a batch run (batch.py): requests read from JSON lines, results appended as JSON lines.

A request line is ours or the OpenAI Batch API's:

    {"id": "a", "prompt": "Once upon a time", "max_tokens": 32}
    {"id": "b", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7, "seed": 3}
    {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...]}}

Results are appended one line per request, flushed and fsync'd as each completes, so a killed run
loses only the requests in flight. A rerun skips the ids the results already hold; a last line cut
short by the kill is dropped first. Nothing here imports torch: a bad file is reported at once.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


def read_done(path: Path) -> Done:
    """The results already in path (none if it does not exist), after cutting off a last line a
    killed run left half written. A complete line that is not a result is an error: the file is
    then not one this command wrote, and appending to it would hide that."""
    if not path.exists():
        return Done(frozenset(), frozenset())
    drop_partial_last_line(path)
    ids, id_less = set(), set()
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            record = parse_result_line(raw, path, number)
            request_id = record.get("custom_id", record.get("id"))
            if request_id is None:
                id_less.add(record.get("line"))
            else:
                ids.add(request_id)
    return Done(frozenset(ids), frozenset(id_less))


def parse_result_line(raw: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict) or not ("id" in record or "custom_id" in record):
        raise ValueError(f"{path} line {number}: not a result of a batch run (expected a JSON object with an 'id' "
                         "or 'custom_id'); give another --output or remove that line")
    return record


def drop_partial_last_line(path: Path) -> None:
    """Every result is written with its newline in one piece, so bytes after the last newline are
    what a killed run left of the line it was writing: truncate them away."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb+") as f:
        keep = last_newline_end(f, size)
        if keep < size:
            log.warning("%s: dropping a partly written last line (%d bytes) left by an interrupted run; its request "
                        "runs again", path, size - keep)
            f.truncate(keep)


def last_newline_end(f, size: int, block: int = 1 << 16) -> int:
    """The offset just after the file's last b"\\n" (0 if none), reading backwards from its end."""
    end = size
    while end > 0:
        start = max(0, end - block)
        f.seek(start)
        at = f.read(end - start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


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
                  response_body: dict[str, Any]) -> dict[str, Any]:
    """A completed request: ours flat, an OpenAI Batch API line in that API's output shape, whose
    response body is the chat or completion response the server would send (response_body)."""
    if line.openai:
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.id,
                "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": response_body},
                "error": None}
    return {"id": line.id, "text": text, "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens}


def error_record(line: RequestLine, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """A request that could not run, with its line number: the only name of a line without an id."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    if line.openai:
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.id, "response": None, "error": error,
                "line": line.number}
    return {"id": line.id, "error": error, "line": line.number}
