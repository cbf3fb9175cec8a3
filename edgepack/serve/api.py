"""The OpenAI API's shapes: request bodies checked and parsed into GenerationRequests, and
the replies (whole, or streamed as server-sent events) built from the worker's steps."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgepack.serve.guard import ApiError, refuse_unsupported

if TYPE_CHECKING:
    from edgepack.serve.worker import Job

# OpenAI's documented default for /v1/completions; chat defaults to the rest of the context.
COMPLETION_DEFAULT_MAX_TOKENS = 16
NO_CONTEXT_DEFAULT_MAX_TOKENS = 1024  # when the manifest does not say how long the context is
MAX_STOP_SEQUENCES = 4  # as OpenAI
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


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


# --- replies ---------------------------------------------------------------------------------


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
