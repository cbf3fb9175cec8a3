"""``edgepack serve``: an OpenAI-compatible HTTP API over one bundle.

    edgepack serve smollm2-8bit --port 8000 --max-queue 8
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "smollm2-8bit", "prompt": "Once upon a time", "max_tokens": 32}'

Or from Python, with the official client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-8bit", messages=[{"role": "user", "content": "Hi"}])

One process serves one bundle, loaded once at start-up. Generation is CPU-bound and the
model is not thread-safe, so a single worker thread generates one request at a time while
the event loop keeps answering; requests wait in a bounded queue and a full queue answers
503 with Retry-After, so a burst costs latency, never memory. A client that goes away
cancels its request between two tokens. FastAPI and uvicorn are imported only in this
module: ``edgepack run`` and ``import edgepack`` never pay for them.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (`request: Request`) at runtime, and Request is imported inside create_app.

import asyncio
import json
import math
import queue
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from edgepack.errors import EdgepackError, MissingDependencyError, SourceNotFoundError
from edgepack.serve.guard import (
    DEFAULT_MAX_BODY_BYTES, ApiError, HostPolicy, PromptGate, add_guard_arguments, guard_options, install_guards,
    refuse_unsupported,
)  # fmt: skip

DEFAULT_MAX_QUEUE = 8
# OpenAI's documented default for /v1/completions; chat defaults to the rest of the context.
COMPLETION_DEFAULT_MAX_TOKENS = 16
NO_CONTEXT_DEFAULT_MAX_TOKENS = 1024  # when the manifest does not say how long the context is
MAX_STOP_SEQUENCES = 4  # as OpenAI
# How often a request that is waiting (queued, or in a long prefill) checks for a gone client.
DISCONNECT_POLL_SECONDS = 0.25
LATENCY_WINDOW = 1024  # p50/p99 are over the last this-many finished requests
SERVE_HINT = "pip install 'edgepack[serve]'"
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _require_serve_packages() -> None:
    """Fail before the model is loaded, not after, when the HTTP stack is missing."""
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            raise MissingDependencyError(
                f"`edgepack serve` needs the {name} package, which is not installed", hint=SERVE_HINT
            ) from None


# --- requests --------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions body."""

    prompt: str | list[dict]
    chat: bool
    model: str | None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def parse_chat(body: Any) -> GenerationRequest:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content} objects", param="messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _with_sampling(GenerationRequest(parsed, True, body.get("model")), body, max_tokens, param)


def parse_completion(body: Any) -> GenerationRequest:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the client sends a list of one prompt; batches are not supported
    if not isinstance(prompt, str):
        raise ApiError(400, "`prompt` must be a string (token ids and batches are not supported)", param="prompt")
    if body.get("echo"):
        raise ApiError(400, "`echo` is not supported", param="echo")
    req = GenerationRequest(prompt, False, body.get("model"))
    return _with_sampling(req, body, body.get("max_tokens"), "max_tokens")


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "`model` must be a string", param="model")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "`logprobs` is not supported", param="logprobs")
    refuse_unsupported(body)
    return body


def _message(m: Any, i: int) -> dict:
    param = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
        raise ApiError(400, f"{param} needs a role, one of {', '.join(CHAT_ROLES)}", param=f"{param}.role")
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{param}.content: only text parts are supported", param=f"{param}.content")
        content = "".join(p["text"] for p in content)
    if content is None and m["role"] == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"{param}.content must be a string or a list of text parts", param=f"{param}.content")
    return {"role": m["role"], "content": content}


def _with_sampling(req: GenerationRequest, body: dict, max_tokens: Any, max_param: str) -> GenerationRequest:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", param="stream")
    req.stream = stream
    options = body.get("stream_options") or {}
    req.include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ApiError(400, f"`{max_param}` must be a positive integer, not {max_tokens!r}", param=max_param)
    req.max_tokens = max_tokens
    min_tokens = body.get("min_tokens", 0)  # an extension (vLLM's name): ignore EOS before this many
    if not _is_int(min_tokens) or min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
        raise ApiError(400, f"`min_tokens` must be between 0 and {max_param}, not {min_tokens!r}", param="min_tokens")
    req.min_tokens = min_tokens
    temperature, top_p, seed = body.get("temperature"), body.get("top_p"), body.get("seed")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise ApiError(400, f"`temperature` must be a number from 0 to 2, not {temperature!r}", param="temperature")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ApiError(400, f"`top_p` must be a number in (0, 1], not {top_p!r}", param="top_p")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, f"`seed` must be an integer, not {seed!r}", param="seed")
    req.temperature = None if temperature is None else float(temperature)
    req.top_p = None if top_p is None else float(top_p)
    req.seed = seed
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) for s in stop)
    ):
        raise ApiError(400, f"`stop` must be a string or a list of at most {MAX_STOP_SEQUENCES} strings", param="stop")
    req.stop = [s for s in stop or [] if s]
    return req


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- metrics ---------------------------------------------------------------------------------


class Metrics:
    """Counters for /metrics. Written by the worker thread and the event loop, so locked."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests = {"ok": 0, "cancelled": 0, "rejected": 0, "invalid": 0, "error": 0}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.first_token_latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def count(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] += 1

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def finished(self, latency_seconds: float, first_token_seconds: float | None) -> None:
        with self._lock:
            self.requests["ok"] += 1
            self.latencies.append(latency_seconds)
            if first_token_seconds is not None:
                self.first_token_latencies.append(first_token_seconds)

    def p50_latency(self) -> float | None:
        with self._lock:
            return _percentile(self.latencies, 50)

    def snapshot(self, queue_depth: int, busy: bool) -> dict:
        with self._lock:
            return {
                "uptime_seconds": round(time.time() - self.started, 3),
                "requests": dict(self.requests, total=sum(self.requests.values())),
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "latency_seconds": _summary(self.latencies),
                "first_token_seconds": _summary(self.first_token_latencies),
                "queue_depth": queue_depth,
                "busy": busy,
            }

    def prometheus(self, queue_depth: int, busy: bool) -> str:
        s = self.snapshot(queue_depth, busy)
        lines = ["# TYPE edgepack_requests_total counter"]
        lines += [f'edgepack_requests_total{{outcome="{k}"}} {v}' for k, v in s["requests"].items() if k != "total"]
        lines += ["# TYPE edgepack_prompt_tokens_total counter", f"edgepack_prompt_tokens_total {s['prompt_tokens']}"]
        lines += ["# TYPE edgepack_generated_tokens_total counter",
                  f"edgepack_generated_tokens_total {s['generated_tokens']}"]  # fmt: skip
        for name in ("latency_seconds", "first_token_seconds"):
            lines.append(f"# TYPE edgepack_request_{name} summary")
            for q in ("p50", "p99"):
                value = s[name][q]
                quantile = "0.5" if q == "p50" else "0.99"
                lines.append(f'edgepack_request_{name}{{quantile="{quantile}"}} {"NaN" if value is None else value}')
            lines.append(f"edgepack_request_{name}_count {s[name]['count']}")
        lines += ["# TYPE edgepack_queue_depth gauge", f"edgepack_queue_depth {queue_depth}"]
        lines += ["# TYPE edgepack_busy gauge", f"edgepack_busy {int(busy)}"]
        return "\n".join(lines) + "\n"


def _percentile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def _summary(values) -> dict:
    quantiles = {f"p{q}": _percentile(values, q) for q in (50, 99)}
    return {"count": len(values), **{k: None if v is None else round(v, 6) for k, v in quantiles.items()}}


# --- the worker ------------------------------------------------------------------------------


@dataclass
class Job:
    """One admitted request. The worker sends GenerationSteps, an exception, then None."""

    request: GenerationRequest
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """One thread that owns the model; requests wait in a queue of at most ``max_queue``."""

    def __init__(self, lm, metrics: Metrics, max_queue: int = DEFAULT_MAX_QUEUE):
        self.lm, self.metrics, self.max_queue = lm, metrics, max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.busy = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._waiting

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgepack-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> bool:
        """Admit a job, or return False when the queue is full."""
        with self._lock:
            if self._waiting >= self.max_queue:
                return False
            self._waiting += 1
        self._jobs.put(job)
        return True

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
            if job.cancelled.is_set():  # its client left while it waited
                continue
            self.busy = True
            try:
                self._generate(job)
            finally:
                self.busy = False

    def _generate(self, job: Job) -> None:
        req = job.request
        try:
            steps = self.lm.stream_steps(
                req.prompt,
                chat=req.chat,
                max_new_tokens=job.max_tokens,
                min_new_tokens=req.min_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                stop=req.stop,
            )
            for step in steps:
                self.metrics.add_tokens(prompt=step.prompt_tokens if step.generated_tokens == 1 else 0, generated=1)
                if job.cancelled.is_set() or not _send(job, step):
                    steps.close()
                    return
        except Exception as exc:  # handed to the request, which answers it; the worker lives on
            _send(job, exc)
        _send(job, None)


def _send(job: Job, item: Any) -> bool:
    try:
        job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        return True
    except RuntimeError:  # the event loop is closed: the server is shutting down
        job.cancelled.set()
        return False


# --- the app ---------------------------------------------------------------------------------


class _Disconnected(Exception):
    pass


def create_app(
    lm, *, max_queue: int = DEFAULT_MAX_QUEUE, model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_keys=(), bind_host: str = "127.0.0.1",
    allowed_hosts=(), allowed_origins=(), docs: bool = False,
):  # fmt: skip
    """The FastAPI app serving ``lm`` (a loaded EdgeModel), behind the guards of
    serve/guard.py. The worker thread runs while the app's lifespan does."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    if max_queue < 1:
        raise ValueError(f"max_queue must be at least 1, not {max_queue}")
    name = model_name or lm.name
    created = int(time.time())
    context = lm.manifest.get("architecture", {}).get("max_position_embeddings")
    gate = PromptGate(lm, context)  # counts prompt tokens off the event loop
    metrics = Metrics()
    worker = Worker(lm, metrics, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            gate.close()

    no_docs = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="edgepack", lifespan=lifespan, **no_docs)
    install_guards(app, api_keys, max_body_bytes, HostPolicy(bind_host, allowed_hosts, allowed_origins))
    app.state.metrics, app.state.worker, app.state.model_name = metrics, worker, name

    def error_response(err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        metrics.count("rejected" if err.status == 503 else "error" if err.status >= 500 else "invalid")
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(ApiError(400, str(exc.errors())))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        metrics.count("error")
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "queue_depth": worker.queue_depth}

    @app.get("/metrics")
    async def get_metrics(format: str = "json"):
        if format == "prometheus":
            return PlainTextResponse(metrics.prometheus(worker.queue_depth, worker.busy))
        return metrics.snapshot(worker.queue_depth, worker.busy)

    def model_card():
        return {"id": name, "object": "model", "created": created, "owned_by": "edgepack"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != name:
            raise _unknown_model(model_id, name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, await gate.decode(await request.body(), parse_chat))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, await gate.decode(await request.body(), parse_completion))

    async def complete(request, req: GenerationRequest):
        if req.model is not None and req.model != name:
            raise _unknown_model(req.model, name)
        job = await admit(req)
        try:
            first = await _next_event(job, request)
        except _Disconnected:  # the client left while the request waited: drop it
            job.cancelled.set()
            metrics.count("cancelled")
            return Response(status_code=499)  # nobody reads it; it only closes the exchange
        except BaseException:  # the server is shutting down
            job.cancelled.set()
            raise
        if isinstance(first, Exception):
            raise _generation_error(first)
        reply = _Reply(req, name, job)
        if req.stream:
            return StreamingResponse(
                stream(request, job, reply, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            async for step in _steps(request, job, first):
                reply.add(step)
        except _Disconnected:
            metrics.count("cancelled")
            return Response(status_code=499)
        except Exception as exc:
            raise _generation_error(exc) from None
        metrics.finished(time.perf_counter() - job.arrived, reply.first_token_seconds)
        return reply.whole()

    async def admit(req: GenerationRequest) -> Job:
        try:
            prompt_tokens = await gate.count(req.prompt, req.chat)
        except ApiError:
            raise
        except Exception as exc:  # no chat template, or the template refuses these messages
            message = exc.message if isinstance(exc, EdgepackError) else f"the prompt cannot be encoded: {exc}"
            raise ApiError(400, message, param="messages" if req.chat else "prompt") from None
        if prompt_tokens == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        max_tokens = req.max_tokens
        if context is not None:
            if max_tokens is None:
                max_tokens = context - prompt_tokens
                if not req.chat:
                    max_tokens = min(max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
            if prompt_tokens + max(max_tokens, 1) > context:
                raise ApiError(
                    400,
                    f"this model's maximum context length is {context} tokens; the request needs "
                    f"{prompt_tokens + max(max_tokens, 1)} ({prompt_tokens} in the prompt, "
                    f"{max(max_tokens, 1)} to generate). Shorten the prompt or lower max_tokens.",
                    param="messages" if req.chat else "prompt",
                    code="context_length_exceeded",
                )
        elif max_tokens is None:
            max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if not req.chat else NO_CONTEXT_DEFAULT_MAX_TOKENS
        job = Job(req, max_tokens, asyncio.get_running_loop(), asyncio.Queue())
        if not worker.submit(job):
            err = ApiError(
                503,
                f"the server is busy: {worker.max_queue} requests are already waiting; retry shortly",
                type="server_overloaded",
                code="queue_full",
            )
            err.headers["Retry-After"] = str(_retry_after(metrics.p50_latency(), worker.max_queue))
            raise err
        return job

    async def stream(request, job: Job, reply: "_Reply", first) -> AsyncIterator[str]:
        outcome = "cancelled"
        try:
            yield _sse(reply.chunk(role=True))
            async for step in _steps(request, job, first):
                reply.add(step)
                if step.text or step.finish_reason:
                    yield _sse(reply.chunk(text=step.text, finish=step.finish_reason))
            if reply.include_usage:
                yield _sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
            outcome = "ok"
        except _Disconnected:
            pass
        except Exception as exc:  # failed after the headers went out: say so in the stream
            yield _sse(_generation_error(exc).body())
            yield "data: [DONE]\n\n"
            outcome = "error"
        finally:
            job.cancelled.set()  # no-op when done; stops the worker when the client went away
            if outcome == "ok":
                metrics.finished(time.perf_counter() - job.arrived, reply.first_token_seconds)
            else:
                metrics.count(outcome)

    return app


def _unknown_model(asked: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"the model {asked!r} does not exist; this server serves {served!r}",
        param="model",
        code="model_not_found",
    )


def _generation_error(exc: BaseException) -> ApiError:
    if isinstance(exc, EdgepackError) and isinstance(exc, ValueError):
        return ApiError(400, exc.message)
    return ApiError(500, f"generation failed: {type(exc).__name__}", type="server_error")


def _retry_after(p50_latency: float | None, waiting: int) -> int:
    """Seconds until a slot is likely free: the queue ahead drains at one median request each."""
    if p50_latency is None:
        return 1
    return max(1, min(60, math.ceil(p50_latency * waiting)))


async def _next_event(job: Job, request) -> Any:
    """The worker's next item, checking while it waits that the client is still there."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _Disconnected() from None


async def _steps(request, job: Job, first) -> AsyncIterator[Any]:
    """Steps up to the finishing one; a gone client raises _Disconnected between two tokens."""
    item = first
    while item is not None:
        if isinstance(item, Exception):
            raise item
        yield item
        if item.finish_reason is not None:
            return
        if await request.is_disconnected():
            job.cancelled.set()
            raise _Disconnected()
        item = await _next_event(job, request)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Reply:
    """Builds the response objects of one request in OpenAI's shapes."""

    def __init__(self, req: GenerationRequest, model: str, job: Job):
        self.chat, self.model, self.job = req.chat, model, job
        self.include_usage = req.include_usage
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.pieces: list[str] = []
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.first_token_seconds: float | None = None

    def add(self, step) -> None:
        if self.first_token_seconds is None:
            self.first_token_seconds = time.perf_counter() - self.job.arrived
        self.pieces.append(step.text)
        self.prompt_tokens, self.completion_tokens = step.prompt_tokens, step.generated_tokens
        self.finish_reason = step.finish_reason

    def usage(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    def _envelope(self, stream: bool) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if stream else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self) -> dict:
        text = "".join(self.pieces)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = self.finish_reason
        return {**self._envelope(False), "choices": [choice], "usage": self.usage()}

    def chunk(self, text: str = "", finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        chunk = {**self._envelope(True), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: only the last chunk carries usage
        return chunk

    def usage_chunk(self) -> dict:
        return {**self._envelope(True), "choices": [], "usage": self.usage()}


# --- the command -----------------------------------------------------------------------------


def resolve_bundle(ref: str) -> Path:
    """A local bundle directory as it is; anything else is pulled from the Hub."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists() or ref.startswith((".", "/", "~")):
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


def serve(lm, *, host: str = "127.0.0.1", port: int = 8000, max_queue: int = DEFAULT_MAX_QUEUE,
          model_name: str | None = None, log_level: str = "info", **guards) -> None:
    """Serve a loaded EdgeModel until interrupted (Ctrl-C, SIGTERM). ``guards``: create_app's
    max_body_bytes, api_keys, allowed_hosts, allowed_origins, docs."""
    _require_serve_packages()
    import uvicorn

    from edgepack.serve.guard import server_config

    app = create_app(lm, max_queue=max_queue, model_name=model_name, bind_host=host, **guards)
    uvicorn.Server(server_config(app, host=host, port=port, max_queue=max_queue, log_level=log_level)).run()


def configure_parser(p) -> None:
    p.add_argument("bundle", metavar="BUNDLE_OR_REPO", help="bundle directory, or a Hub repo id to pull")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"requests that may wait behind the one generating; more get 503 (default {DEFAULT_MAX_QUEUE})",
    )
    p.add_argument("--model-name", default=None, help="model id clients send (default: the bundle's directory name)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the bundle's device_map)")
    p.add_argument(
        "--backend",
        choices=["native", "torch"],
        default=None,
        help="native: edgepack's CPU engine (no torch); torch: torch modules (default: native where it can run the bundle)",
    )
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, skip hashing")
    p.add_argument("--force", action="store_true", help="load even if this box looks too small")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_guard_arguments(p)


def main(args) -> int:
    if args.max_queue < 1:
        raise EdgepackError(f"--max-queue must be at least 1, not {args.max_queue}", hint="pass --max-queue 1 or more")
    guards = guard_options(args)  # refuses an open bind without a key, before the model loads
    _require_serve_packages()
    from edgepack.runtime import load

    path = resolve_bundle(args.bundle)
    lm = load(path, verify=False if args.no_verify else "once", device=args.device, force=args.force, backend=args.backend)
    for notice in lm.notices:
        print(f"note: {notice}", file=sys.stderr)
    # a bundle pulled from the Hub is known to clients by its repo id, not its cache folder
    name = args.model_name or (lm.name if Path(args.bundle).expanduser().is_dir() else args.bundle)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (queue {args.max_queue})", file=sys.stderr)
    serve(lm, host=args.host, port=args.port, max_queue=args.max_queue, model_name=name, log_level=args.log_level,
          **guards)  # fmt: skip
    return 0
