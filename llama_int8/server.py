"""The OpenAI-compatible HTTP server's app over the continuous-batching engine (engine.py); the
command line that runs it is serve.py.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (and /v1/models/{id}),
GET /health (503 while the model loads, 200 once it serves), GET /metrics (Prometheus), POST
/tokenize, POST /detokenize, GET /tokenizer_info.

Built on FastAPI; streams are server-sent events through sse-starlette, metrics go through
prometheus_client. The engine steps in a thread of its own; each HTTP request submits its engine
requests and reads their outputs on the event loop. A client that disconnects cancels its
requests, which frees their slots at the engine's next step.

Shutdown (begin_shutdown, called by serve.py on SIGTERM or SIGINT): new requests are refused (503
shutting_down), those in flight get shutdown_grace seconds to finish, then each one left ends with
an error in OpenAI's shape: an error event in a stream, a 503 shutting_down otherwise. Nobody is cut
off silently: the HTTP layers' own deadlines (SHUTDOWN_MARGIN later) come after ours.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import openai_api as api
from .engine import DEFAULT_MAX_QUEUE, Completion, Engine, EngineThread, Output
from .serving import ApiError, Job, Serving, Stream

log = logging.getLogger("llama_int8.server")

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024  # TGI's payload limit: room for prompts far beyond any context
DEFAULT_SHUTDOWN_GRACE = 10.0
# Seconds past the grace before sse-starlette and uvicorn cut what is still open: time for the
# requests ended at the grace's end to send their error (an engine step, then one event).
SHUTDOWN_MARGIN = 5.0
# Seconds buckets of the latency histograms: decode steps of a CPU at the low end, long prompts at the top.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    tool_parser: str | None = None  # tool_calls.PARSERS; None: the chat template's


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


# --- Metrics ---------------------------------------------------------------------------------------

class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app, no global state)."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("llama_int8_requests_running", "Requests in a slot of the engine", registry=r).set_function(running)
        Gauge("llama_int8_requests_waiting", "Requests waiting for a slot", registry=r).set_function(waiting)
        self.prompt_tokens = Counter("llama_int8_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("llama_int8_generation_tokens", "Tokens generated", registry=r)
        self.cached_prompt_tokens = Counter("llama_int8_prompt_tokens_cached", "Prompt tokens whose keys and values "
                                            "were reused from the cache, not computed", registry=r)
        self.finished = Counter("llama_int8_requests_finished", "Requests ended, by finish reason",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("llama_int8_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("llama_int8_inter_token_latency_seconds", "Between consecutive generated tokens",
                             buckets=ITL_BUCKETS, registry=r)


class RequestTimer:
    """Feeds one engine request's outputs into the metrics, from the engine's thread as they come."""

    def __init__(self, metrics: Metrics, arrived: float):
        self.metrics, self.arrived = metrics, arrived
        self.last: float | None = None
        self.counted = 0

    def observe(self, out: Output) -> None:
        now = time.monotonic()
        if out.finish_reason is not None:
            self.metrics.cached_prompt_tokens.inc(out.cached_tokens)
        if out.completion_tokens > self.counted:
            self.metrics.generation_tokens.inc(out.completion_tokens - self.counted)
            self.counted = out.completion_tokens
            if self.last is None:
                self.metrics.ttft.observe(now - self.arrived)
            else:
                self.metrics.itl.observe(now - self.last)
            self.last = now
        if out.finish_reason is not None:
            self.metrics.finished.labels(out.finish_reason).inc()


# --- The model, loaded in the background ---------------------------------------------------------

class ServerState:
    """The model and its engine once loaded (in a thread, so that /health answers meanwhile)."""

    def __init__(self, settings: ServerSettings, on_load_failure: Callable[[BaseException], None]):
        self.settings = settings
        self.on_load_failure = on_load_failure
        self.engine: Engine | None = None
        self.serving: Serving | None = None
        self.engine_thread: EngineThread | None = None
        self.stopping: threading.Thread | None = None
        self.stopping_lock = threading.Lock()
        self.metrics = Metrics(lambda: self.engine.running if self.engine else 0,
                               lambda: self.engine.queued if self.engine else 0)

    def load(self, load: Callable[[], Any]) -> None:
        try:
            llm = load()
            engine = llm.engine(self.settings.max_queue)
        except Exception as e:  # reported to the process, which exits: a server without a model is useless
            self.on_load_failure(e)
            return
        self.serving = Serving(engine, llm.encode_dialog, self.settings.model_name,
                               tool_parser=self.settings.tool_parser)
        self.engine_thread = EngineThread(engine)
        self.engine_thread.start()
        self.engine = engine
        log.info("Ready: %s, %d slots of %d tokens, queue of %d", self.settings.model_name,
                 len(engine.slots), engine.max_seq_len, self.settings.max_queue)

    def begin_shutdown(self) -> None:
        """Refuse new requests from now on and end those left after the grace (see the module's
        docstring); returns at once. Safe to call again, from any thread."""
        with self.stopping_lock:
            if self.stopping is None:
                self.stopping = threading.Thread(target=self.stop, name="llama_int8-shutdown", daemon=True)
                self.stopping.start()

    def stop(self) -> None:
        """Refuse new requests, give those in flight the grace, end the rest, and wait for that."""
        if self.engine_thread is not None:
            self.engine_thread.stop(self.settings.shutdown_grace)

    def ready(self) -> Serving:
        if self.serving is None or self.engine is None:
            raise ApiError(503, "the model is still loading; retry when /health answers 200", "service_unavailable",
                           code="model_loading")
        return self.serving


# --- One HTTP request's generations ------------------------------------------------------------------

class Generation:
    """The engine requests of one job, their outputs brought to the event loop in order."""

    def __init__(self, state: ServerState, job: Job, arrived: float):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        timers = [RequestTimer(state.metrics, arrived) for _ in job.requests]

        def on_output(i: int, out: Output) -> None:  # called in the engine's thread
            timers[i].observe(out)
            loop.call_soon_threadsafe(self.queue.put_nowait, (i, out))

        self.handles = state.ready().submit(job, on_output)
        state.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in job.requests))
        self.remaining = len(job.requests)

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        """(request index, output) until every request has ended."""
        while self.remaining:
            i, out = await self.queue.get()
            self.remaining -= out.finish_reason is not None
            yield i, out

    async def collect(self) -> list[Completion]:
        results = [Completion() for _ in self.handles]
        async for i, out in self.outputs():
            results[i].add(out)
        return results

    def cancel(self) -> None:
        """Cancel whatever has not ended (ended requests ignore it)."""
        for h in self.handles:
            h.cancel()


async def collect_unless_disconnected(http: HTTPRequest, gen: Generation) -> list[Completion] | None:
    """The completions, or None when the client went away first (its requests are then cancelled)."""

    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    collecting = asyncio.ensure_future(gen.collect())
    watching = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        return collecting.result() if collecting in done else None
    finally:
        collecting.cancel()
        watching.cancel()
        gen.cancel()


# OpenAI ends each event with a blank line of "\n"; sse-starlette's default is "\r\n".
SSE_LINE_END = "\n"


def event(data: dict[str, Any] | str) -> ServerSentEvent:
    """One `data:` event: a chunk as JSON, or the closing [DONE]."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return ServerSentEvent(data=text, sep=SSE_LINE_END)


# --- Routes ------------------------------------------------------------------------------------------

class ApiKeyCheck:
    """ASGI middleware requiring `Authorization: Bearer <api_key>` on every route but /health, before
    anything reads the body: a caller without the key learns nothing about what it sent. Both sides
    are hashed first so the comparison takes the same time whatever the key's length and content."""

    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        await error_response(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      "authentication_error", code="invalid_api_key"))(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.strip().encode("latin-1")).digest()
        return hmac.compare_digest(given, self.expected) and scheme.lower() == "bearer"


def create_app(settings: ServerSettings, load: Callable[[], Any],
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The server's ASGI app: load() (a Llama) runs in a thread at startup; on_load_failure gets its error."""
    state = ServerState(settings, on_load_failure or (lambda e: log.error("Loading the model failed: %s", e)))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, args=(load,), name="llama_int8-load", daemon=True).start()
        yield
        state.stop()

    app = FastAPI(title="llama_int8", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyCheck, api_key=settings.api_key)  # added last: runs first
    add_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    model_card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "llama_int8"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != settings.model_name:
            raise ApiError(404, f"model: {model_id!r} is not served here; /v1/models lists {settings.model_name!r}",
                           param="model", code="model_not_found")
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatCompletionRequest, http: HTTPRequest) -> Any:
        arrived = time.monotonic()
        return await answer(state, state.ready().chat(body), http, arrived)

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, http: HTTPRequest) -> Any:
        arrived = time.monotonic()
        return await answer(state, state.ready().completion(body), http, arrived)

    @app.post("/tokenize")
    async def tokenize(body: api.TokenizeRequest) -> dict[str, Any]:
        serving = state.ready()
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "expected exactly one of prompt and messages", param="prompt")
        try:
            tokens = (serving.tokenizer.encode(body.prompt, bos=body.add_special_tokens, eos=False)
                      if body.prompt is not None else
                      serving.encode_dialog(api.ChatCompletionRequest(messages=body.messages).dialog))
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        return {"tokens": tokens, "count": len(tokens), "max_model_len": serving.engine.max_seq_len}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """What a client that tokenizes through this server needs (lm-eval's remote tokenizer, as vLLM
        answers it): the special tokens' text, the chat template, the context length."""
        serving = state.ready()
        tokenizer = serving.tokenizer

        def text(token: int | None) -> str | None:
            return None if token is None else tokenizer.decode([token])

        return {"eos_token": text(tokenizer.eos_id), "bos_token": text(tokenizer.bos_id),
                "chat_template": tokenizer.chat_template, "vocab_size": serving.engine.vocab_size,
                "model_max_length": serving.engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: api.DetokenizeRequest) -> dict[str, Any]:
        serving = state.ready()
        vocab = serving.engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens: ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return {"prompt": serving.tokenizer.decode(body.tokens)}

    return app


async def answer(state: ServerState, job: Job, http: HTTPRequest, arrived: float) -> Any:
    """A job's answer: a stream of server-sent events, or the whole response once every request ended."""
    gen = Generation(state, job, arrived)
    serving = state.ready()
    if job.body.stream:
        grace = state.settings.shutdown_grace + SHUTDOWN_MARGIN
        return EventSourceResponse(events(gen, serving.stream(job)), sep=SSE_LINE_END, shutdown_grace_period=grace)
    results = await collect_unless_disconnected(http, gen)
    if results is None:
        return Response(status_code=499)  # nobody reads it
    return serving.response(job, results)


async def events(gen: Generation, stream: Stream) -> AsyncIterator[ServerSentEvent]:
    """A stream as OpenAI's clients expect it: chunks as the outputs come (a chat's first chunk per
    choice carries the role, its last an empty delta and the finish reason), the usage chunk when
    asked, then [DONE]; an error event instead where a request ended without finishing."""
    try:
        for chunk in stream.start():
            yield event(chunk)
        async for i, out in gen.outputs():
            if stream.failed(out):
                yield event(stream.error(out))
                return
            for chunk in stream.chunks(i, out):
                yield event(chunk)
        for chunk in stream.end():
            yield event(chunk)
        yield event("[DONE]")
    finally:
        gen.cancel()


# --- Errors and limits -------------------------------------------------------------------------------

def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, a bad field (400 naming it), an unknown route or method."""

    @app.exception_handler(ApiError)
    async def api_error(_: HTTPRequest, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def bad_field(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        param, message = api.first_invalid_field(e.errors())
        return error_response(ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(e.status_code, str(e.detail)))


class BodySizeLimit:
    """ASGI middleware answering 413 to a request body over max_bytes, by its Content-Length or
    as it arrives (then the app sees the client leave, and what it answers is dropped); the body is
    never read whole before the check."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.too_large()(scope, receive, send)
            return
        received = 0
        refused = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                refused = True
                await self.too_large()(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted_receive, send_unless_refused)
        except ClientDisconnect:
            if not refused:
                raise

    def too_large(self) -> JSONResponse:
        return error_response(ApiError(413, f"the request body is over the limit of {self.max_bytes} bytes",
                                       code="request_too_large"))
