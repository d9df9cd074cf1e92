"""Continuous batching: many requests share the model, each in a slot of its KV cache.

The model's max_batch_size cache rows are the slots. A request waits in a bounded queue, takes the
first free slot, has its prompt prefilled a chunk per step (interleaved with decode steps, so that a
long new prompt does not freeze the streams already running), then decodes one token per step
together with every other slot in one batched forward, each row at its own position. A finished or
cancelled request frees its slot at once and the next waiting request takes it.

Sampling is per request (sampling.SamplingParams, one generator each), applied row by row, and the
generated tokens come back as text that never splits a character nor shows any part of a stop
string (textstream.py), with log-probabilities on request.

No HTTP here: the server (serve.py) and offline callers drive the same Engine, through `submit` and
`step` (`EngineThread` runs the steps in the background), or all at once through `run`.

Batch invariance: with greedy decoding (float32) a request gets the same tokens alone as among
others. Each row attends over exactly its own keys, alone (model.Attention), and a decode step of
one row runs it as a pair: the CPU's matrix kernels take another path for one row than for several
(gemv against gemm), whose sums round differently, while 2 rows and more agree bit for bit (measured).
The pair costs a lone row up to twice the time on a CPU, so it is paid only where it buys something:
a quantized model's rows depend on the batch anyway (LLM.int8() picks its 16-bit outlier columns over
all rows; where bitsandbytes lacks its AVX512-BF16 kernel the 4-bit layers too take another path for
one row), and there a lone row runs alone and the rows of a decode step attend in one call
(model.Transformer.batch_invariant).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .grammar import Compiled, Grammars, Matcher
from .model import Transformer
from .sampling import SamplingParams, apply_logit_bias, next_tokens, top_logprobs
from .textstream import IncrementalDecoder, StopStringFilter
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Prompt tokens prefilled per step when the model sets no prefill chunk: long enough to keep the
# matrix kernels efficient, short enough that a new prompt holds the running streams back for a
# fraction of a second per step on a CPU.
DEFAULT_PREFILL_CHUNK = 128
DEFAULT_MAX_QUEUE = 64
# Most positions a scored prompt prefills in one step: their logits are what a step keeps.
SCORED_CHUNK = 256
# Prompts share their beginnings in whole blocks of this many tokens, as vLLM's prefix cache does: a
# few shared tokens (a BOS, a chat header) would save nothing, yet move where the prompt's chunks
# start (its logits then round differently in their last bits than in its prefill alone).
REUSE_BLOCK = 16


class QueueFull(RuntimeError):
    """Every slot is taken and the waiting queue is full."""


class InvalidRequest(ValueError):
    """A request the engine cannot run; field names the part of it that is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class ContextLengthExceeded(InvalidRequest):
    """The prompt and the tokens asked for do not fit in max_seq_len."""


@dataclass(frozen=True)
class Request:
    """One completion to generate. max_tokens counts generated tokens (a stop token included);
    stop_ids end the completion without being part of it, as do stop_strings (never shown).
    logprobs: None for none, else how many likeliest alternatives to report with each token.
    prompt_logprobs: the same for the prompt's tokens (scoring); a scored request may ask for
    max_tokens 0, and is then done once its prompt is prefilled. grammar: what the completion must
    follow (compiled by Engine.grammars); it ends ("stop") once the grammar is complete, and a stop
    token may end it only where the text is complete."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: Compiled | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the likeliest alternatives'; a prompt token's
    rank too (1: the likeliest)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    rank: int | None = None


@dataclass(frozen=True)
class Output:
    """What one step produced for one request: new text (safe to show), the new tokens of the
    completion, their log-probabilities when asked (and a stop token's, which ends the completion
    without being part of it: a scorer counts on one entry per generated token), and finish_reason
    once it ended: "stop" (a stop
    token or string), "length" (max_tokens), "cancelled" or "error". A request that scores its
    prompt gets prompt_logprobs once, in an output of their own before any generated token: one
    per prompt token, None for the first (nothing comes before it). cached_tokens: the prompt's
    leading tokens whose keys and values were reused, not computed (prefix reuse)."""

    text: str
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    cached_tokens: int = 0


@dataclass
class Completion:
    """A whole completion, for callers that wait for the end (Engine.run)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    cached_tokens: int = 0

    def add(self, out: Output) -> None:
        self.text += out.text
        self.tokens += out.tokens
        self.logprobs += out.logprobs
        self.prompt_logprobs += out.prompt_logprobs
        self.finish_reason = out.finish_reason
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
        self.cached_tokens = max(self.cached_tokens, out.cached_tokens)


OnOutput = Callable[[Output], None]


class Handle:
    """A submitted request: cancel() it from any thread; its outputs go to on_output, called from
    the thread that runs the steps, the last one with a finish_reason."""

    def __init__(self, id: int, request: Request, on_output: OnOutput):
        self.id = id  # in the order of submission
        self.request = request
        self.on_output = on_output
        self.cancelled = False
        self.submitted_at = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True  # read by the stepping thread at its next step


class ActiveRequest:
    """A request in a slot: its tokens so far, how many are in the cache, and its sampling state."""

    def __init__(self, handle: Handle, row: int, tokenizer: Tokenizer, vocab_size: int, device: torch.device,
                 matcher: Matcher | None):
        request = handle.request
        self.handle, self.request, self.row = handle, request, row
        self.tokens = list(request.prompt)
        self.n_prompt = len(self.tokens)
        self.cached = 0  # tokens whose keys and values are in the cache row
        self.reused = 0  # of them, the prompt's first tokens taken from a cache row, not computed
        # The prompt's log-probabilities so far, when asked: nothing predicts the first token.
        self.prompt_scores: list[TokenLogprob | None] | None = None if request.prompt_logprobs is None else [None]
        self.generator = torch.Generator(device=device)
        if request.sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request.sampling.seed)
        self.seen: torch.Tensor | None = None  # bool [1, vocab]: prompt and generated tokens
        self.counts: torch.Tensor | None = None  # [1, vocab]: generated tokens
        if request.sampling.reads_history:
            self.seen = torch.zeros((1, vocab_size), dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(self.tokens, device=device)] = True
            self.counts = torch.zeros((1, vocab_size), dtype=torch.float32, device=device)
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (tokens [n], values [n])
        if request.sampling.logit_bias:
            tokens, values = zip(*request.sampling.logit_bias)
            self.bias = (torch.tensor(tokens, device=device), torch.tensor(values, dtype=torch.float32, device=device))
        self.decoder = IncrementalDecoder(tokenizer, self.tokens)
        self.stops = StopStringFilter(request.stop_strings)
        self.matcher = matcher  # the request's place in its grammar, if it has one

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    def grammar_mask(self) -> torch.Tensor:
        """bool [vocab]: the tokens the grammar allows next, and the stop tokens where the text is complete."""
        allowed = self.matcher.allowed()
        if self.matcher.can_end():
            allowed[sorted(self.request.stop_ids)] = True
        if not allowed.any():  # a vocabulary without the characters the grammar needs next
            raise ValueError("the grammar allows no token of this vocabulary here")
        return allowed

    @property
    def prefilling(self) -> bool:
        return self.cached < self.n_prompt

    @property
    def ready_to_decode(self) -> bool:
        """Its last token is sampled and not yet in the cache."""
        return not self.prefilling and self.cached == len(self.tokens) - 1


class Engine:
    """Continuous batching over a model whose caches are set up (model.setup_caches): its
    max_batch_size rows are the slots. submit() and cancel() may be called from any thread;
    step() from one thread at a time."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_queue: int = DEFAULT_MAX_QUEUE,
                 prefill_chunk: int | None = None, prefix_reuse: bool = True):
        if model.max_batch_size < 1:
            raise ValueError("the model has no cache: call model.setup_caches first")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk or model.prefill_chunk or DEFAULT_PREFILL_CHUNK
        if model.prefill_chunk is not None:
            self.prefill_chunk = min(self.prefill_chunk, model.prefill_chunk)
        self.pair_lone_rows = model.batch_invariant
        # Ids a prompt may hold: the model's embedding may be padded past the tokenizer, whose ids it
        # cannot decode (and never generates).
        self.vocab_size = min(model.args.vocab_size, tokenizer.vocab_size)
        self.slots: list[ActiveRequest | None] = [None] * model.max_batch_size
        # What each cache row holds from position 0 once its request has ended: a prompt that begins
        # with those tokens starts after them (prefix reuse).
        self.prefix_reuse = prefix_reuse
        self.row_tokens: list[list[int]] = [[] for _ in self.slots]
        self.waiting: deque[Handle] = deque()
        self.lock = threading.Condition()  # guards waiting and closed; notified when work arrives
        self.closed = False
        self.ids = itertools.count()
        self.grammars_built: Grammars | None = None
        self.grammars_lock = threading.Lock()

    @property
    def grammars(self) -> Grammars:
        """The grammar compiler of this model's tokenizer, built on first use (reading the vocabulary
        takes a while): compile a request's grammar with it before submitting the request."""
        with self.grammars_lock:
            if self.grammars_built is None:
                self.grammars_built = Grammars(self.tokenizer, self.model.args.vocab_size)
            return self.grammars_built

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    @property
    def running(self) -> int:
        """Requests in a slot."""
        return sum(s is not None for s in self.slots)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self.waiting)

    def check(self, request: Request) -> None:
        """Raise InvalidRequest (ContextLengthExceeded for a prompt that does not fit) naming what is wrong."""
        n = len(request.prompt)
        if n == 0:
            raise InvalidRequest("prompt", "prompt: expected at least one token, got none")
        vocab = self.vocab_size
        if min(request.prompt) < 0 or max(request.prompt) >= vocab:
            raise InvalidRequest("prompt", f"prompt: token ids must be in [0, {vocab}), got "
                                           f"{min(request.prompt)}..{max(request.prompt)}")
        least = 0 if request.prompt_logprobs is not None else 1  # scoring alone generates nothing
        if request.max_tokens < least:
            raise InvalidRequest("max_tokens", f"max_tokens: expected >= {least}, got {request.max_tokens}")
        if n + request.max_tokens > self.max_seq_len:
            raise ContextLengthExceeded(
                "prompt", f"This model's maximum context length is {self.max_seq_len} tokens. However, you "
                f"requested {n + request.max_tokens} tokens ({n} in the prompt, {request.max_tokens} in the "
                "completion). Please reduce the length of the prompt or of the completion.")
        for name in ("logprobs", "prompt_logprobs"):
            alternatives = getattr(request, name)
            if alternatives is not None and not 0 <= alternatives <= vocab:
                raise InvalidRequest(name, f"{name}: expected 0..{vocab} alternatives, got {alternatives}")
        biased = [t for t, _ in request.sampling.logit_bias if not 0 <= t < vocab]
        if biased:
            raise InvalidRequest("logit_bias", f"logit_bias: token ids must be in [0, {vocab}), got {biased[:5]}")

    def submit(self, requests: Sequence[Request], on_output: Callable[[int, Output], None]) -> list[Handle]:
        """Queue requests, all or none; on_output(i, output) receives the outputs of requests[i].

        Raises InvalidRequest for a bad request or more requests than slots and queue together hold
        (field "requests": they could never fit), QueueFull when they do not all fit in the free
        slots and the queue now, RuntimeError once the engine is closed."""
        for r in requests:
            self.check(r)
        if len(requests) > len(self.slots) + self.max_queue:
            raise InvalidRequest("requests", f"{len(requests)} completions at once can never fit: {len(self.slots)} "
                                             f"run at a time and {self.max_queue} may wait")
        with self.lock:
            handles = [Handle(next(self.ids), r, lambda out, i=i: on_output(i, out)) for i, r in enumerate(requests)]
            if self.closed:
                raise RuntimeError("the engine is shutting down")
            free = sum(s is None for s in self.slots)
            if len(self.waiting) + len(handles) > self.max_queue + free:
                raise QueueFull(f"{self.running} requests running and {len(self.waiting)} waiting: "
                                f"the queue of {self.max_queue} is full; retry later")
            self.waiting.extend(handles)
            self.lock.notify_all()
        return handles

    def has_work(self) -> bool:
        return self.running > 0 or len(self.waiting) > 0

    def step(self) -> None:
        """One scheduling step: free cancelled slots, fill free slots from the queue, prefill chunks
        of up to prefill_chunk prompt tokens in all (oldest requests first), then decode one token
        for every request ready to."""
        self.drop_cancelled()
        self.admit_waiting()
        budget = self.prefill_chunk
        for seq in sorted((s for s in self.slots if s is not None and s.prefilling), key=lambda s: s.handle.id):
            # Until a prompt computes its own first chunk, another row may come to hold more of it. A
            # scored prompt needs every logit.
            if self.prefix_reuse and seq.cached == seq.reused and seq.prompt_scores is None:
                self.reuse_prefix(seq)
            # Whole chunks of the request's own prompt: where its chunks start must not depend on
            # the requests beside it, or its logits would round differently. A scored prompt's chunks
            # are bounded so that their logits stay small (4k positions of a 128k vocabulary: 2 GB).
            chunk = self.prefill_chunk if seq.prompt_scores is None else min(self.prefill_chunk, SCORED_CHUNK)
            n = min(chunk, seq.n_prompt - seq.cached)
            if n > budget:
                break
            self.prefill(seq, n)
            budget -= n
        decoding = [s for s in self.slots if s is not None and s.ready_to_decode]
        if decoding:
            self.decode(decoding)

    def drop_cancelled(self) -> None:
        for seq in self.slots:
            if seq is not None and seq.handle.cancelled:
                self.finish(seq, "", "cancelled")
        with self.lock:
            cancelled = [h for h in self.waiting if h.cancelled]
            for h in cancelled:
                self.waiting.remove(h)
        for h in cancelled:
            h.on_output(Output("", (), (), "cancelled", len(h.request.prompt), 0))

    def admit_waiting(self) -> None:
        failed = []
        with self.lock:
            while self.waiting and None in self.slots:
                handle = self.waiting.popleft()
                row = self.free_row_for(handle.request)
                try:
                    grammar = handle.request.grammar
                    self.slots[row] = ActiveRequest(handle, row, self.tokenizer, self.model.args.vocab_size,
                                                    self.model.device,
                                                    None if grammar is None else self.grammars.matcher(grammar))
                except Exception:  # ends this request alone; the slot goes to the next one
                    log.exception("Setting up request %d failed; ending it alone", handle.id)
                    failed.append(handle)
        for h in failed:
            h.on_output(Output("", (), (), "error", len(h.request.prompt), 0))

    def free_row_for(self, request: Request) -> int:
        """The free slot whose cache row holds the longest beginning of request's prompt."""
        free = [row for row, seq in enumerate(self.slots) if seq is None]
        return max(free, key=lambda row: (shared_prefix(self.row_tokens[row], request.prompt), -row))

    def held_tokens(self, row: int) -> list[int]:
        """The tokens whose keys and values cache row holds from position 0: its request's so far, or
        the last request's while the new one has written nothing there yet."""
        seq = self.slots[row]
        return self.row_tokens[row] if seq is None or seq.cached == 0 else seq.tokens[:seq.cached]

    def reuse_prefix(self, seq: ActiveRequest) -> None:
        """Start seq after the longest beginning of its prompt that a cache row holds (its own, or one
        copied from another row, running or free), where that is longer than what it holds already,
        leaving at least its last prompt token to compute: its logits start the answer."""
        best, source = seq.cached, seq.row
        prompt = seq.tokens[:seq.n_prompt - 1]
        for row in range(len(self.slots)):
            held = self.held_tokens(row)
            shared = shared_prefix(held, prompt)
            # All a row holds (the next turn of a chat, which a ring can resume only there), or whole blocks.
            n = shared if shared == len(held) and shared >= REUSE_BLOCK else shared // REUSE_BLOCK * REUSE_BLOCK
            if n > best and self.model.holds_prefix(len(held), n):
                best, source = n, row
        if best == seq.cached:
            return
        if source != seq.row:
            self.model.copy_cache_prefix(source, seq.row, best)
        seq.cached = seq.reused = best

    @torch.inference_mode()
    def prefill(self, seq: ActiveRequest, n: int) -> None:
        """Prefill the next n prompt tokens of seq (one forward), scoring them when asked; sample its
        first token after the last."""
        start = seq.cached
        chunk = torch.tensor([seq.tokens[start:start + n]], device=self.model.device)
        scoring = seq.prompt_scores is not None
        logits = self.model(chunk, start, last_only=not scoring, cache_rows=[seq.row])[0]  # [n or 1, vocab]
        seq.cached += n
        if scoring:
            targets = seq.tokens[start + 1:min(start + n + 1, seq.n_prompt)]  # what each position predicts
            seq.prompt_scores += self.score(logits[:len(targets)], targets, seq.request.prompt_logprobs)
        if seq.prefilling:
            return
        if scoring:
            self.report_prompt_scores(seq)
        if self.slots[seq.row] is seq:
            self.advance([seq], logits[-1:])

    @staticmethod
    def score(logits: torch.Tensor, targets: list[int], alternatives: int) -> list[TokenLogprob]:
        """The log-probabilities of targets [m] under logits [m, vocab], and the likeliest alternatives'."""
        if not targets:
            return []
        tokens = torch.tensor(targets, device=logits.device)
        chosen, values, ids = top_logprobs(logits, tokens, alternatives)
        ranks = (logits > logits.gather(-1, tokens[:, None])).sum(-1) + 1  # [m]: the log-softmax keeps the order
        return [TokenLogprob(t, lp, tuple(zip(i, v)), r) for t, lp, i, v, r in
                zip(targets, chosen.tolist(), ids.tolist(), values.tolist(), ranks.tolist())]

    def report_prompt_scores(self, seq: ActiveRequest) -> None:
        """Send the prompt's scores; a request that asked for no generated token ends with them."""
        done = seq.request.max_tokens == 0
        if done:
            self.slots[seq.row] = None
        seq.handle.on_output(Output("", (), (), "length" if done else None, seq.n_prompt, 0, tuple(seq.prompt_scores)))

    @torch.inference_mode()
    def decode(self, seqs: list[ActiveRequest]) -> None:
        # One row runs as a pair (see the module's docstring): the same kernel as any other batch.
        rows = seqs * 2 if len(seqs) == 1 and self.pair_lone_rows else seqs
        tokens = torch.tensor([[s.tokens[-1]] for s in rows], device=self.model.device)  # [b, 1]
        positions = torch.tensor([s.cached for s in rows], device=self.model.device)
        logits = self.model(tokens, positions, cache_rows=[s.row for s in rows])[:len(seqs), -1]  # [n, vocab]
        for s in seqs:
            s.cached += 1
        self.advance(seqs, logits)

    def advance(self, seqs: list[ActiveRequest], logits: torch.Tensor) -> None:
        """Sample each sequence's next token from its row of logits [n, vocab], then report it. A
        sequence whose sampling or reporting fails ends alone with an error; the others go on."""
        sampled = []
        for i, s in enumerate(seqs):
            try:
                token = self.choose(s, logits[i:i + 1])  # [1]
                sampled.append((s, token, self.token_logprob(s, logits[i:i + 1], token)))
            except Exception:
                self.fail(s)
        if not sampled:
            return
        tokens = torch.cat([token for _, token, _ in sampled]).tolist()  # one device-to-host copy
        for (s, _, lp), token in zip(sampled, tokens):
            try:
                self.emit(s, token, lp)
            except Exception:
                self.fail(s)

    def fail(self, seq: ActiveRequest) -> None:
        """End one sequence with an error (logged with its traceback), unless it has ended already."""
        log.exception("Request %d failed; ending it alone", seq.handle.id)
        if self.slots[seq.row] is seq:
            self.finish(seq, "", "error")

    @staticmethod
    def choose(seq: ActiveRequest, logits: torch.Tensor) -> torch.Tensor:
        """The next token of one sequence, [1], from its logits [1, vocab]; each row by itself, so that
        what a request draws does not depend on the requests beside it."""
        p = seq.request.sampling
        if seq.matcher is not None:
            logits = logits.masked_fill(~seq.grammar_mask().to(logits.device), -torch.inf)
        if seq.bias is not None:
            logits = apply_logit_bias(logits, *seq.bias)
        return next_tokens(logits, p.temperature, p.top_p, p.repetition_penalty, seq.seen, seq.generator,
                           seq.counts, p.frequency_penalty, p.presence_penalty, p.top_k, p.min_p)

    @staticmethod
    def token_logprob(seq: ActiveRequest, logits: torch.Tensor, token: torch.Tensor) -> TokenLogprob | None:
        if seq.request.logprobs is None:
            return None
        chosen, values, ids = top_logprobs(logits, token, seq.request.logprobs)
        return TokenLogprob(int(token), chosen.item(), tuple(zip(ids[0].tolist(), values[0].tolist())))

    def emit(self, seq: ActiveRequest, token: int, logprob: TokenLogprob | None) -> None:
        """Add a sampled token to its sequence and report what it changes: new text, or the end."""
        seq.tokens.append(token)
        if seq.seen is not None:
            seq.seen[0, token] = True
            seq.counts[0, token] += 1
        request = seq.request
        logprobs = () if logprob is None else (logprob,)
        if token in request.stop_ids:  # not part of the completion, but scored: it is what the model chose
            text, _ = self.rest_of_text(seq)
            self.finish(seq, text, "stop", logprobs=logprobs)
            return
        if seq.matcher is not None:
            seq.matcher.advance(token)
        text, stopped = seq.stops.push(seq.decoder.push(token))
        complete = seq.matcher is not None and seq.matcher.must_end()  # nothing may follow
        if not stopped and (complete or seq.generated >= request.max_tokens):
            rest, stopped = self.rest_of_text(seq)
            self.finish(seq, text + rest, "stop" if stopped or complete else "length", (token,), logprobs)
        elif stopped:
            self.finish(seq, text, "stop", (token,), logprobs)
        else:
            seq.handle.on_output(Output(text, (token,), logprobs, None, seq.n_prompt, seq.generated,
                                        cached_tokens=seq.reused))

    @staticmethod
    def rest_of_text(seq: ActiveRequest) -> tuple[str, bool]:
        """The text still held back at the end (unfinished characters, a tail that was not a stop
        string), and whether a stop string turned up in it."""
        text, stopped = seq.stops.push(seq.decoder.flush())
        return (text, True) if stopped else (text + seq.stops.flush(), False)

    def finish(self, seq: ActiveRequest, text: str, reason: str, tokens: tuple[int, ...] = (),
               logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        """Report the last output and free the slot; its cache row keeps what it holds for the next prompt."""
        self.slots[seq.row] = None
        self.row_tokens[seq.row] = seq.tokens[:seq.cached]
        seq.handle.on_output(Output(text, tokens, logprobs, reason, seq.n_prompt, seq.generated,
                                    cached_tokens=seq.reused))

    def abort_all(self, reason: str) -> None:
        """End every request, running or waiting, with reason (after an error, or at shutdown)."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        for seq in self.slots:
            if seq is not None:
                self.finish(seq, "", reason)
        for h in waiting:
            h.on_output(Output("", (), (), reason, len(h.request.prompt), 0))

    def close(self) -> None:
        """Refuse new requests from now on."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def run(self, requests: Sequence[Request]) -> list[Completion]:
        """Generate every request to its end in this thread, feeding the queue as room frees up."""
        results = [Completion() for _ in requests]
        pending = deque(range(len(requests)))
        while pending or self.has_work():
            while pending:
                i = pending[0]
                try:
                    self.submit([requests[i]], lambda _, out, i=i: results[i].add(out))
                except QueueFull:
                    break
                pending.popleft()
            self.step()
        return results


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class EngineThread:
    """Runs an engine's steps in a background thread while there is work, and sleeps otherwise."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.thread = threading.Thread(target=self.loop, name="llama_int8-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def loop(self) -> None:
        engine = self.engine
        while True:
            with engine.lock:
                while not engine.has_work() and not engine.closed:
                    engine.lock.wait()
                if engine.closed and not engine.has_work():
                    return
            try:
                engine.step()
            except Exception:  # a failed step must not leave its requests waiting forever
                log.exception("A generation step failed; ending the requests in flight")
                engine.abort_all("error")

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, cancel what is left after timeout seconds of finishing, and join."""
        self.engine.close()
        self.thread.join(timeout)
        if self.thread.is_alive():
            with self.engine.lock:
                for h in self.engine.waiting:
                    h.cancel()
            for seq in self.engine.slots:
                if seq is not None:
                    seq.handle.cancel()
            self.thread.join()
