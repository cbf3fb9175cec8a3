"""The FastAPI app: create_app puts together the serving state (Serving: admission into the
worker's queue, the streaming of a request's steps to its client), the guards of guard.py,
the error handlers and the routes."""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (`request: Request`) at runtime, and Request is imported inside _add_routes.

import asyncio
import math
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from edgepack.errors import EdgepackError
from edgepack.serve.api import (
    COMPLETION_DEFAULT_MAX_TOKENS, NO_CONTEXT_DEFAULT_MAX_TOKENS, GenerationRequest, _Reply, _sse, parse_chat,
    parse_completion,
)
from edgepack.serve.guard import DEFAULT_MAX_BODY_BYTES, ApiError, HostPolicy, PromptGate, install_guards, release_body
from edgepack.serve.memory import default_parallel, server_memory
from edgepack.serve.metrics import Metrics
from edgepack.serve.worker import DEFAULT_CACHE_BYTES, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK, Job, Worker

# How often a request that is waiting (queued, or in a long prefill) checks for a gone client.
DISCONNECT_POLL_SECONDS = 0.25
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


class _Disconnected(Exception):
    pass


def create_app(
    lm, *, max_queue: int = DEFAULT_MAX_QUEUE, model_name: str | None = None, parallel: int | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES, context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_keys=(), bind_host: str = "127.0.0.1",
    allowed_hosts=(), allowed_origins=(), docs: bool = False,
):
    """The FastAPI app serving ``lm`` (a loaded EdgeModel), behind the guards of
    serve/guard.py. The worker thread runs while the app's lifespan does. ``parallel``:
    requests generated at once (default: what this box's memory allows, by the planner's
    figure); ``cache_bytes``: KV caches of finished requests held for prefix reuse (0: none);
    ``context``: tokens a request may hold, prompt and reply (default: the model's);
    ``prefill_chunk``: prompt tokens computed between two decode steps (0: whole prompts)."""
    from fastapi import FastAPI

    if (max_queue < 1 or (parallel is not None and parallel < 1) or cache_bytes < 0
            or (context is not None and context < 2) or prefill_chunk < 0 or prefill_chunk == 1):
        raise ValueError("max_queue and parallel must be at least 1, cache_bytes at least 0, context at least 2, "
                         f"prefill_chunk 0 or at least 2: {max_queue, parallel, cache_bytes, context, prefill_chunk}")
    serving = Serving(lm, model_name=model_name or lm.name, max_queue=max_queue, parallel=parallel,
                      cache_bytes=cache_bytes, context=context, max_body_bytes=max_body_bytes,
                      prefill_chunk=prefill_chunk)
    no_docs = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="edgepack", lifespan=serving.lifespan, **no_docs)
    install_guards(app, api_keys, max_body_bytes, HostPolicy(bind_host, allowed_hosts, allowed_origins))
    app.state.serving, app.state.metrics, app.state.worker = serving, serving.metrics, serving.worker
    app.state.model_name, app.state.memory = serving.name, serving.memory
    _add_error_handlers(app, serving.metrics)
    _add_routes(app, serving)
    return app


class Serving:
    """What the routes share: the model's worker, the prompt gate, the counters, and the
    planner's figure for this server's memory (None with the torch backend)."""

    def __init__(self, lm, *, model_name: str, max_queue: int, parallel: int | None, cache_bytes: int,
                 context: int | None, max_body_bytes: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.name = model_name
        self.created = int(time.time())
        claimed = lm.manifest.get("architecture", {}).get("max_position_embeddings")
        # the manifest's context bounds requests (None: unknown, torch backends of odd models)
        self.context = min(context, claimed or context) if context else claimed
        slots_context = min(self.context or lm.max_positions, lm.max_positions)
        sizes = {"context": slots_context, "cache_bytes": cache_bytes, "max_body_bytes": max_body_bytes}
        parallel = parallel or default_parallel(lm, **sizes)
        self.gate = PromptGate(lm, self.context)  # counts prompt tokens off the event loop
        self.metrics = Metrics()
        self.worker = Worker(lm, self.metrics, max_queue, parallel, cache_bytes, slots_context, prefill_chunk)
        self.memory = server_memory(lm, parallel=self.worker.parallel, context=slots_context,
                                    cache_bytes=self.worker.cache_bytes, max_body_bytes=max_body_bytes)

    @asynccontextmanager
    async def lifespan(self, app):
        self.worker.start()
        try:
            yield
        finally:
            self.worker.stop()
            self.gate.close()

    # --- reading ----------------------------------------------------------------------------

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "edgepack"}

    def gauges(self) -> dict:
        gauges = self.worker.gauges()
        if self.memory is not None:
            gauges["predicted_peak_bytes"] = self.memory.peak_bytes
            gauges["predicted_serving_bytes"] = self.memory.serving_bytes
        return gauges

    def check_model(self, asked: str | None) -> None:
        if asked is not None and asked != self.name:
            raise ApiError(404, f"the model {asked!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    async def read(self, request, parse) -> GenerationRequest:
        """The request body, read and parsed; the body's bytes are let go of here (a request
        that waits or streams holds only what it parsed)."""
        chunks = [chunk async for chunk in request.stream()]  # not request.body(): it keeps the bytes
        body = b"".join(chunks)
        del chunks
        try:
            return await self.gate.decode(body, parse)
        finally:
            release_body(request.scope)

    # --- answering --------------------------------------------------------------------------

    async def complete(self, request, req: GenerationRequest):
        from fastapi.responses import Response, StreamingResponse

        self.check_model(req.model)
        job = await self.admit(req)
        try:
            first = await _next_event(job, request)
        except _Disconnected:  # the client left while the request waited: drop it
            job.cancelled.set()
            self.metrics.count("cancelled")
            return Response(status_code=499)  # nobody reads it; it only closes the exchange
        except BaseException:  # the server is shutting down
            job.cancelled.set()
            raise
        if isinstance(first, Exception):
            raise _generation_error(first)
        reply = _Reply(req, self.name, job)
        if req.stream:
            return StreamingResponse(self.stream(request, job, reply, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for step in _steps(request, job, first):
                reply.add(step)
        except _Disconnected:
            self.metrics.count("cancelled")
            return Response(status_code=499)
        except Exception as exc:
            raise _generation_error(exc) from None
        self.metrics.finished(time.perf_counter() - job.arrived, reply.first_token_seconds)
        return reply.whole()

    async def admit(self, req: GenerationRequest) -> Job:
        prompt_tokens = await self.count(req)
        max_tokens = self.max_tokens(req, prompt_tokens)
        job = Job(req, max_tokens, asyncio.get_running_loop(), asyncio.Queue())
        if not self.worker.submit(job):
            err = ApiError(503, f"the server is busy: {self.worker.max_queue} requests are already waiting; retry shortly",
                           type="server_overloaded", code="queue_full")
            err.headers["Retry-After"] = str(_retry_after(self.metrics.p50_latency(), self.worker.max_queue))
            raise err
        return job

    async def count(self, req: GenerationRequest) -> int:
        try:
            prompt_tokens = await self.gate.count(req.prompt, req.chat)
        except ApiError:
            raise
        except Exception as exc:  # no chat template, or the template refuses these messages
            message = exc.message if isinstance(exc, EdgepackError) else f"the prompt cannot be encoded: {exc}"
            raise ApiError(400, message, param="messages" if req.chat else "prompt") from None
        if prompt_tokens == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return prompt_tokens

    def max_tokens(self, req: GenerationRequest, prompt_tokens: int) -> int:
        """The request's max_tokens, defaulted (chat: the rest of the context), within the context."""
        max_tokens, context = req.max_tokens, self.context
        if context is None:
            if max_tokens is None:
                return COMPLETION_DEFAULT_MAX_TOKENS if not req.chat else NO_CONTEXT_DEFAULT_MAX_TOKENS
            return max_tokens
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
        return max_tokens

    async def stream(self, request, job: Job, reply: _Reply, first) -> AsyncIterator[str]:
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
                self.metrics.finished(time.perf_counter() - job.arrived, reply.first_token_seconds)
            else:
                self.metrics.count(outcome)


# --- the app's parts ------------------------------------------------------------------------------


def _add_error_handlers(app, metrics: Metrics) -> None:
    """Every error as OpenAI's JSON shape: {"error": {message, type, param, code}}."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

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


def _add_routes(app, s: Serving) -> None:
    from fastapi import Request
    from fastapi.responses import PlainTextResponse

    worker, metrics = s.worker, s.metrics

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": s.name, "queue_depth": worker.queue_depth}

    @app.get("/metrics")
    async def get_metrics(format: str = "json"):
        if format == "prometheus":
            return PlainTextResponse(metrics.prometheus(worker.queue_depth, worker.busy, s.gauges()))
        return metrics.snapshot(worker.queue_depth, worker.busy, s.gauges())

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [s.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        s.check_model(model_id)
        return s.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await s.complete(request, await s.read(request, parse_chat))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await s.complete(request, await s.read(request, parse_completion))


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
            if _timeout is not None:  # one timer handle; wait_for wraps the get in a task each token
                async with _timeout(DISCONNECT_POLL_SECONDS):
                    return await job.events.get()
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _Disconnected() from None


async def _steps(request, job: Job, first) -> AsyncIterator[Any]:
    """Steps up to the finishing one. A client that leaves mid-stream is noticed by Starlette,
    which cancels the response (Serving.stream's `finally` stops the worker); one that leaves
    while nothing comes (queued, a long prefill) by _next_event's poll. No check a token: it
    was a third of the event loop's time with four streams."""
    item = first
    while item is not None:
        if isinstance(item, Exception):
            raise item
        yield item
        if item.finish_reason is not None:
            return
        item = await _next_event(job, request)
