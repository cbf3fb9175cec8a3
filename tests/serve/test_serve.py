"""`edgepack serve`: a real uvicorn server on 127.0.0.1, driven by the official `openai` client.

The server runs in-process (uvicorn.Server in a thread) on a tiny packed bundle, so a test can
slow the model down to watch queueing and disconnects happen, and compare the server's greedy
answers with EdgeModel.generate on the same loaded model.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from edgepack import serve  # noqa: E402
from edgepack.errors import MissingDependencyError, SourceNotFoundError  # noqa: E402
from edgepack.serve.guard import server_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What boils at one hundred?"}]


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        config = server_config(app, host="127.0.0.1", port=0, max_queue=8, log_level="warning")
        config.timeout_graceful_shutdown = 2
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30)

    def metrics(self) -> dict:
        return httpx.get(self.url + "/metrics", timeout=10).json()


@pytest.fixture(scope="module")
def lm(packed):
    from edgepack.runtime import load

    return load(packed("llama", 8))


@pytest.fixture(scope="module")
def live(lm):
    with LiveServer(serve.create_app(lm, max_queue=2, parallel=1)) as server:  # one slot: the queue tests fill it
        yield server


@pytest.fixture
def client(live):
    return live.client()


def slow_down(monkeypatch, lm, seconds_per_token: float) -> None:
    """Make every generated token take at least this long, so a test can act mid-generation."""
    original = lm.stream_steps

    def stream_steps(*args, **kwargs):
        for step in original(*args, **kwargs):
            time.sleep(seconds_per_token)
            yield step

    monkeypatch.setattr(lm, "stream_steps", stream_steps)
    if lm.backend == "native":  # the server drives the engine itself: slow its prompt passes and steps
        for name in ("forward", "step_batch"):
            fn = getattr(lm.model, name)

            def slowed(*args, _fn=fn, **kwargs):
                time.sleep(seconds_per_token)
                return _fn(*args, **kwargs)

            monkeypatch.setattr(lm.model, name, slowed)


# --- answers ---------------------------------------------------------------------------------


def test_models_health_and_metrics(live, client, lm):
    assert [m.id for m in client.models.list().data] == [lm.name]
    assert client.models.retrieve(lm.name).id == lm.name
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    metrics = live.metrics()
    assert {"requests", "prompt_tokens", "generated_tokens", "latency_seconds", "queue_depth"} <= metrics.keys()
    text = httpx.get(live.url + "/metrics", params={"format": "prometheus"}).text
    assert "edgepack_generated_tokens_total" in text and 'quantile="0.99"' in text


def test_completion_greedy_equals_generate(client, lm):
    expected = lm.generate(PROMPT, max_new_tokens=20, temperature=0)
    reply = client.completions.create(model=lm.name, prompt=PROMPT, max_tokens=20, temperature=0)
    choice = reply.choices[0]
    assert choice.text == expected
    assert choice.finish_reason in ("stop", "length")
    prompt_tokens = len(lm.encode_prompt(PROMPT))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert 1 <= reply.usage.completion_tokens <= 20
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    assert reply.object == "text_completion" and reply.model == lm.name


def test_completion_stream_equals_generate(client, lm):
    expected = lm.generate(PROMPT, max_new_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=lm.name, prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_greedy_equals_generate(client, lm):
    expected = lm.generate(MESSAGES, max_new_tokens=24, temperature=0)
    reply = client.chat.completions.create(model=lm.name, messages=MESSAGES, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(lm.encode_prompt(MESSAGES))  # through the chat template
    stream = client.chat.completions.create(
        model=lm.name, messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_stop_and_seed(client, lm):
    full = lm.generate(PROMPT, max_new_tokens=30, temperature=0)
    stop = full[6:9]
    assert len(stop) == 3, "the tiny model should say at least 9 characters"
    reply = client.completions.create(model=lm.name, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    # the runtime cuts at the stop string; text streamed before the stop string was complete stays
    assert reply.choices[0].text == lm.generate(PROMPT, max_new_tokens=30, temperature=0, stop=[stop])
    assert stop not in reply.choices[0].text and len(reply.choices[0].text) < len(full)
    assert reply.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(model=lm.name, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] == lm.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)


# --- refusals --------------------------------------------------------------------------------


def _assert_openai_error(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    assert error["param"] == param and error["code"] == code
    return error


@pytest.mark.parametrize(
    "path, body, param, code",
    [
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": -1}, "max_tokens", None),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens", None),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2.5}, "max_tokens", None),
        ("/v1/completions", {"prompt": PROMPT, "temperature": -0.1}, "temperature", None),
        ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature", None),
        ("/v1/completions", {"prompt": PROMPT, "top_p": 0}, "top_p", None),
        ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, "top_p", None),
        ("/v1/completions", {"prompt": PROMPT, "stop": [1, 2]}, "stop", None),
        ("/v1/completions", {"prompt": PROMPT, "n": 2}, "n", None),
        ("/v1/completions", {"max_tokens": 3}, "prompt", None),
        ("/v1/completions", {"prompt": "Paris " * 200}, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 500}, "prompt", "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": []}, "messages", None),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content", None),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": -5}, "max_completion_tokens", None),
    ],
)
def test_invalid_requests_get_openai_shaped_400(live, path, body, param, code):
    _assert_openai_error(httpx.post(live.url + path, json=body), 400, param, code)


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_400(live, content):
    headers = {"content-type": "application/json"}
    _assert_openai_error(httpx.post(live.url + "/v1/chat/completions", content=content, headers=headers), 400)


def test_oversized_body_is_413(live):
    body = b'{"prompt": "' + b"x" * (serve.DEFAULT_MAX_BODY_BYTES + 1) + b'"}'
    _assert_openai_error(httpx.post(live.url + "/v1/completions", content=body, timeout=30), 413)


def test_unknown_model_is_404(live, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert caught.value.code == "model_not_found"
    _assert_openai_error(httpx.get(live.url + "/v1/models/no-such-model"), 404, "model", "model_not_found")
    _assert_openai_error(httpx.get(live.url + "/v1/no-such-route"), 404)


def test_openai_client_sees_bad_requests(client, lm):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=lm.name, messages=[{"role": "user", "content": "Paris " * 200}])
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=lm.name, prompt=PROMPT, max_tokens=-3)
    assert caught.value.param == "max_tokens"


# --- queueing and disconnects ----------------------------------------------------------------


def test_full_queue_answers_503_with_retry_after(live, lm, monkeypatch):
    slow_down(monkeypatch, lm, 0.04)
    body = {"prompt": PROMPT, "max_tokens": 30, "min_tokens": 30, "stream": True}
    results: list[int] = []

    def occupy():  # one generating + two waiting fill max_queue=2
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as response:
            response.read()
            results.append(response.status_code)

    threads = [threading.Thread(target=occupy) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.15)  # in order: the first is generating before the others queue
    deadline = time.monotonic() + 10
    while live.metrics()["queue_depth"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    response = httpx.post(live.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=10)
    error = _assert_openai_error(response, 503, None, "queue_full")
    assert error["type"] == "server_overloaded"
    assert int(response.headers["retry-after"]) >= 1
    for t in threads:
        t.join(60)
    assert results == [200, 200, 200]
    assert live.metrics()["requests"]["rejected"] >= 1


def test_disconnect_mid_stream_stops_generation(live, lm, monkeypatch):
    slow_down(monkeypatch, lm, 0.05)  # 100 tokens would take 5 s
    client = live.client()
    before = live.metrics()
    stream = client.completions.create(
        model=lm.name, prompt=PROMPT, max_tokens=100, stream=True, extra_body={"min_tokens": 100}
    )
    received = 0
    for _chunk in stream:
        received += 1
        if received == 3:
            break
    stream.close()  # the client goes away mid-stream
    time.sleep(0.5)
    settled = live.metrics()["generated_tokens"]
    time.sleep(0.6)
    after = live.metrics()
    assert after["generated_tokens"] == settled, "the server went on generating for a client that left"
    assert settled - before["generated_tokens"] < 30
    assert after["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    assert not after["busy"]
    # and it keeps serving
    reply = client.completions.create(model=lm.name, prompt=PROMPT, max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens >= 1


def test_disconnect_while_queued_drops_the_request(live, lm, monkeypatch):
    slow_down(monkeypatch, lm, 0.05)
    busy = threading.Thread(
        target=lambda: httpx.post(
            live.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "min_tokens": 20}, timeout=30
        )
    )
    busy.start()
    time.sleep(0.3)
    before = live.metrics()
    with pytest.raises(httpx.ReadTimeout):  # waits in the queue, then the client gives up
        httpx.post(live.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "min_tokens": 20},
                   timeout=0.3)
    busy.join(30)
    time.sleep(0.5)
    after = live.metrics()
    assert after["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    # only the first request's 20 tokens were generated: the abandoned one never started
    assert after["generated_tokens"] - before["generated_tokens"] <= 20


# --- the command -----------------------------------------------------------------------------


def test_importing_serve_does_not_import_the_http_stack():
    code = "import sys, edgepack.serve; print([m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_http_stack_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    with pytest.raises(MissingDependencyError) as caught:
        serve._require_serve_packages()
    assert caught.value.hint == "pip install 'edgepack[serve]'"


def test_resolve_bundle(packed, tmp_path, monkeypatch):
    bundle = packed("llama", 8)
    assert serve.resolve_bundle(str(bundle)) == bundle
    with pytest.raises(SourceNotFoundError):
        serve.resolve_bundle(str(tmp_path / "missing"))
    monkeypatch.setitem(sys.modules, "edgepack.hub", None)
    with pytest.raises(MissingDependencyError):
        serve.resolve_bundle("someone/some-bundle")


def test_cli_refuses_a_missing_bundle(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "edgepack.cli", "serve", str(tmp_path / "nope"), "--port", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "error:" in result.stderr and "Traceback" not in result.stderr


# --- the container ---------------------------------------------------------------------------


# The runtime image: the engine, no torch (171 MB measured; with torch it was 1.5 GB).
MAX_IMAGE_BYTES = 250_000_000


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="podman build --isolation=chroot needs root")
@pytest.mark.skipif(shutil.which("podman") is None and shutil.which("apt-get") is None,
                    reason="needs podman, which build-local.sh installs with apt-get")
def test_docker_image_answers_a_completion(packed, request):
    """docker/build-local.sh installs podman (apt-get) when missing, builds the CPU image
    offline (minutes the first time, then cached), runs it on an 8-bit, an int4 and a
    16-bit bundle and asks each for a completion. Runs only under `-m slow`."""
    if "slow" not in (request.config.getoption("markexpr") or "") or "not slow" in request.config.getoption("markexpr"):
        pytest.skip("builds a container image (minutes): select with -m slow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def untagged_images():
        if shutil.which("podman") is None:  # not installed yet: nothing to leave behind
            return set()
        out = subprocess.run(["podman", "images", "-q", "--filter", "dangling=true"],
                             capture_output=True, text=True, check=True).stdout
        return set(out.split())

    before = untagged_images()
    bundles = [packed("llama", 8), packed("llama", 4, quant_type="int4"), packed("llama", 16)]
    image = os.environ.get("EDGEPACK_IMAGE", "localhost/edgepack:cpu")
    result = subprocess.run(
        ["bash", str(REPO / "docker" / "build-local.sh"), *map(str, bundles)],
        env={**os.environ, "EDGEPACK_PORT": str(port), "PYTHON": sys.executable, "EDGEPACK_IMAGE": image},
        capture_output=True, text=True, timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # stdout also carries podman build's output; the completions are its JSON lines
    replies = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"id"')]
    assert len(replies) == 3
    for reply in replies:
        assert reply["object"] == "text_completion" and reply["usage"]["completion_tokens"] >= 1
    inspect = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}} {{.Config.User}} {{.Config.Healthcheck}}",
                              image], capture_output=True, text=True, check=True).stdout.split(maxsplit=2)
    assert int(inspect[0]) <= MAX_IMAGE_BYTES and inspect[1] == "10001" and "/health" in inspect[2]
    # with the script's containers.conf and runtime: podman's defaults fail in this sandbox
    work = os.environ.get("EDGEPACK_BUILD_DIR", "/var/tmp/edgepack-build")
    no_torch = subprocess.run(["podman", "--runtime", "runc", "run", "--rm", image, "python3", "-c", "import torch"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "CONTAINERS_CONF": f"{work}/containers.conf"})
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    # A rebuild leaves no untagged images behind: each run used to leave ~3 GB of them,
    # until CI's disk filled up.
    assert untagged_images() <= before
