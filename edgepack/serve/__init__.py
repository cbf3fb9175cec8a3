"""``edgepack serve``: an OpenAI-compatible HTTP API over one bundle.

    edgepack serve smollm2-8bit --port 8000 --max-queue 8
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "smollm2-8bit", "prompt": "Once upon a time", "max_tokens": 32}'

Or from Python, with the official client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-8bit", messages=[{"role": "user", "content": "Hi"}])

One process serves one bundle, loaded once at start-up. Generation is CPU-bound and the
model is not thread-safe, so a single worker thread generates up to ``--parallel`` requests
at once, stepped together, while the event loop keeps answering; a joining prompt is
computed ``--prefill-chunk`` tokens between two steps, so a long one does not stall the
others. Requests wait in a bounded queue and a full queue answers 503 with Retry-After, so
a burst costs latency, never memory. A client that goes away cancels its request between
two tokens (or two pieces of its prompt). FastAPI and uvicorn are imported only when an
app is made or served: ``edgepack run`` and ``import edgepack`` never pay for them.

Files: api.py (OpenAI request and reply shapes), worker.py (the generation thread),
prefix.py (KV caches kept for reuse), metrics.py (/metrics), app.py (routes and admission),
guard.py (keys, hosts, body limits), memory.py (the planner's figure for this server's
memory, edgepack/plan/serving.py: logged at start, on /metrics, and what sets the default
--parallel).
"""

import sys
from pathlib import Path

from edgepack.errors import EdgepackError, MissingDependencyError, SourceNotFoundError
from edgepack.cli.run import add_load_arguments, apply_threads
from edgepack.serve.api import GenerationRequest, parse_chat, parse_completion
from edgepack.serve.app import create_app
from edgepack.serve.guard import DEFAULT_MAX_BODY_BYTES, add_guard_arguments, guard_options
from edgepack.serve.metrics import Metrics
from edgepack.serve.worker import DEFAULT_CACHE_BYTES, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK, Job, Worker
from edgepack.plan.serving import DEFAULT_MAX_PARALLEL

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_QUEUE", "GenerationRequest", "Job", "Metrics", "Worker",
           "create_app", "configure_parser", "main", "parse_chat", "parse_completion", "resolve_bundle", "serve"]

SERVE_HINT = "pip install 'edgepack[serve]'"


def _require_serve_packages() -> None:
    """Fail before the model is loaded, not after, when the HTTP stack is missing."""
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            raise MissingDependencyError(
                f"`edgepack serve` needs the {name} package, which is not installed", hint=SERVE_HINT
            ) from None


# --- the command -----------------------------------------------------------------------------


def check_port_free(host: str, port: int) -> None:
    """Bind the address once and let it go: in use, or not ours to bind, is an error now.
    SO_REUSEADDR as uvicorn sets it, so a port in TIME_WAIT counts as free, as it will be."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise EdgepackError(f"--port must be between 0 and 65535, not {port}", hint="pass e.g. --port 8000")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise EdgepackError(f"cannot listen on {host!r}: {exc.strerror}", hint="pass --host 127.0.0.1 or an address of this box") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EdgepackError(f"port {port} on {host} is already in use",
                                    hint=f"stop what listens there, or pass another --port (e.g. {port + 1})") from None
            raise EdgepackError(f"cannot listen on {host}:{port}: {exc.strerror}",
                                hint="pass a port above 1023, or --host 127.0.0.1") from None


def resolve_bundle(ref: str) -> Path:
    """A local bundle directory as it is; a repo reference is pulled from the Hub."""
    from edgepack.format.refs import bundle_ref

    path = bundle_ref(ref)
    if isinstance(path, Path):
        if path.is_dir():
            return path
        raise SourceNotFoundError(
            f"{ref!r} is not a bundle directory", hint="give a directory written by `edgepack pack`, or a Hub repo id"
        )
    try:
        from edgepack.hub import resolve_bundle_ref
    except ImportError:
        raise MissingDependencyError(
            f"{ref!r} is not a local directory, and this edgepack cannot pull bundles from the Hub",
            hint="download the bundle with `edgepack pull` and give its directory",
        ) from None
    return Path(resolve_bundle_ref(ref))


def serve(lm, *, host: str = "127.0.0.1", port: int = 8000, max_queue: int = DEFAULT_MAX_QUEUE, parallel: int | None = None,
          cache_bytes: int = DEFAULT_CACHE_BYTES, context: int | None = None,
          prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
          model_name: str | None = None, log_level: str = "info", **guards) -> None:
    """Serve a loaded EdgeModel until interrupted (Ctrl-C, SIGTERM). ``guards``: create_app's
    max_body_bytes, api_keys, allowed_hosts, allowed_origins, docs."""
    _require_serve_packages()
    import uvicorn

    from edgepack.serve.guard import server_config

    app = create_app(lm, max_queue=max_queue, model_name=model_name, bind_host=host, parallel=parallel,
                     cache_bytes=cache_bytes, context=context, prefill_chunk=prefill_chunk, **guards)
    slots = app.state.worker.parallel
    print(memory_line(app.state.memory, slots, parallel is None), file=sys.stderr)
    uvicorn.Server(server_config(app, host=host, port=port, max_queue=max_queue + slots, log_level=log_level)).run()


def memory_line(memory, slots: int, chosen: bool) -> str:
    """The planner's figure for this server, one line for the log."""
    from edgepack.plan.sizing import human

    how = "as this box's memory allows" if chosen else "as asked"
    if memory is None:
        return f"{slots} slot(s) {how}; no memory prediction for the torch backend"
    parts = ", ".join(f"{k.replace('_', ' ')} {human(v)}" for k, v in memory.parts.items() if v)
    return (f"{slots} slot(s) {how}, {memory.context} tokens each: predicted peak RSS {human(memory.peak_bytes)} "
            f"({parts})")


def configure_parser(p) -> None:
    p.add_argument("bundle", metavar="BUNDLE_OR_REPO", help="bundle directory, or a Hub repo id to pull")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"requests that may wait behind the one generating; more get 503 (default {DEFAULT_MAX_QUEUE})",
    )
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help=f"requests generated at once, stepped together (default {DEFAULT_MAX_PARALLEL}, fewer where the "
                   "planner's figure for the server's memory does not fit this box; 1 with the torch backend)")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="tokens one request may hold, prompt and reply (default: the model's context); "
                   "each slot's KV cache grows up to it")
    p.add_argument("--cache-bytes", type=int, default=DEFAULT_CACHE_BYTES,
                   help="memory for the KV caches of recent requests, reused when a prompt starts the same "
                   f"(a chat's history); 0 turns reuse off (default {DEFAULT_CACHE_BYTES:,})")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                   help="prompt tokens computed between two decode steps, so a long prompt joining does not "
                   f"stall the running streams; 0 computes each prompt at once (default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the bundle's directory name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    add_load_arguments(p)
    add_guard_arguments(p)


def main(args) -> int:
    if args.max_queue < 1:
        raise EdgepackError(f"--max-queue must be at least 1, not {args.max_queue}", hint="pass --max-queue 1 or more")
    if args.parallel is not None and args.parallel < 1:
        raise EdgepackError(f"--parallel must be at least 1, not {args.parallel}", hint="pass --parallel 4")
    if args.context is not None and args.context < 2:
        raise EdgepackError(f"--context must be at least 2 tokens, not {args.context}", hint="pass --context 4096")
    if args.cache_bytes < 0:
        raise EdgepackError(f"--cache-bytes must be 0 or more, not {args.cache_bytes}", hint="pass --cache-bytes 0 to turn reuse off")
    if args.prefill_chunk < 0 or args.prefill_chunk == 1:  # a one-token pass is a decode step: not exact
        raise EdgepackError(f"--prefill-chunk must be 0 or at least 2 tokens, not {args.prefill_chunk}",
                            hint=f"pass --prefill-chunk {DEFAULT_PREFILL_CHUNK}, or 0 to compute each prompt at once")
    guards = guard_options(args)  # refuses an open bind without a key, before the model loads
    _require_serve_packages()
    check_port_free(args.host, args.port)  # before the model loads: a busy port fails in a second, not after it
    apply_threads(args.threads)
    from edgepack.runtime import load

    path = resolve_bundle(args.bundle)
    lm = load(path, verify=False if args.no_verify else "once", device=args.device, force=args.force, backend=args.backend,
              key=getattr(args, "key", None))
    for notice in lm.notices:
        print(f"note: {notice}", file=sys.stderr)
    # a bundle pulled from the Hub is known to clients by its repo id, not its cache folder
    name = args.model_name or (lm.name if Path(args.bundle).expanduser().is_dir() else args.bundle)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (queue {args.max_queue})", file=sys.stderr)
    serve(lm, host=args.host, port=args.port, max_queue=args.max_queue, parallel=args.parallel,
          cache_bytes=args.cache_bytes, context=args.context, prefill_chunk=args.prefill_chunk, model_name=name,
          log_level=args.log_level,
          **guards)
    return 0
