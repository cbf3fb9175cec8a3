"""`edgepack serve` against abuse: body and prompt bounds, hostile chat templates, cross-site
requests, half-sent requests, unsupported parameters and API keys (issues #23 items 5-9, #20).

Servers run in-process on loopback (LiveServer from test_serve.py) over the tiny packed bundle.
"""

import argparse
import copy
import json
import socket
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve import PROMPT, LiveServer, _assert_openai_error  # noqa: E402

from edgepack import serve  # noqa: E402
from edgepack.serve import guard as serve_guard  # noqa: E402
from edgepack.errors import ChatTemplateError, EdgepackError  # noqa: E402
from edgepack.runtime.tokenizer import _compile_template, render_bounded  # noqa: E402

NESTED_LOOPS = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
HUGE_STRING = "{{ 'A' * 2**30 }}"
GOOD = {"prompt": PROMPT, "max_tokens": 2}


@pytest.fixture(scope="module")
def lm(packed):
    from edgepack.runtime import load

    return load(packed("llama", 8))


@pytest.fixture(scope="module")
def live(lm):
    with LiveServer(serve.create_app(lm, max_queue=2, max_body_bytes=64 * 1024)) as server:
        yield server


def with_context(lm, context: int):
    """The same model, its manifest claiming a longer context (only the server's bounds read it)."""
    other = copy.copy(lm)
    architecture = {**lm.manifest["architecture"], "max_position_embeddings": context}
    other.manifest = {**lm.manifest, "architecture": architecture}
    return other


def with_template(lm, template: str):
    other = copy.copy(lm)
    other.tokenizer = copy.deepcopy(lm.tokenizer)
    other.tokenizer.chat_template, other.tokenizer._compiled = template, None
    return other


def max_health_seconds(url: str, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        out.append(time.perf_counter() - t0)
        time.sleep(0.05)


# --- 5: bodies and prompts -------------------------------------------------------------------


def test_body_over_the_cap_is_413_declared_or_chunked(live):
    body = json.dumps({"prompt": "x" * 70_000}).encode()
    _assert_openai_error(httpx.post(live.url + "/v1/completions", content=body), 413)

    def chunks():  # no content-length: counted as it arrives
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    _assert_openai_error(httpx.post(live.url + "/v1/completions", content=chunks()), 413)
    assert httpx.post(live.url + "/v1/completions", json=GOOD).status_code == 200


def test_prompt_longer_than_any_fit_is_refused_by_its_length(live, lm):
    gate = serve_guard.PromptGate(lm, 128)
    assert gate.char_limit == 128 * lm.tokenizer.max_chars_per_token() < 60_000
    t0 = time.perf_counter()
    response = httpx.post(live.url + "/v1/completions", json={"prompt": "Paris " * 10_000, "max_tokens": 2})
    error = _assert_openai_error(response, 400, "prompt", "context_length_exceeded")
    assert "characters" in error["message"] and time.perf_counter() - t0 < 5
    many = [{"role": "user", "content": "abcd"}] * 1_200  # the flood, scaled to the 64 KiB cap
    response = httpx.post(live.url + "/v1/chat/completions", json={"messages": many})
    _assert_openai_error(response, 400, "messages", "context_length_exceeded")


def test_prompt_is_tokenised_in_prefixes_not_whole(lm, monkeypatch):
    gate = serve_guard.PromptGate(lm, 128)
    gate.char_limit = None  # as for a tokenizer without a character bound
    seen: list[int] = []
    encode = gate.tokenizer.encode
    monkeypatch.setattr(gate.tokenizer, "encode", lambda text, **kw: seen.append(len(text)) or encode(text, **kw))
    assert gate._count("Paris is nice. " * 100_000, chat=False) > 128
    assert seen and max(seen) <= 128 * serve_guard.PREFIX_CHARS_PER_TOKEN
    seen.clear()
    assert gate._count(PROMPT, chat=False) == len(lm.encode_prompt(PROMPT))  # short ones: exact


def test_health_answers_while_a_huge_prompt_is_tokenised(lm):
    app = serve.create_app(with_context(lm, 1 << 22), max_body_bytes=4 << 20)
    with LiveServer(app) as server:
        stop, latencies = threading.Event(), []
        poller = threading.Thread(target=max_health_seconds, args=(server.url, stop, latencies))
        poller.start()
        t0 = time.perf_counter()
        body = {"prompt": "Paris is nice. " * 100_000, "max_tokens": 1 << 22}  # 1.5 MB, ~0.5M tokens
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        busy = time.perf_counter() - t0
        stop.set()
        poller.join()
    _assert_openai_error(response, 400, "prompt", "context_length_exceeded")
    assert len(latencies) >= 3 and max(latencies) < 1.0, (busy, max(latencies))


# --- 6: chat templates -----------------------------------------------------------------------


@pytest.mark.parametrize("template, why", [(NESTED_LOOPS, "ran for more than"), (HUGE_STRING, "1,073,741,824")])
def test_hostile_template_fails_fast_and_small(template, why):
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError) as caught:
        render_bounded(_compile_template(template), {"messages": []}, max_seconds=1.0, max_chars=1 << 20)
    seconds, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert why in caught.value.message and seconds < 3 and peak < 16 << 20


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(x='A') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
    "{% set ns = namespace(x='A') %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
    "{{ 'A'.ljust(2**30) }}", "{{ 'A'|center(2**30) }}", "{{ '{:>999999999}'.format(1) }}",
    "{{ '%999999999s'|format(1) }}", "{{ ('A' * 100000)|replace('A', 'AAAAAAAAAAAAAAAAAAAA') }}",
    "{% for i in range(99999) %}{{ 'A' * 1000 }}{% endfor %}", "{{ 9 ** (9 ** 9) }}",
    "{% set xs = 'A' * 100000 %}{% for a in xs %}{% for b in xs %}{% endfor %}{% endfor %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
])
def test_other_template_bombs_are_stopped(template):
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError):
        render_bounded(_compile_template(template), {"messages": []}, max_seconds=1.0, max_chars=1 << 20)
    assert time.perf_counter() - t0 < 3


def test_real_templates_render_as_before(lm):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>Hi</s><|assistant|>Hello</s><|assistant|>"
    loop = ("{% for m in messages %}{{ loop.index }}{{ m.content|upper|tojson }}"
            "{% if not loop.last %},{% endif %}{% endfor %}")
    out = render_bounded(_compile_template(loop), {"messages": messages}, max_seconds=1.0, max_chars=1000)
    assert out == '1"HI",2"HELLO"'


@pytest.mark.parametrize("template", [NESTED_LOOPS, HUGE_STRING])
def test_server_answers_400_for_a_hostile_template(lm, template):
    with LiveServer(serve.create_app(with_template(lm, template))) as server:
        t0 = time.perf_counter()
        body = {"messages": [{"role": "user", "content": "x"}]}
        response = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert time.perf_counter() - t0 < 5
        error = _assert_openai_error(response, 400, "messages")
        assert "chat template" in error["message"]
        assert httpx.get(server.url + "/health").status_code == 200


# --- 7: Host and Origin ----------------------------------------------------------------------


def test_cross_site_requests_are_403(live):
    port = live.url.rsplit(":", 1)[1]
    for headers in (
        {"Host": f"evil.example:{port}"},  # DNS rebinding
        {"Origin": "http://evil.example"},
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        response = httpx.post(live.url + "/v1/completions", content=json.dumps(GOOD), headers=headers)
        assert response.status_code == 403, headers
        assert response.json()["error"]["code"] in ("host_not_allowed", "origin_not_allowed")
    same_origin = {"Origin": live.url, "Content-Type": "application/json"}
    assert httpx.post(live.url + "/v1/completions", content=json.dumps(GOOD), headers=same_origin).status_code == 200
    assert httpx.get(f"http://localhost:{port}/health").status_code == 200


def test_allowed_host_and_origin_for_a_reverse_proxy(lm):
    app = serve.create_app(lm, allowed_hosts=["llm.example.org"], allowed_origins=["https://chat.example.org"])
    with LiveServer(app) as server:
        response = httpx.post(server.url + "/v1/completions", json=GOOD, headers={"Host": "llm.example.org"})
        assert response.status_code == 200
        cors = {"Origin": "https://chat.example.org"}
        response = httpx.post(server.url + "/v1/completions", json=GOOD, headers=cors)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://chat.example.org"
        preflight = {**cors, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        assert httpx.options(server.url + "/v1/completions", headers=preflight).status_code == 200
        other = {"Origin": "https://x.example"}
        assert httpx.post(server.url + "/v1/completions", json=GOOD, headers=other).status_code == 403


def test_host_policy_of_a_wildcard_bind():
    policy = serve_guard.HostPolicy("0.0.0.0")
    assert policy.host_ok("192.168.1.20:8000") and policy.host_ok("[::1]:8000") and policy.host_ok("localhost")
    assert not policy.host_ok("evil.example:8000")
    assert serve_guard.HostPolicy("0.0.0.0", ["*.example.org"]).host_ok("llm.example.org")
    assert not serve_guard.HostPolicy("127.0.0.1").host_ok("192.168.1.20")


# --- 8: slow and malformed requests ----------------------------------------------------------


def test_half_sent_headers_are_closed(live, monkeypatch):
    monkeypatch.setattr(serve_guard, "HEADER_SECONDS", 0.5)
    host, port = live.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: never ends
        t0 = time.perf_counter()
        assert s.recv(1024) == b""  # closed by the server
        assert time.perf_counter() - t0 < 5


def test_half_sent_body_is_408(live, monkeypatch):
    monkeypatch.setattr(serve_guard, "BODY_IDLE_SECONDS", 0.5)
    host, port = live.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\":")
        t0 = time.perf_counter()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and time.perf_counter() - t0 < 5


@pytest.mark.parametrize("content", [b"[" * 60_000, b'{"prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"])
def test_deep_or_broken_json_is_400(live, content):
    headers = {"content-type": "application/json"}
    _assert_openai_error(httpx.post(live.url + "/v1/completions", content=content, headers=headers), 400)


def test_docs_only_when_asked(live, lm):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(live.url + path).status_code == 404
    with LiveServer(serve.create_app(lm, docs=True)) as server:
        assert httpx.get(server.url + "/openapi.json").status_code == 200


# --- 9: unsupported parameters ---------------------------------------------------------------


@pytest.mark.parametrize("param, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]), ("tool_choice", "auto"),
    ("response_format", {"type": "json_object"}), ("logit_bias", {"42": 5}), ("frequency_penalty", 0.5),
    ("presence_penalty", -1), ("top_logprobs", 2), ("functions", [{"name": "f"}]), ("n", 3), ("logprobs", True),
])
def test_unsupported_parameters_are_400_naming_them(live, param, value):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, param: value}
    error = _assert_openai_error(httpx.post(live.url + "/v1/chat/completions", json=body), 400, param,
                                 None if param in ("n", "logprobs") else "unsupported_parameter")
    assert param in error["message"]


def test_unused_values_of_unsupported_parameters_pass(live):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "frequency_penalty": 0,
            "presence_penalty": 0.0, "response_format": {"type": "text"}, "logit_bias": {}, "tools": []}
    assert httpx.post(live.url + "/v1/chat/completions", json=body).status_code == 200
    _assert_openai_error(httpx.post(live.url + "/v1/completions", json={**GOOD, "suffix": "x"}), 400, "suffix",
                         "unsupported_parameter")


# --- #20: API keys ---------------------------------------------------------------------------


def test_api_key_required_except_health(lm):
    with LiveServer(serve.create_app(lm, api_keys=["sk-one", "sk-two"])) as server:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-one"}):
            response = httpx.post(server.url + "/v1/completions", json=GOOD, headers=headers)
            _assert_openai_error(response, 401, None, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
        _assert_openai_error(httpx.get(server.url + "/metrics"), 401, None, "invalid_api_key")
        assert httpx.get(server.url + "/health").status_code == 200
        for key in ("sk-one", "sk-two"):
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            assert client.completions.create(model=lm.name, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="sk-nope", max_retries=0).models.list()


def _args(**overrides):
    base = dict(host="127.0.0.1", api_key=[], insecure_no_key=False, allowed_host=[], allowed_origin=[],
                max_body_bytes=serve.DEFAULT_MAX_BODY_BYTES, docs=False)
    return argparse.Namespace(**{**base, **overrides})


def test_open_bind_needs_a_key(monkeypatch):
    monkeypatch.delenv("EDGEPACK_API_KEY", raising=False)
    with pytest.raises(EdgepackError) as caught:
        serve_guard.guard_options(_args(host="0.0.0.0"))
    assert "EDGEPACK_API_KEY" in caught.value.hint
    assert serve_guard.guard_options(_args(host="0.0.0.0", insecure_no_key=True))["api_keys"] == []
    assert serve_guard.guard_options(_args(host="::1"))["api_keys"] == []
    monkeypatch.setenv("EDGEPACK_API_KEY", "sk-env")
    assert serve_guard.guard_options(_args(host="0.0.0.0", api_key=["sk-arg"]))["api_keys"] == ["sk-arg", "sk-env"]


def test_cli_refuses_an_open_bind_in_one_line(packed, monkeypatch):
    env = {k: v for k, v in __import__("os").environ.items() if k != "EDGEPACK_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "edgepack.cli", "serve", str(packed("llama", 8)), "--host", "0.0.0.0", "--port", "1"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: refusing to serve on 0.0.0.0") and lines[1].startswith("hint: ")


# --- transformers' tokenizer (a bundle without tokenizer.json): its template bounded too ---


def test_transformers_tokenizer_renders_as_transformers_and_bounded():
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from tiny import make_tokenizer

    from edgepack.runtime.tokenizer import TransformersTokenizer

    hf = make_tokenizer()
    tok = TransformersTokenizer(hf)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(messages, tokenize=False) == hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(messages, tokenize=True) == hf.encode(
        hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    assert tok.encode("Paris") == hf.encode("Paris") and len(tok) == len(hf)
    copied = copy.deepcopy(tok)  # the server's prompt gate works on a copy
    for template in (NESTED_LOOPS, HUGE_STRING):
        copied.tokenizer.chat_template, copied._compiled = template, None
        t0 = time.perf_counter()
        with pytest.raises(ChatTemplateError, match="stopped"):
            copied.apply_chat_template(messages, max_seconds=1.0, max_chars=1 << 20)
        assert time.perf_counter() - t0 < 3
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                       tokenize=False)  # the original kept its own


def test_server_bounds_a_transformers_tokenizer_template(lm):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from tiny import make_tokenizer

    from edgepack.runtime.tokenizer import TransformersTokenizer

    hf = make_tokenizer()
    hf.chat_template = NESTED_LOOPS
    other = copy.copy(lm)
    other.tokenizer = TransformersTokenizer(hf)
    with LiveServer(serve.create_app(other)) as server:
        t0 = time.perf_counter()
        response = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert time.perf_counter() - t0 < 5
        assert "chat template" in _assert_openai_error(response, 400, "messages")["message"]


# --- memory bounds: connections, bodies read at once, message counts -----------------------


def test_connection_limit_answers_json_503(lm, monkeypatch):
    monkeypatch.setattr(serve_guard, "SPARE_CONNECTIONS", 0)
    app = serve.create_app(lm)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    import uvicorn

    server = uvicorn.Server(serve_guard.server_config(app, host="127.0.0.1", port=0, max_queue=2, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        idle = socket.create_connection(sock.getsockname())  # one connection open: the next one is the limit's 2nd
        time.sleep(0.2)
        response = httpx.get(url + "/v1/models")
        error = _assert_openai_error(response, 503, code="too_many_connections")
        assert error["type"] == "server_overloaded" and response.headers["retry-after"] == "1"
        idle.close()
        time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 200  # under the limit again
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_bodies_read_at_once_are_bounded(lm):
    """Two bodies of 40 KiB under a 64 KiB cap with room for one at a time: while the first is
    still being sent, the second gets 503 at once; then it goes through."""
    app = serve.create_app(lm, max_body_bytes=64 * 1024)
    for middleware in app.user_middleware:
        if middleware.cls is serve_guard.RequestGuard:
            middleware.kwargs["bodies_at_once"] = 1
    body = json.dumps({"prompt": PROMPT + " " + "x" * 40_000, "max_tokens": 1}).encode()
    with LiveServer(app) as server:
        host, port = server.sock.getsockname()
        slow = socket.create_connection((host, port))
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        slow.sendall(head + body[: len(body) - 10])  # all but the end: its bytes stay counted
        time.sleep(0.5)
        _assert_openai_error(httpx.post(server.url + "/v1/completions", content=body,
                                        headers={"content-type": "application/json"}), 503, code="bodies_busy")
        slow.sendall(body[len(body) - 10:])
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += slow.recv(65536)
        slow.close()
        assert reply.startswith(b"HTTP/1.1 400")  # the first one, answered: over the tiny context
        time.sleep(0.2)
        assert httpx.post(server.url + "/v1/completions", content=body,
                          headers={"content-type": "application/json"}).status_code == 400


def test_too_many_messages_refused_before_parsing(lm, monkeypatch):
    gate = serve_guard.PromptGate(lm, 128)
    parsed = []
    monkeypatch.setattr(serve_guard.json, "loads", lambda body: parsed.append(body))
    body = json.dumps({"messages": [{"role": "user", "content": "a"}] * 500}).encode()
    with pytest.raises(serve_guard.ApiError) as caught:
        gate._decode(body, lambda v: v)
    assert caught.value.code == "context_length_exceeded" and "over 166 messages" in caught.value.message
    assert parsed == []  # json.loads never ran
    few = json.dumps({"messages": [{"role": "user", "content": "role"}] * 100}).encode()
    gate._decode(few, lambda v: v)  # "role" as content too: 200 matches for 100 messages, still parsed
    assert parsed == [few]
    gate.close()


def test_metrics_report_the_planners_figure(lm):
    from edgepack.serve.memory import server_memory

    app = serve.create_app(lm, parallel=2, cache_bytes=1 << 20, max_body_bytes=64 * 1024)
    expected = server_memory(lm, parallel=2, context=lm.max_positions, cache_bytes=1 << 20, max_body_bytes=64 * 1024)
    with LiveServer(app) as server:
        metrics = server.metrics()
        prometheus = httpx.get(server.url + "/metrics", params={"format": "prometheus"}).text
    assert metrics["predicted_peak_bytes"] == expected.peak_bytes == app.state.memory.peak_bytes
    assert metrics["predicted_serving_bytes"] == expected.serving_bytes
    assert f"edgepack_predicted_peak_bytes {expected.peak_bytes}" in prometheus
    assert expected.parts["prefix_caches"] == 1 << 20 and expected.parts["weights"] == lm.model.weight_bytes
