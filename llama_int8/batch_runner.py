"""A batch run's work (batch.py is its command line): request lines become engine requests, checked
as the server checks them, and go through one continuous-batching engine; each result is appended to
the results file the moment its request ends.

A chat line's messages become prompt tokens through Llama.encode_dialog, the model's chat template,
as /v1/chat/completions does, and stop at the tokenizer's end-of-turn tokens as there; a line's
fields are read by the server's own request models (openai_api.py), so a field the server refuses
is refused here with the same words.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import openai_api as api
from .batch_files import RequestLine, ResultsFile, error_record, result_record
from .chat import Dialog
from .engine import Completion, ContextLengthExceeded, Engine, InvalidRequest, Output, QueueFull, Request
from .generation import Llama
from .params import check_one_dialog, check_text
from .tokenizer import Tokenizer

log = logging.getLogger("llama_int8.batch")


@dataclass(frozen=True)
class BatchSettings:
    """What the flags say about every request: the sampling fields a line may override, and the rest."""

    max_tokens: int
    sampling: dict[str, Any]  # temperature, top_p, repetition_penalty, seed: a line's own fields win
    system: str | None = None
    sort_by_length: bool = False


@dataclass(frozen=True)
class Job:
    line: RequestLine
    request: Request
    chat: bool


class LineError(Exception):
    """Why one request line cannot run: an OpenAI error code, the message, the field at fault."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass
class Tally:
    """What this run has done, for the progress bar and the summary line."""

    completed: int = 0
    failed: int = 0
    generated_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)


def run_batch(llm: Llama, lines: list[RequestLine], input_path: Path, output: Path, settings: BatchSettings,
              model_name: str) -> Tally:
    """Run lines on llm, appending each one's result (or error) to output as it is known."""
    # Whole prompts a step (unless --prefill_chunk or a sliding window bounds them): no one waits on the
    # next token of the requests beside, and the kernels run a long prompt faster in one piece
    # (SmolLM2 on a 2-core CPU: 570 prompt tok/s against 370 in the engine's default chunks of 128).
    engine = Engine(llm.model, llm.tokenizer, prefill_chunk=llm.model.max_seq_len)
    results = ResultsFile(output)
    tally = Tally()
    bar = tqdm(total=len(lines), desc="Requests", unit="req", smoothing=0.05)

    def record(result: dict[str, Any], generated_tokens: int = 0) -> None:
        results.write(result)
        tally.generated_tokens += generated_tokens
        bar.update(1)
        bar.set_postfix_str(f"{tally.tokens_per_second:.1f} generated tok/s", refresh=False)

    def completed(job: Job, completion: Completion) -> None:
        tally.completed += 1
        record(response_record(job, completion, model_name), completion.completion_tokens)

    try:
        with logging_redirect_tqdm():
            jobs = []
            for line in lines:
                try:
                    jobs.append(build_job(line, llm, engine, settings, input_path))
                except LineError as e:
                    log.warning("%s line %d: %s", input_path, line.number, e.message)
                    tally.failed += 1
                    record(error_record(line, e.code, e.message, e.param))
            if settings.sort_by_length:
                jobs.sort(key=lambda job: len(job.request.prompt), reverse=True)
            generate(engine, jobs, completed)
    finally:
        bar.close()
        results.close()
    log.info("Done: %d results appended to %s (%d completed, %d errors); %d tokens generated in %.1f s, %.1f tok/s",
             tally.completed + tally.failed, output, tally.completed, tally.failed, tally.generated_tokens,
             tally.seconds, tally.tokens_per_second)
    return tally


def generate(engine: Engine, jobs: list[Job], on_complete: Callable[[Job, Completion], None]) -> None:
    """Feed the engine as its slots and queue free up, and call on_complete(job, completion) as each
    request ends; a completion is dropped once reported, so memory does not grow with the file."""
    pending = deque(jobs)
    while pending or engine.has_work():
        while pending:
            try:
                engine.submit([pending[0].request], collector(pending[0], on_complete))
            except QueueFull:
                break
            pending.popleft()
        engine.step()


def collector(job: Job, on_complete: Callable[[Job, Completion], None]) -> Callable[[int, Output], None]:
    """An engine callback gathering one request's outputs into its completion, reported at the end."""
    completion = Completion()

    def on_output(_: int, out: Output) -> None:
        completion.add(out)
        if out.finish_reason is not None:
            on_complete(job, completion)

    return on_output


# --- From a line to an engine request ----------------------------------------------------------------

def build_job(line: RequestLine, llm: Llama, engine: Engine, settings: BatchSettings, input_path: Path) -> Job:
    """The engine request of a line, or LineError saying why it cannot run."""
    if line.error is not None:
        raise LineError("invalid_request", line.error)
    chat = line.kind == "chat"
    schema = api.ChatCompletionRequest if chat else api.CompletionRequest
    try:
        body = schema.model_validate({**settings.sampling, **line.body})
    except ValidationError as e:
        param, message = api.first_invalid_field(e.errors())
        raise LineError("invalid_request", message, param) from None
    refuse_unsupported(body, chat)
    unknown = api.unknown_fields(body)
    if unknown:
        log.warning("%s line %d: ignoring unknown field(s) %s", input_path, line.number, ", ".join(unknown))
    param = "messages" if chat else "prompt"
    try:
        prompt = (chat_prompt(llm, body.dialog, settings.system) if chat
                  else completion_prompt(llm.tokenizer, body.prompt))
    except ValueError as e:
        raise LineError("invalid_request", str(e), param) from None
    limit = (body.completion_limit if chat else body.max_tokens) or settings.max_tokens
    request = api.engine_request(body, prompt, limit, llm.tokenizer.stop_ids, None)
    try:
        engine.check(request)
    except ContextLengthExceeded as e:
        raise LineError("context_length_exceeded", f"{e} (--max_seq_len is {engine.max_seq_len})", param) from None
    except InvalidRequest as e:
        raise LineError("invalid_request", str(e), param if e.field == "prompt" else e.field) from None
    return Job(line, request, chat)


def refuse_unsupported(body: api.GenerationFields, chat: bool) -> None:
    """Fields the server answers that a batch result has no room for."""
    if body.n != 1:
        raise LineError("invalid_request", f"n: one answer per line in a batch run, got {body.n}; repeat the line "
                                           "under other ids instead", "n")
    if body.logprobs if chat else body.logprobs is not None:
        raise LineError("invalid_request", "logprobs: not supported in a batch run", "logprobs")
    if not chat and (body.echo or body.suffix):
        name = "echo" if body.echo else "suffix"
        raise LineError("invalid_request", f"{name}: not supported in a batch run", name)


def chat_prompt(llm: Llama, dialog: Dialog, system: str | None) -> list[int]:
    """The prompt tokens of a chat, as the server builds them; system goes first where it has none."""
    if system is not None and dialog[0]["role"] != "system":
        dialog = [{"role": "system", "content": system}, *dialog]
    check_one_dialog(dialog, "messages")
    return llm.encode_dialog(dialog)


def completion_prompt(tokenizer: Tokenizer, prompt: Any) -> list[int]:
    """One text (encoded with BOS, as text_completion and the server do) or one list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
        return tokenizer.encode(prompt, bos=True, eos=False)
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ValueError("prompt: expected one text or one list of token ids per line; give each prompt a line of its own")


def response_record(job: Job, completion: Completion, model_name: str) -> dict[str, Any]:
    """The result line of a completed job; an OpenAI Batch API line's response body is the one the
    server would send."""
    text, reason = completion.text, completion.finish_reason
    prompt_tokens, completion_tokens = completion.prompt_tokens, completion.completion_tokens
    body: dict[str, Any] = {}
    if job.line.openai and job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
        body = api.chat_response(api.ResponseIds("chatcmpl", model_name), [choice], prompt_tokens, completion_tokens)
    elif job.line.openai:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        body = api.completion_response(api.ResponseIds("cmpl", model_name), [choice], prompt_tokens,
                                       completion_tokens)
    return result_record(job.line, text, reason, prompt_tokens, completion_tokens, body)
