"""A batch run's work (batch.py is its command line): each request line is answered by the server's
own serving layer (serving.py), so a line gets the answer its body gets from the server, through one
continuous-batching engine; each result is appended to the results file the moment its request ends.

A line's fields are the server's (openai_api.py): a field the server refuses is refused here with
the same words, and the flags fill in the sampling fields and max_tokens a line leaves out. A line of
ours is answered flat (text, finish reason, token counts, and the log-probabilities it asked for); an
OpenAI Batch API line by the response body the server would send, so it may ask for `n` choices too.
The model a line names is not checked: a batch file names the model it was written for, and the
model this run loads answers it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .batch_files import RequestLine, ResultsFile, error_record, result_record
from .engine import Completion, Output, QueueFull
from .generation import Llama
from .serving import ApiError, Job, Serving

log = logging.getLogger("llama_int8.batch")


@dataclass(frozen=True)
class BatchSettings:
    """What the flags say about every request: the sampling fields a line may override, and the rest."""

    max_tokens: int
    sampling: dict[str, Any]  # temperature, top_p, repetition_penalty, seed: a line's own fields win
    system: str | None = None
    sort_by_length: bool = False
    tool_parser: str | None = None  # tool_calls.PARSERS; None: the chat template's


@dataclass(frozen=True)
class LineJob:
    line: RequestLine
    job: Job


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
    serving = Serving(llm.engine(whole_prompts=True), llm.encode_dialog, model_name, model_must_match=False,
                      tool_parser=settings.tool_parser)
    results = ResultsFile(output)
    tally = Tally()
    bar = tqdm(total=len(lines), desc="Requests", unit="req", smoothing=0.05)

    def record(result: dict[str, Any], generated_tokens: int = 0) -> None:
        results.write(result)
        tally.generated_tokens += generated_tokens
        bar.update(1)
        bar.set_postfix_str(f"{tally.tokens_per_second:.1f} generated tok/s", refresh=False)

    def refused(line: RequestLine, e: ApiError) -> None:
        log.warning("%s line %d: %s", input_path, line.number, e.message)
        tally.failed += 1
        record(error_record(line, e.code or "invalid_request", e.message, e.param, e.type))

    def ended(job: LineJob, completions: list[Completion]) -> None:
        try:
            response = serving.response(job.job, completions)
        except ApiError as e:
            refused(job.line, e)
            return
        tally.completed += 1
        record(response_record(job.line, response), sum(c.completion_tokens for c in completions))

    try:
        with logging_redirect_tqdm():
            jobs = []
            for line in lines:
                try:
                    jobs.append(LineJob(line, line_job(serving, line, settings)))
                except ApiError as e:
                    refused(line, e)
            if settings.sort_by_length:
                jobs.sort(key=lambda job: max(len(p) for p in job.job.prompts), reverse=True)
            generate(serving, jobs, ended)
    finally:
        bar.close()
        results.close()
    log.info("Done: %d results appended to %s (%d completed, %d errors); %d tokens generated in %.1f s, %.1f tok/s",
             tally.completed + tally.failed, output, tally.completed, tally.failed, tally.generated_tokens,
             tally.seconds, tally.tokens_per_second)
    return tally


def generate(serving: Serving, jobs: list[LineJob], on_end: Callable[[LineJob, list[Completion]], None]) -> None:
    """Feed the engine as its slots and queue free up, and call on_end(job, completions) as each job's
    requests have all ended; completions are dropped once reported, so memory does not grow with the file."""
    engine = serving.engine
    pending = deque(jobs)
    while pending or engine.has_work():
        while pending:
            try:
                engine.submit(pending[0].job.requests, collector(pending[0], on_end))
            except QueueFull:
                break
            pending.popleft()
        engine.step()


def collector(job: LineJob, on_end: Callable[[LineJob, list[Completion]], None]) -> Callable[[int, Output], None]:
    """An engine callback gathering a job's outputs into its completions, reported once all have ended."""
    completions = [Completion() for _ in job.job.requests]
    remaining = len(completions)

    def on_output(i: int, out: Output) -> None:
        nonlocal remaining
        completions[i].add(out)
        if out.finish_reason is not None:
            remaining -= 1
            if remaining == 0:
                on_end(job, completions)

    return on_output


# --- From a line to a job, and back ------------------------------------------------------------------

def line_job(serving: Serving, line: RequestLine, settings: BatchSettings) -> Job:
    """The serving job of a line, checked as the server checks a body, or ApiError saying why it cannot run."""
    if line.error is not None:
        raise ApiError(400, line.error, code="invalid_request")
    body = {**settings.sampling, **with_system(line.body, settings.system)}
    job = serving.job(line.kind, body, settings.max_tokens)
    if not line.openai and len(job.requests) > 1:  # a line of ours has room for one answer
        if job.body.n > 1:
            raise ApiError(400, f"n: one answer per line in a batch run, got {job.body.n}; repeat the line under "
                                "other ids instead (or write an OpenAI Batch API line)", param="n")
        raise ApiError(400, "prompt: expected one text or one list of token ids per line; give each prompt a line "
                            "of its own", param="prompt")
    try:
        serving.check(job)
    except ApiError as e:
        if e.code == "context_length_exceeded":
            e.message += f" (--max_seq_len is {serving.engine.max_seq_len})"
        raise
    return job


def with_system(body: dict[str, Any], system: str | None) -> dict[str, Any]:
    """A chat body with system put first where its messages have none (anything else as it is)."""
    messages = body.get("messages")
    if system is None or not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
        return body
    if messages[0].get("role") in ("system", "developer"):
        return body
    return {**body, "messages": [{"role": "system", "content": system}, *messages]}


def response_record(line: RequestLine, response: dict[str, Any]) -> dict[str, Any]:
    """The result line of a completed line: an OpenAI Batch API line's holds the server's response body;
    a line of ours the one choice's text, finish reason and token counts, and the scores it asked for."""
    choice, usage = response["choices"][0], response["usage"]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    prompt_logprobs = response.get("prompt_logprobs", choice.get("prompt_logprobs"))
    scores = {name: value for name, value in (("logprobs", choice["logprobs"]), ("prompt_logprobs", prompt_logprobs))
              if value is not None}
    return result_record(line, text, choice["finish_reason"], usage["prompt_tokens"], usage["completion_tokens"],
                         response, scores)
