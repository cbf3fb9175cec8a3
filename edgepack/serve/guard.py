"""What ``edgepack serve`` checks before a request reaches the model: who may ask (API keys,
Host, Origin), how much and how slowly they may send (a body cap, header and body read
deadlines), and how much of a prompt is tokenised before it is known to fit the context.

Imports nothing from FastAPI or uvicorn at module level: ``import edgepack.serve`` stays free
of the HTTP stack.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from edgepack.errors import EdgepackError, GenerationError
# request bodies read at once, each up to the cap; beyond them 503 (the planner counts them)
from edgepack.plan.serving import BODIES_AT_ONCE

# A 128k-token prompt is about 0.5 MiB of text, 16 times that is room for long chats.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# A client on a slow link sends its headers in well under a second; 10 s allows a bad one.
HEADER_SECONDS = 10.0
# A body must keep coming (a pause of at most BODY_IDLE_SECONDS) and be done in BODY_SECONDS:
# 8 MiB at 1.2 Mbit/s takes ~55 s.
BODY_IDLE_SECONDS = 10.0
BODY_SECONDS = 60.0
# Open connections beyond the request queue (streams being read, keep-alive clients) before
# the server answers 503; each half-sent one is closed after HEADER_SECONDS anyway.
SPARE_CONNECTIONS = 64
BODY_SCOPE_KEY = "edgepack.body"  # the scope entry holding a request's share of the bodies' bytes
# A prompt is first tokenised in prefixes of context x this many characters, growing 4x each
# time: an English token is ~4 characters, so the first prefix usually settles it.
PREFIX_CHARS_PER_TOKEN = 16
# How far back from a prefix's end to look for the start of a word to cut at.
CUT_SEARCH_CHARS = 1024
# Every chat message has a "role" key; inside a string a quote is escaped, so b'"role"' in a
# body is that key or a string that is exactly "role" (a message's content or name): at most
# this many a message.
ROLE = b'"role"'
ROLES_PER_MESSAGE = 3
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
EXEMPT_PATHS = ("/health",)  # answered without a key: load balancers and Docker's HEALTHCHECK
# OpenAI parameters this server does not implement, with the values that mean "not used":
# anything else is refused, so a client never gets plain text where it asked for tool calls.
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0), "repetition_penalty": (None, 1), "top_logprobs": (None, 0), "best_of": (None, 1),
    "suffix": (None, ""), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "web_search_options": (None,),
}


class ApiError(Exception):
    """An error answered as JSON in the OpenAI shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers: dict[str, str] = {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def refuse_unsupported(body: dict) -> None:
    """400 naming the first OpenAI parameter given that this server would otherwise ignore."""
    for param, unused in UNSUPPORTED.items():
        value = body.get(param)
        if not any(value == u and type(value) is not bool for u in unused) and value is not None:
            raise ApiError(400, f"`{param}` is not supported by this server; leave it out", param=param,
                           code="unsupported_parameter")


# --- who may ask -----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_guard_arguments(p) -> None:
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require `Authorization: Bearer KEY` (repeatable; or set EDGEPACK_API_KEY); /health stays open")
    p.add_argument("--insecure-no-key", action="store_true",
                   help="serve on a non-loopback address without a key (anyone who reaches it can use the model)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer this Host name (a reverse proxy's; *.example.com for a domain, * for any)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from this origin call the API (e.g. https://chat.example.com)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body; more gets 413 (default {DEFAULT_MAX_BODY_BYTES:,})")
    p.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json")


def guard_options(args) -> dict:
    """create_app's guard arguments from the command line and EDGEPACK_API_KEY."""
    if args.max_body_bytes < 1024:
        raise EdgepackError(f"--max-body-bytes must be at least 1024, not {args.max_body_bytes}",
                            hint="pass --max-body-bytes 8388608 (8 MiB)")
    api_keys = [k for k in args.api_key + [os.environ.get("EDGEPACK_API_KEY", "")] if k]
    check_bind(args.host, api_keys, args.insecure_no_key)
    return {"max_body_bytes": args.max_body_bytes, "api_keys": api_keys, "allowed_hosts": args.allowed_host,
            "allowed_origins": args.allowed_origin, "docs": args.docs}


def check_bind(host: str, api_keys: list[str], insecure_no_key: bool) -> None:
    """Refuse to listen beyond this machine without a key (anyone who reaches the port could
    use the model, and a web page could drive it through the user's browser)."""
    if api_keys or insecure_no_key or is_loopback(host):
        return
    raise EdgepackError(
        f"refusing to serve on {host} without an API key: anyone who can reach this port could use the model",
        hint="set EDGEPACK_API_KEY (or pass --api-key KEY), or pass --insecure-no-key on a trusted network",
    )


class HostPolicy:
    """Which Host and Origin headers a server bound to ``bind_host`` answers.

    Host: loopback names always; for a specific address, that address; for a wildcard bind
    (0.0.0.0, ::), any IP literal and this machine's name. A DNS name an attacker controls
    (DNS rebinding: evil.example resolving to 127.0.0.1) is none of those. ``allowed_hosts``
    adds names (``*.example.com`` for a domain, ``*`` for any) for reverse proxies.
    Origin (sent by browsers): absent, or the origin of the Host asked for (same-origin), or
    one of ``allowed_origins``; a cross-site page gets 403 whatever its content type.
    """

    def __init__(self, bind_host: str, allowed_hosts=(), allowed_origins=()):
        bind = bind_host.strip("[]").lower()
        self.wildcard = bind in ("", "0.0.0.0", "::")
        self.names = {bind} | {n.lower() for n in allowed_hosts if not n.startswith("*.")}
        self.suffixes = tuple(n[1:].lower() for n in allowed_hosts if n.startswith("*."))
        self.any_host = "*" in allowed_hosts
        if not is_loopback(bind):
            machine = socket.gethostname().lower()
            self.names |= {machine, machine + ".local", socket.getfqdn().lower()}
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    def host_ok(self, host: str) -> bool:
        name = _hostname(host)
        if self.any_host or is_loopback(name) or name in self.names or name.endswith(self.suffixes or ("\0",)):
            return True
        if self.wildcard:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def origin_ok(self, origin: str | None, host: str) -> bool:
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host.lower()


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}


def closing(err: ApiError) -> ApiError:
    """The error closes the connection: the request's body has not been read, and the rest of
    it (up to the cap, or 15 MB of a refused upload) would otherwise be read and thrown away
    on the event loop before the connection could serve another request."""
    err.headers["Connection"] = "close"
    return err


async def send_error(send, err: ApiError) -> None:
    """Answer before the app runs (the body unread): the connection is closed after."""
    err = closing(err)
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SiteGuard:
    """ASGI middleware: 403 for a Host or Origin this server does not answer."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        host = headers.get("host", "")
        if not self.policy.host_ok(host):
            return await send_error(send, ApiError(
                403, f"this server does not answer for the host {host!r}; a reverse proxy in front of it "
                "needs --allowed-host NAME", code="host_not_allowed"))
        origin = headers.get("origin")
        cross_site = origin is None and headers.get("sec-fetch-site") == "cross-site"
        if cross_site or not self.policy.origin_ok(origin, host):
            return await send_error(send, ApiError(
                403, f"cross-site requests are refused (Origin {origin or 'of another site'}); "
                "a web app served elsewhere needs --allowed-origin ORIGIN", code="origin_not_allowed"))
        return await self.app(scope, receive, send)


class _BodyShare:
    """The bytes of one request's body counted against the bytes all bodies being read may
    hold; given back once the app has parsed it (release_body) or the request ends."""

    def __init__(self, guard: "RequestGuard"):
        self.guard, self.bytes = guard, 0

    def take(self, n: int) -> bool:
        if self.guard.body_bytes_in_flight + n > self.guard.max_body_bytes * self.guard.bodies_at_once:
            return False
        self.guard.body_bytes_in_flight += n
        self.bytes += n
        return True

    def release(self) -> None:
        self.guard.body_bytes_in_flight -= self.bytes
        self.bytes = 0


def release_body(scope) -> None:
    """The app has parsed the request's body: its bytes no longer count (see _BodyShare)."""
    share = scope.get(BODY_SCOPE_KEY)
    if share is not None:
        share.release()


class RequestGuard:
    """ASGI middleware: the API key (Authorization: Bearer KEY, compared in constant time),
    then the body: 413 beyond ``max_body_bytes``, 408 when it stops arriving, 503 when the
    bodies being read already hold ``bodies_at_once`` times the cap (memory stays bounded
    whatever the number of clients; the event loop runs all of them, so no lock)."""

    def __init__(self, app, api_keys=(), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 bodies_at_once: int = BODIES_AT_ONCE):
        self.app, self.max_body_bytes, self.bodies_at_once = app, max_body_bytes, bodies_at_once
        self.keys = [k.encode() for k in api_keys]
        self.body_bytes_in_flight = 0

    def key_ok(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip().encode() if scheme.lower() == "bearer" else b""
        matched = False
        for key in self.keys:  # every key compared, so the time says nothing about which matched
            matched |= hmac.compare_digest(token, key)
        return matched

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if self.keys and scope["path"] not in EXEMPT_PATHS and not self.key_ok(headers.get("authorization")):
            given = "authorization" in headers
            err = ApiError(
                401,
                "incorrect API key provided" if given else
                "no API key provided: send it as `Authorization: Bearer KEY` (the openai client's api_key)",
                code="invalid_api_key",
            )
            err.headers["WWW-Authenticate"] = "Bearer"
            return await send_error(send, err)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await send_error(send, self._too_large())
        share = scope[BODY_SCOPE_KEY] = _BodyShare(self)
        try:
            return await self.app(scope, self._bounded(receive, share), send)
        finally:
            share.release()

    def _too_large(self) -> ApiError:
        return closing(ApiError(413, f"the request body is over {self.max_body_bytes:,} bytes (--max-body-bytes)"))

    def _busy(self) -> ApiError:
        err = ApiError(503, f"the server is busy reading {self.bodies_at_once} large request bodies; retry shortly",
                       type="server_overloaded", code="bodies_busy")
        err.headers["Retry-After"] = "1"
        return closing(err)

    def _bounded(self, receive, share: _BodyShare):
        started, received, done = time.monotonic(), 0, False

        async def bounded_receive():
            nonlocal received, done
            if done:  # the body is in: later receives wait for a disconnect, unbounded
                return await receive()
            left = min(BODY_IDLE_SECONDS, started + BODY_SECONDS - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise closing(ApiError(408, f"the request body did not arrive in time (a pause over "
                                       f"{BODY_IDLE_SECONDS:g} s, or over {BODY_SECONDS:g} s in all)")) from None
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                received += chunk
                if received > self.max_body_bytes:
                    raise self._too_large()
                if not share.take(chunk):
                    raise self._busy()
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        return bounded_receive


def install_guards(app, api_keys, max_body_bytes: int, policy: HostPolicy) -> None:
    """Host/Origin outermost, then CORS for the allowed origins (it answers their preflight),
    then the key and the body (Starlette runs the middleware added last first)."""
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(RequestGuard, api_keys=list(api_keys), max_body_bytes=max_body_bytes)
    if policy.origins:
        app.add_middleware(CORSMiddleware, allow_origins=sorted(policy.origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(SiteGuard, policy=policy)


def server_config(app, *, host: str, port: int, max_queue: int, log_level: str = "info", **kwargs):
    """uvicorn's Config for ``app``: h11 with a header deadline, at most max_queue +
    SPARE_CONNECTIONS connections (beyond them 503 in OpenAI's shape), idle keep-alive closed
    after 5 s."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=_header_timeout_protocol(max_queue + SPARE_CONNECTIONS),
        timeout_keep_alive=5, timeout_graceful_shutdown=5, **kwargs,
    )


def _over_limit_app(limit: int):
    """What answers a request beyond the connection limit (uvicorn's own answer is plain text)."""
    async def over_limit(scope, receive, send):
        err = ApiError(503, f"the server is busy: over {limit} connections are open; retry shortly",
                       type="server_overloaded", code="too_many_connections")
        err.headers["Retry-After"] = "1"
        await send_error(send, err)

    return over_limit


def _header_timeout_protocol(limit_concurrency: int | None = None):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all
    arrived HEADER_SECONDS after it opened or after its first bytes (uvicorn waits forever),
    and answering a request that finds ``limit_concurrency`` connections (or requests)
    already open with 503 in OpenAI's JSON shape, where uvicorn's limit answers plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    over_limit = _over_limit_app(limit_concurrency or 0)

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if limit_concurrency is not None:
                app = self.app

                async def limited(scope, receive, send):
                    # as uvicorn counts: this connection is among them, this request's task too
                    if len(self.connections) >= limit_concurrency or len(self.tasks) > limit_concurrency:
                        return await over_limit(scope, receive, send)
                    return await app(scope, receive, send)

                self.app = limited

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state == h11.IDLE:  # still waiting for a request's headers
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(HEADER_SECONDS, self._expired)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self):
            self._header_timer = None
            if self.conn.their_state == h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


# --- how much of a prompt is tokenised -------------------------------------------------------


class PromptGate:
    """Counts a request's prompt tokens on a thread of its own (one at a time, so four huge
    prompts cost the memory of one), refusing a prompt that cannot fit the context as early
    as it can: by its length in characters where the tokenizer bounds the characters per
    token, else by tokenising growing prefixes, and only then the whole of it."""

    def __init__(self, lm, context: int | None):
        # the worker thread decodes with lm.tokenizer; a Rust tokenizer used from two threads
        # can fail ("Already borrowed"), so this one has its own
        self.tokenizer = copy.deepcopy(lm.tokenizer)
        self.context = context
        per_token = getattr(self.tokenizer, "max_chars_per_token", lambda: None)()
        self.char_limit = None if context is None or per_token is None else context * per_token
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edgepack-tokenize")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def decode(self, body: bytes, parse) -> Any:
        """``parse`` (parse_chat or parse_completion) of a JSON body, on the gate's thread: a
        body of 200k messages takes seconds of Python to check, which the event loop keeps."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._decode, body, parse)

    def _decode(self, body: bytes, parse) -> Any:
        roles = body.count(ROLE) if self.context is not None else 0
        if roles > ROLES_PER_MESSAGE * self.context:
            # before json.loads, which holds the GIL (the event loop's too) for the whole parse and
            # makes ~9 bytes of Python objects of each byte of a list of small messages
            raise self.too_many_messages(roles // ROLES_PER_MESSAGE, at_least=True)
        try:
            value = json.loads(body)  # RequestGuard capped the body's size and the time it took
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply to be a request") from None
        messages = value.get("messages") if isinstance(value, dict) else None
        if self.context is not None and isinstance(messages, list) and len(messages) > self.context:
            raise self.too_many_messages(len(messages))
        return parse(value)

    def too_many_messages(self, n: int, at_least: bool = False) -> ApiError:
        # chat templates mark every message with its role: at least a token each
        return ApiError(400, f"this model's maximum context length is {self.context} tokens; "
                        f"{'over ' if at_least else ''}{n:,} messages cannot fit", param="messages",
                        code="context_length_exceeded")

    async def count(self, prompt: Any, chat: bool) -> int:
        """Prompt tokens, or a number over the context when the prompt cannot fit."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._count, prompt, chat)

    def _count(self, prompt: Any, chat: bool) -> int:
        if not chat:
            return self._tokens(prompt, add_special_tokens=True)
        chars = sum(len(m["content"]) for m in prompt)
        if self.char_limit is not None and chars > self.char_limit:
            raise self.too_long(f"the messages hold {chars:,} characters")
        if not getattr(self.tokenizer, "chat_template", None):
            raise GenerationError("this bundle's tokenizer has no chat template", hint="use /v1/completions")
        limits = {"max_chars": self.char_limit} if self.char_limit is not None else {}
        text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False, **limits)
        return self._tokens(text, add_special_tokens=False)

    def _tokens(self, text: str, add_special_tokens: bool) -> int:
        if self.context is None:
            return len(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        if self.char_limit is not None and len(text) > self.char_limit:
            raise self.too_long(f"the prompt is {len(text):,} characters")
        size = self.context * PREFIX_CHARS_PER_TOKEN
        while len(text) > size:
            # cut where a word starts: byte-level and SentencePiece BPE never merge across it,
            # so the prefix's tokens are tokens of the whole prompt too
            n = len(self.tokenizer.encode(text[: _word_start(text, size)], add_special_tokens=add_special_tokens))
            if n > self.context:
                return n
            size *= 4
        return len(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def too_long(self, what: str) -> ApiError:
        per_token = self.char_limit // self.context
        return ApiError(
            400,
            f"this model's maximum context length is {self.context} tokens; {what}, and one token of this "
            f"tokenizer covers at most {per_token} characters, so at most {self.char_limit:,} can fit. "
            "Shorten the prompt.",
            param="messages" if what.startswith("the messages") else "prompt",
            code="context_length_exceeded",
        )


def _word_start(text: str, end: int) -> int:
    """The last index at or before ``end`` where a space follows a non-space (else ``end``)."""
    for i in range(end, max(0, end - CUT_SEARCH_CHARS), -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return end
