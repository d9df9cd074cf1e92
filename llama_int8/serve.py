"""Serve a model over the OpenAI API, many requests at once (server.py is the app, engine.py the
continuous batching):

    python -m llama_int8.serve --ckpt_dir D --quant int8 --max_batch_size 8 --port 8000

Takes example.py's model flags (same names, same defaults; --max_batch_size is the number of
requests generated at once) and --host (127.0.0.1 unless told otherwise), --port (0: any free one),
--api_key (or the LLAMA_INT8_API_KEY environment variable). The flags are checked before torch is
imported. SIGTERM or SIGINT refuses new requests, lets those in flight finish for --shutdown_grace
seconds, ends the rest with an error (an error event in a stream, 503 shutting_down otherwise) and
exits 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import uvicorn

from .cli import add_checkpoint_flags, add_runtime_flags, build_kwargs
from .flags import add_tool_parser_flag, make_parser, non_negative_int, positive_float, positive_int, run_cli

log = logging.getLogger("llama_int8.serve")

API_KEY_ENV = "LLAMA_INT8_API_KEY"
# The server's defaults, repeated from server.py and engine.py: importing those means importing torch.
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_SHUTDOWN_GRACE = 10.0
SHUTDOWN_MARGIN = 5.0


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                       help="address to listen on; 0.0.0.0 opens the server to the network (default: %(default)s)")
    group.add_argument("--port", type=non_negative_int, default=8000, metavar="N",
                       help="port to listen on, 0 for any free one (default: %(default)s)")
    group.add_argument("--api_key", metavar="KEY",
                       help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)")
    group.add_argument("--served_model_name", metavar="NAME",
                       help="the model's name in the API (default: the checkpoint's file or folder name)")
    group.add_argument("--max_queue", type=non_negative_int, default=DEFAULT_MAX_QUEUE, metavar="N",
                       help="requests that may wait for a slot; beyond, 429 (default: %(default)s)")
    group.add_argument("--max_body_bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                       help="largest request body; beyond, 413 (default: %(default)s)")
    group.add_argument("--shutdown_grace", type=positive_float, default=DEFAULT_SHUTDOWN_GRACE, metavar="S",
                       help="seconds in flight requests may take to finish after SIGTERM (default: %(default)s)")
    add_tool_parser_flag(group)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, exiting 0 after a graceful shutdown on SIGTERM or SIGINT (uvicorn raises the
    signal again once it has shut down, which ends the process as killed by it), and telling the app
    at the signal, not once the connections have closed: the app ends what is in flight itself."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def served_name(ckpt_dir: str | list[str]) -> str:
    path = Path(ckpt_dir if isinstance(ckpt_dir, str) else ckpt_dir[0])
    return path.name.removesuffix(".gguf")


def main(args: argparse.Namespace) -> None:
    from .generation import Llama
    from .server import ServerSettings, create_app

    kwargs = build_kwargs(args)
    settings = ServerSettings(model_name=args.served_model_name or served_name(kwargs["ckpt_dir"]),
                              api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                              max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                              shutdown_grace=args.shutdown_grace, tool_parser=args.tool_parser)
    failure: list[BaseException] = []

    def load_failed(e: BaseException) -> None:
        failure.append(e)
        server.should_exit = True

    app = create_app(settings, lambda: Llama.build(**kwargs), load_failed)
    sock = socket.create_server((args.host, args.port))
    deadline = math.ceil(settings.shutdown_grace + SHUTDOWN_MARGIN) + 1  # after sse-starlette's, after ours
    server = GracefulServer(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=deadline),
                            on_exit=app.state.server.begin_shutdown)
    for name in ("uvicorn", "uvicorn.error", "sse_starlette"):  # their startup lines say what ours does
        logging.getLogger(name).setLevel(logging.WARNING)
    host, port = sock.getsockname()[:2]
    log.info("Serving %s on http://%s:%d (loading the model%s)", settings.model_name, host, port,
             "; API key required" if settings.api_key else "")
    server.run(sockets=[sock])
    if failure:
        raise failure[0]
    log.info("Stopped")


if __name__ == "__main__":
    parser = make_parser("python -m llama_int8.serve", "Serve a model over the OpenAI API, many requests at once.")
    add_checkpoint_flags(parser)
    add_runtime_flags(parser)
    add_server_flags(parser)
    run_cli(parser, main)
