"""`shortrt serve [MODEL]`: an OpenAI-compatible HTTP server (shortrt/server.py) on the C++ runtime or the GPU engine."""
from __future__ import annotations

import contextlib
import signal
import socket
import sys

from . import add_dtype_arguments, integer, layer_list, resolve_device_dtypes, text

HELP = "serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory, .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", type=text, help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=integer(0, 65535), default=8000, help="0 = any free port (default: %(default)s)")
    add_dtype_arguments(parser, kv=True, device=True)
    parser.add_argument("--threads", type=integer(1, 1024), default=None, help="default: all cores")
    parser.add_argument("--max-batch", type=integer(1, 4096), default=8,
                        help="sequences decoded at once, one KV region each (default: %(default)s)")
    parser.add_argument("--kv-budget", type=integer(1), default=None, metavar="MIB",
                        help="size the KV cache in MiB instead: --max-batch becomes as many sequences of "
                             "--max-seq tokens as fit (in --kv-dtype's bytes)")
    parser.add_argument("--max-queue", type=integer(0), default=64,
                        help="requests that may wait for a KV region; past that a request gets HTTP 429 "
                             "(default: %(default)s)")
    parser.add_argument("--max-seq", type=integer(1), default=None,
                        help="context length per sequence (default: min(the model's, 2048))")
    parser.add_argument("--skip", type=layer_list, default=None, metavar="I,J,...",
                        help="checkpoint layers not to run")
    parser.add_argument("--prefill-chunk", type=integer(1), default=32,
                        help="prompt tokens prefilled per step beside the decoding requests; smaller keeps "
                             "their inter-token gaps short while a new prompt prefills (default: %(default)s)")
    parser.add_argument("--model-name", type=text, default=None,
                        help="the id clients send as `model` and /v1/models lists (default: MODEL as given)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--graceful-timeout", type=integer(0), default=30,
                        help="seconds SIGINT/SIGTERM wait for running requests before cancelling them "
                             "(default: %(default)s; a second Ctrl-C cancels at once)")


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, or a ValueError naming the address (checked before loading)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    import uvicorn

    from shortrt.engine import Engine
    from shortrt.server import create_app

    options = resolve_device_dtypes(args)  # a --device cuda without a GPU stops here, before loading
    from shortrt.checkpoint import check_runnable

    check_runnable(args.model)  # a model the runtime does not run (Mamba) stops here, before listening
    sock = listen(args.host, args.port)
    failure: list[BaseException] = []
    stopped_by: list[int] = []

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own handler, but the signal is not raised again afterwards: a server
            # stopped by SIGINT/SIGTERM has shut down cleanly and exits 0.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                stopped_by.extend(self._captured_signals[:1])

    def load():
        return Engine(args.model, threads=args.threads, max_seq=args.max_seq,
                      max_batch=args.max_batch, skip_layers=args.skip, prefill_chunk=args.prefill_chunk,
                      kv_budget_bytes=args.kv_budget * 2**20 if args.kv_budget else None,
                      lm_head_dtype=args.lm_head_dtype, **options)

    def on_load_error(exc):
        failure.append(exc)
        server.should_exit = True

    name = args.model_name or args.model
    app = create_app(load, model_name=name, aliases=[args.model], max_queue=args.max_queue,
                     on_load_error=on_load_error)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.graceful_timeout)
    server = Server(config)
    host, port = sock.getsockname()[:2]
    print(f"shortrt serve: {name!r} on http://{host}:{port} (loading; GET /health is 200 once ready)",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        app.state.shortrt.close()  # also when a forced exit skipped the lifespan's shutdown
    if failure:
        raise failure[0]
    if stopped_by:
        print(f"shortrt serve: stopped by {signal.Signals(stopped_by[0]).name}", file=sys.stderr)
    return 0
