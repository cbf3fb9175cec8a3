"""The FastAPI app: routes, error handlers, admission into the worker's queue, and the
streaming of a request's steps to its client."""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (`request: Request`) at runtime, and Request is imported inside create_app.

import asyncio
import math
import time
from typing import Any, AsyncIterator

from edgepack.errors import EdgepackError
from edgepack.serve.api import (
    COMPLETION_DEFAULT_MAX_TOKENS, NO_CONTEXT_DEFAULT_MAX_TOKENS, GenerationRequest, _Reply, _sse, parse_chat,
    parse_completion,
)
from edgepack.serve.guard import DEFAULT_MAX_BODY_BYTES, ApiError, HostPolicy, PromptGate, install_guards
from edgepack.serve.metrics import Metrics
from edgepack.serve.worker import DEFAULT_CACHE_BYTES, DEFAULT_MAX_QUEUE, Job, Worker, default_parallel

# How often a request that is waiting (queued, or in a long prefill) checks for a gone client.
DISCONNECT_POLL_SECONDS = 0.25


class _Disconnected(Exception):
    pass


def create_app(
    lm, *, max_queue: int = DEFAULT_MAX_QUEUE, model_name: str | None = None, parallel: int | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_keys=(), bind_host: str = "127.0.0.1",
    allowed_hosts=(), allowed_origins=(), docs: bool = False,
):
    """The FastAPI app serving ``lm`` (a loaded EdgeModel), behind the guards of
    serve/guard.py. The worker thread runs while the app's lifespan does. ``parallel``:
    requests generated at once (default: default_parallel); ``cache_bytes``: KV caches of
    finished requests held for prefix reuse (0: none)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    if max_queue < 1 or (parallel is not None and parallel < 1) or cache_bytes < 0:
        raise ValueError(f"max_queue and parallel must be at least 1, cache_bytes at least 0: {max_queue, parallel, cache_bytes}")
    name = model_name or lm.name
    created = int(time.time())
    context = lm.manifest.get("architecture", {}).get("max_position_embeddings")
    gate = PromptGate(lm, context)  # counts prompt tokens off the event loop
    metrics = Metrics()
    worker = Worker(lm, metrics, max_queue, parallel or default_parallel(lm), cache_bytes)

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
            return PlainTextResponse(metrics.prometheus(worker.queue_depth, worker.busy, worker.gauges()))
        return metrics.snapshot(worker.queue_depth, worker.busy, worker.gauges())

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
