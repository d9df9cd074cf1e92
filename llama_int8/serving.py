"""The OpenAI API over the continuous-batching engine, without HTTP: a request body becomes a Job
(its engine requests), engine errors become OpenAI errors, and a job's outputs become the response
object or the stream chunks. The server (server.py: routes, SSE, metrics) and the batch runner
(batch_runner.py: files, progress) both answer through one Serving, so a body gets the same answer
from either.

    serving = Serving(engine, llm.encode_dialog, "my-model")
    job = serving.completion(serving.parse("completion", {"prompt": "Hi", "max_tokens": 8}))
    handles = serving.submit(job, on_output)        # on_output(i, engine.Output), from the engine's thread
    ...
    response = serving.response(job, completions)    # the chat.completion / text_completion object

Scoring: a legacy completion with `echo` returns its prompt before the completion, and with
`logprobs` too the prompt's tokens with their log-probabilities (null for the first, which nothing
predicts); `max_tokens: 0` then scores without generating (what lm-eval's loglikelihood tasks send).
`prompt_logprobs: N`, on both endpoints, is vLLM's extension: per prompt token its log-probability,
rank and the N likeliest alternatives, keyed by token id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from . import openai_api as api
from .engine import Completion, ContextLengthExceeded, Engine, Handle, InvalidRequest, Output, QueueFull, Request, \
    TokenLogprob
from .grammar import Compiled, UnsupportedGrammar
from .textstream import IncrementalDecoder
from .tool_use import ToolUse, tool_use_of

Kind = Literal["chat", "completion"]
BODIES: dict[Kind, type[api.GenerationFields]] = {"chat": api.ChatCompletionRequest,
                                                  "completion": api.CompletionRequest}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return api.error_body(self.message, self.type, self.param, self.code)


def invalid_body(e: ValidationError) -> ApiError:
    param, message = api.first_invalid_field(e.errors())
    return ApiError(400, message, param=param)


@dataclass
class Job:
    """One body's work: body.n engine requests per prompt, in order, and what its answer repeats."""

    kind: Kind
    body: api.ChatCompletionRequest | api.CompletionRequest
    prompts: list[list[int]]
    requests: list[Request]
    ids: api.ResponseIds
    param: str  # the field a prompt's error names
    echo_texts: list[str] = field(default_factory=list)  # per prompt, when the body echoes it
    tool_use: ToolUse | None = None  # a chat with tools

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def count_param(self) -> str:
        """The field that asked for too many completions at once."""
        return "n" if self.body.n > 1 else self.param

    def prompt_of(self, choice: int) -> int:
        return choice // self.body.n

    def usage(self, completion_tokens: int, cached: list[int]) -> dict[str, Any]:
        """OpenAI's usage of the job; cached: each request's prompt tokens reused, of which a prompt
        counts its first choice's (the prompt is counted once, whatever n)."""
        return api.usage(self.prompt_tokens, completion_tokens, sum(cached[::self.body.n]))


class Serving:
    """The OpenAI endpoints' logic over one engine; encode_dialog turns messages into prompt tokens
    through the model's chat template (encode_dialog(dialog, continue_final, tools=...)). A body naming
    another model than model_name is refused (404) unless model_must_match is False. tool_parser: the
    format of the model's tool calls (tool_calls.PARSERS), where its chat template does not show it."""

    def __init__(self, engine: Engine, encode_dialog: Callable[..., list[int]], model_name: str,
                 model_must_match: bool = True, tool_parser: str | None = None):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.encode_dialog = encode_dialog
        self.model_name = model_name
        self.model_must_match = model_must_match
        self.tool_parser = tool_parser

    # --- Requests ------------------------------------------------------------------------------------

    @staticmethod
    def parse(kind: Kind, raw: Any) -> api.ChatCompletionRequest | api.CompletionRequest:
        """A body checked field by field: ApiError 400 naming the first bad one."""
        try:
            return BODIES[kind].model_validate(raw)
        except ValidationError as e:
            raise invalid_body(e) from None

    def job(self, kind: Kind, raw: Any, default_max_tokens: int | None) -> Job:
        """The job of a raw body of either kind (ApiError for a bad one); max_tokens unset takes
        default_max_tokens."""
        body = self.parse(kind, raw)
        return self.chat(body, default_max_tokens) if kind == "chat" else self.completion(body, default_max_tokens)

    def check_model(self, requested: str | None) -> None:
        if self.model_must_match and requested is not None and requested != self.model_name:
            raise ApiError(404, f"model: {requested!r} is not served here; /v1/models lists {self.model_name!r}",
                           param="model", code="model_not_found")

    def chat(self, body: api.ChatCompletionRequest, default_max_tokens: int | None = None) -> Job:
        """The job of a chat body; max_tokens unset takes default_max_tokens, else what the context leaves."""
        self.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        ends_with_answer = body.messages[-1].role == "assistant"
        continuing = ends_with_answer if body.continue_final_message is None else body.continue_final_message
        if continuing != ends_with_answer:
            raise ApiError(400, "continue_final_message: true needs a chat that ends with an assistant message" if
                           continuing else "continue_final_message: false, but the chat ends with an assistant "
                           "message; drop it, or let the model continue it", param="continue_final_message")
        tool_use = self.tool_use(body)
        try:
            dialog = body.dialog if tool_use is None else tool_use.prompt_dialog(body.dialog, continuing)
            prompt = self.encode_dialog(dialog, continuing, tools=tool_use and tool_use.template_tools())
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        job = Job("chat", body, [prompt], [], api.ResponseIds("chatcmpl", self.model_name), "messages",
                  tool_use=tool_use)
        job.requests = self.engine_requests(job, body.completion_limit, default_max_tokens, body.alternatives,
                                            body.prompt_logprobs, self.compiled_grammar(body, tool_use))
        return job

    def tool_use(self, body: api.ChatCompletionRequest) -> ToolUse | None:
        """How the chat's tools may be used (None without tools); ApiError 400 for a choice that cannot be."""
        tools = [t.model_dump(exclude_unset=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice
        try:
            return tool_use_of(tools, choice if isinstance(choice, str | None) else choice.model_dump(),
                               body.parallel_tool_calls, self.tokenizer.chat_template, self.tool_parser)
        except ValueError as e:
            raise ApiError(400, str(e), param="tool_choice") from e

    def completion(self, body: api.CompletionRequest,
                   default_max_tokens: int | None = api.COMPLETIONS_DEFAULT_MAX_TOKENS) -> Job:
        """The job of a legacy completions body (a prompt or a list of them)."""
        self.check_model(body.model)
        if body.suffix:
            raise ApiError(400, f"suffix: not supported by this server: {api.refusal('suffix')}", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, f"best_of: only {body.n} (n) is supported: choices are not ranked here", param="best_of")
        job = Job("completion", body, self.completion_prompts(body), [], api.ResponseIds("cmpl", self.model_name),
                  "prompt")
        scored = body.logprobs if body.echo else None
        alternatives = [a for a in (scored, body.prompt_logprobs) if a is not None]
        job.requests = self.engine_requests(job, body.max_tokens, default_max_tokens, body.logprobs,
                                            max(alternatives) if alternatives else None, self.compiled_grammar(body))
        if body.echo:
            job.echo_texts = [self.token_texts(p) for p in job.prompts]
        return job

    def completion_prompts(self, body: api.CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt: expected text, a list of texts or token ids, got an empty list", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return [self.tokenizer.encode(p, bos=True, eos=False) if isinstance(p, str) else list(p) for p in prompt]

    def compiled_grammar(self, body: api.GenerationFields, tool_use: ToolUse | None = None) -> Compiled | None:
        """The grammar the body's answers must follow (its response format, or a call it requires),
        compiled here (in the caller's thread, never the engine's); ApiError 400 naming the field whose
        grammar cannot be enforced exactly."""
        try:
            asked = body.grammar
        except ValueError as e:
            raise ApiError(400, str(e), param="structured_outputs") from e
        try:
            calls = tool_use and tool_use.grammar()
        except ValueError as e:
            raise ApiError(400, str(e), param="tool_choice") from e
        if asked is not None and calls is not None:
            raise ApiError(400, "tool_choice: a required tool call leaves no room for a response_format or "
                                "structured_outputs as well", param="tool_choice")
        if calls is not None:
            asked = calls, "tool_choice"
        if asked is None:
            return None
        spec, param = asked
        try:
            return self.engine.grammars.compile(spec)
        except UnsupportedGrammar as e:
            raise ApiError(400, f"{param}: {e}", param=param) from e

    def engine_requests(self, job: Job, max_tokens: int | None, default_max_tokens: int | None,
                        logprobs: int | None, prompt_logprobs: int | None,
                        grammar: Compiled | None = None) -> list[Request]:
        """body.n requests per prompt (seeded seed, seed + 1, ... when a seed is given); max_tokens None
        takes default_max_tokens, or what the context leaves when that is None too; 0 only scores."""
        body = job.body
        if max_tokens == 0 and prompt_logprobs is None:
            raise ApiError(400, "max_tokens: 0 generates nothing; it is for scoring a prompt (echo with logprobs, "
                                "or prompt_logprobs)", param="max_tokens")
        requests = []
        for prompt in job.prompts:
            limit = max_tokens if max_tokens is not None else default_max_tokens
            if limit is None:
                limit = self.engine.max_seq_len - len(prompt)
                if limit < 1:
                    raise ApiError(400, f"This model's maximum context length is {self.engine.max_seq_len} tokens; "
                                        f"the prompt alone has {len(prompt)}", param=job.param,
                                   code="context_length_exceeded")
            requests += [api.engine_request(body, prompt, limit, self.tokenizer.stop_ids, logprobs, j,
                                            prompt_logprobs, grammar) for j in range(body.n)]
        return requests

    def check(self, job: Job) -> None:
        """The engine's verdict on each request (context length, vocabulary), as ApiError."""
        for request in job.requests:
            try:
                self.engine.check(request)
            except InvalidRequest as e:
                raise self.invalid_request(job, e) from e

    def submit(self, job: Job, on_output: Callable[[int, Output], None]) -> list[Handle]:
        """Queue the job's requests, all or none: on_output(i, output) gets the outputs of request i."""
        try:
            return self.engine.submit(job.requests, on_output)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from e
        except InvalidRequest as e:
            raise self.invalid_request(job, e) from e
        except RuntimeError as e:
            raise ApiError(503, str(e), "service_unavailable", code="shutting_down") from e

    @staticmethod
    def invalid_request(job: Job, e: InvalidRequest) -> ApiError:
        if isinstance(e, ContextLengthExceeded):
            return ApiError(400, str(e), param=job.param, code="context_length_exceeded")
        param = {"prompt": job.param, "requests": job.count_param}.get(e.field, e.field)
        return ApiError(400, str(e), param=param)

    # --- Answers -------------------------------------------------------------------------------------

    @staticmethod
    def failure(reasons: set[str | None]) -> ApiError | None:
        """The error to answer when a request ended without finishing (shutdown, a failed step)."""
        if "error" in reasons:
            return ApiError(500, "generation failed; see the server's log", "server_error", code="generation_failed")
        if "cancelled" in reasons:
            return ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
        return None

    def response(self, job: Job, results: list[Completion]) -> dict[str, Any]:
        """The whole answer to a job whose requests have all ended, or ApiError when one failed."""
        if (error := self.failure({r.finish_reason for r in results})) is not None:
            raise error
        counts = job.usage(sum(r.completion_tokens for r in results), [r.cached_tokens for r in results])
        if job.kind == "chat":
            body: api.ChatCompletionRequest = job.body
            choices = [{"index": i, **self.chat_message(job, r),
                        "logprobs": None if body.alternatives is None
                        else {"content": api.chat_logprob_entries(self.tokenizer, r.logprobs)}}
                       for i, r in enumerate(results)]
            response = api.chat_response(job.ids, choices, counts)
            if body.prompt_logprobs is not None:
                response["prompt_logprobs"] = self.vllm_prompt_logprobs(results[0].prompt_logprobs,
                                                                        body.prompt_logprobs)
            return response
        choices = [self.completion_choice(job, i, r) for i, r in enumerate(results)]
        return api.completion_response(job.ids, choices, counts)

    @staticmethod
    def chat_message(job: Job, r: Completion) -> dict[str, Any]:
        """A chat choice's message and finish reason: its tool calls read out where it has tools."""
        if job.tool_use is None:
            return {"message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}
        message, reason = job.tool_use.answer(r.text, r.finish_reason)
        return {"message": message, "finish_reason": reason}

    def completion_choice(self, job: Job, i: int, r: Completion) -> dict[str, Any]:
        body: api.CompletionRequest = job.body
        echo = self.echo_part(job, i, r.prompt_logprobs)
        text = (echo[0] if echo else "") + r.text
        logprobs = None
        if body.logprobs is not None:
            texts = self.continuation_texts(job.prompts[job.prompt_of(i)], [lp.token for lp in r.logprobs])
            generated = api.completion_logprobs(self.tokenizer, r.logprobs, texts, len(text) - len(r.text))
            logprobs = api.joined_logprobs(echo[1], generated) if echo else generated
        choice = {"index": i, "text": text, "finish_reason": r.finish_reason, "logprobs": logprobs}
        if body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.vllm_prompt_logprobs(r.prompt_logprobs, body.prompt_logprobs)
        return choice

    def echo_part(self, job: Job, i: int, scores: list[TokenLogprob | None] | tuple) -> tuple[str, dict] | None:
        """(the prompt's text, its legacy logprobs when scored) of choice i, when the body echoes."""
        if not job.body.echo:
            return None
        prompt = job.prompts[job.prompt_of(i)]
        texts = job.echo_texts[job.prompt_of(i)]
        return "".join(texts), (api.prompt_logprobs_legacy(self.tokenizer, texts, scores, job.body.logprobs)
                                if job.body.logprobs is not None and len(scores) == len(prompt) else None)

    def token_texts(self, tokens: list[int]) -> list[str]:
        """Each token's share of the text: the characters it completes, so that they join into the
        whole text (a character split over byte-level tokens belongs to the token that ends it)."""
        return self.continuation_texts([], tokens)

    def continuation_texts(self, context: list[int], tokens: list[int]) -> list[str]:
        """token_texts of tokens that follow context (whose last tokens decide a leading space)."""
        decoder = IncrementalDecoder(self.tokenizer, context)
        return pieces_of(decoder, tokens, final=True)

    def vllm_prompt_logprobs(self, scores: list[TokenLogprob | None], alternatives: int
                             ) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's prompt_logprobs: per prompt token {token id: {logprob, rank, decoded_token}} for it
        and its `alternatives` likeliest tokens; None for the first token."""
        def entry(logprob: float, rank: int | None, token: int) -> dict[str, Any]:
            return {"logprob": logprob, "rank": rank, "decoded_token": api.token_text(self.tokenizer, token)}

        out: list[dict[str, dict[str, Any]] | None] = []
        for s in scores:
            if s is None:
                out.append(None)
                continue
            ranked = {str(t): entry(v, k + 1, t) for k, (t, v) in enumerate(s.top[:alternatives])}
            out.append({str(s.token): entry(s.logprob, s.rank, s.token), **ranked})
        return out

    def stream(self, job: Job) -> Stream:
        return Stream(self, job)


def pieces_of(decoder: IncrementalDecoder, tokens: list[int], final: bool) -> list[str]:
    """The text each token completes, pushed through decoder; final: the end of the text, where
    whatever is held back goes to the last token."""
    pieces = [decoder.push(t) for t in tokens]
    if final and pieces:
        pieces[-1] += decoder.flush()
    return pieces


class Stream:
    """A job's outputs as OpenAI stream chunks: start() before any output, chunks(i, output) for each,
    end() after the last; error(output) when an output ends its request without finishing."""

    def __init__(self, serving: Serving, job: Job):
        self.serving, self.job = serving, job
        self.usage = job.body.include_usage
        self.completion_tokens = 0
        self.cached = [0] * len(job.requests)
        self.offsets = [0] * len(job.requests)  # text sent so far per choice, for text_offset
        self.started = [False] * len(job.requests)
        # Each generated token's share of the text, for legacy logprobs: decoded after its prompt.
        self.decoders = [IncrementalDecoder(serving.tokenizer, r.prompt) for r in job.requests]
        self.readers = [job.tool_use.stream_reader() for _ in job.requests] if job.tool_use else []

    def start(self) -> list[dict[str, Any]]:
        """Chat: a first chunk per choice with the role, as OpenAI's clients expect."""
        if self.job.kind != "chat":
            return []
        return [api.chat_chunk(self.job.ids, i, {"role": "assistant", "content": ""}, None, self.usage)
                for i in range(len(self.job.requests))]

    @staticmethod
    def failed(out: Output) -> bool:
        return out.finish_reason in ("cancelled", "error")

    def error(self, out: Output) -> dict[str, Any]:
        error = self.serving.failure({out.finish_reason})
        return api.error_body(error.message, error.type, code=error.code)

    def chunks(self, i: int, out: Output) -> list[dict[str, Any]]:
        if out.finish_reason is not None:
            self.completion_tokens += out.completion_tokens
        self.cached[i] = max(self.cached[i], out.cached_tokens)
        return self.chat_chunks(i, out) if self.job.kind == "chat" else self.completion_chunks(i, out)

    def chat_chunks(self, i: int, out: Output) -> list[dict[str, Any]]:
        body: api.ChatCompletionRequest = self.job.body
        chunks = []
        final = out.finish_reason is not None
        logprobs = (None if body.alternatives is None
                    else {"content": api.chat_logprob_entries(self.serving.tokenizer, out.logprobs)})
        if self.readers:
            deltas = self.readers[i].push(out.text, final) or ([{"content": ""}] if out.logprobs else [])
            for delta in deltas:
                chunks.append(api.chat_chunk(self.job.ids, i, delta, None, self.usage, logprobs))
                logprobs = None  # sent once
        elif out.text or out.logprobs:
            chunks.append(api.chat_chunk(self.job.ids, i, {"content": out.text}, None, self.usage, logprobs))
        if final:
            reason = self.readers[i].finish_reason(out.finish_reason) if self.readers else out.finish_reason
            chunks.append(api.chat_chunk(self.job.ids, i, {}, reason, self.usage))
        return chunks

    def completion_chunks(self, i: int, out: Output) -> list[dict[str, Any]]:
        body: api.CompletionRequest = self.job.body
        text, logprobs = out.text, None
        echo = None if self.started[i] else self.serving.echo_part(self.job, i, out.prompt_logprobs)
        self.started[i] = True
        if echo:
            text = echo[0] + text
        if body.logprobs is not None:
            texts = pieces_of(self.decoders[i], [lp.token for lp in out.logprobs], out.finish_reason is not None)
            logprobs = api.completion_logprobs(self.serving.tokenizer, out.logprobs, texts,
                                               self.offsets[i] + len(text) - len(out.text))
            if echo:
                logprobs = api.joined_logprobs(echo[1], logprobs)
        self.offsets[i] += len(text)
        if not (text or out.logprobs or out.finish_reason is not None or logprobs and logprobs["tokens"]):
            return []
        chunk = api.completion_chunk(self.job.ids, i, text, out.finish_reason, self.usage, logprobs)
        if body.prompt_logprobs is not None and out.prompt_logprobs:
            chunk["choices"][0]["prompt_logprobs"] = self.serving.vllm_prompt_logprobs(out.prompt_logprobs,
                                                                                        body.prompt_logprobs)
        return [chunk]

    def end(self) -> list[dict[str, Any]]:
        """The usage chunk, when the body asked for it."""
        if not self.usage:
            return []
        obj = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        return [api.usage_chunk(self.job.ids, obj, self.job.usage(self.completion_tokens, self.cached))]
