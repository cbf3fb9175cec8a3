"""Continuous batching and prefix reuse in `edgepack serve`: concurrent streams and reused
KV caches give exactly the answers of serving each request alone from scratch."""

import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from edgepack import serve  # noqa: E402
from edgepack.runtime.engine import c_module_unavailable  # noqa: E402
from test_serve import LiveServer  # noqa: E402  (same folder)

pytestmark = pytest.mark.skipif(c_module_unavailable() is not None, reason="the C engine cannot run here")
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at one"]


class Live(LiveServer):
    """test_serve's live server, answering plain HTTP posts."""

    def post(self, path, body):
        response = httpx.post(self.url + path, json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def lm(packed):
    from edgepack.runtime import load

    lm = load(packed("llama", 8))
    assert lm.backend == "native"
    return lm


@pytest.fixture(params=[32, 8], ids=["float-activations", "int8-activations"])
def activation_bits(request):
    """Both activation modes of decode steps (EDGEPACK_ACTIVATION_BITS), alone and batched."""
    from edgepack.runtime.engine import _engine

    previous = _engine.activation_bits(request.param)
    yield request.param
    _engine.activation_bits(previous)


def test_concurrent_streams_equal_alone(lm, monkeypatch, activation_bits):
    bodies = [{"prompt": p, "max_tokens": 24, "temperature": 0} for p in PROMPTS]
    bodies.append({"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 5})
    expected = [lm.generate(p, max_new_tokens=24, temperature=0) for p in PROMPTS]
    expected.append(lm.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=5))
    widths = []
    step_batch = lm.model.step_batch

    def recording(tokens, caches):
        widths.append(len(tokens))
        time.sleep(0.01)  # so the requests overlap
        return step_batch(tokens, caches)

    monkeypatch.setattr(lm.model, "step_batch", recording)
    with Live(serve.create_app(lm, parallel=4, cache_bytes=0)) as live:
        replies = [None] * len(bodies)

        def ask(i):
            replies[i] = live.post("/v1/completions", bodies[i])["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = httpx.get(live.url + "/metrics").json()
    assert replies == expected
    assert max(widths) == 4, "four requests should have been stepped together"
    assert metrics["slots"] == 4 and metrics["slots_in_use"] == 0


def _chat(live, turns, max_tokens=6):  # the tiny model has a 128-token context
    messages, replies = [{"role": "system", "content": "Be terse."}], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        reply = live.post("/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens, "temperature": 0})
        text = reply["choices"][0]["message"]["content"]
        replies.append(text)
        messages.append({"role": "assistant", "content": text})
    return replies, messages


def test_prefix_reuse_gives_the_same_answers(lm):
    turns = ["Hi", "Paris?", "Rome?", "Bye"]
    with Live(serve.create_app(lm, parallel=2, cache_bytes=0)) as live:
        plain, _ = _chat(live, turns)
        assert httpx.get(live.url + "/metrics").json()["prefix_reused_tokens"] == 0
    with Live(serve.create_app(lm, parallel=2)) as live:
        reused, messages = _chat(live, turns)
        metrics = httpx.get(live.url + "/metrics").json()
    assert reused == plain
    # each later turn reuses at least the system prompt and the first turn
    assert metrics["prefix_reused_tokens"] >= 3 * len(lm.encode_prompt(messages[:2]))
    assert metrics["held_caches"] >= 1 and metrics["held_cache_bytes"] > 0
    assert metrics["prefix_computed_tokens"] + metrics["prefix_reused_tokens"] == metrics["prompt_tokens"]
    assert lm.generate(messages[:-1], max_new_tokens=6, temperature=0) == reused[-1]


def test_held_caches_stay_within_the_budget(lm):
    from edgepack.serve.prefix import PrefixStore

    store = PrefixStore(lm.model, budget_bytes=0, max_positions=lm.max_positions)
    per_token = store.bytes_per_token
    store.budget_bytes = 40 * per_token
    for start in range(5):  # five unrelated 12-token prompts: only three fit in 40 tokens
        cache, reused = store.take(list(range(start * 20 + 3, start * 20 + 15)), 32)
        assert reused == 0
        lm.model.forward(list(range(start * 20 + 3, start * 20 + 15)), cache)
        store.give(cache, list(range(start * 20 + 3, start * 20 + 15)), [])
    assert len(store.held) == 3 and store.held_bytes <= store.budget_bytes
    assert [h.tokens[0] for h in store.held] == [43, 63, 83]  # least recently used went first
    cache, reused = store.take(list(range(43, 55)) + [9, 9], 32)
    assert reused == 12 and cache.length == 12


def test_held_caches_count_the_positions_written(lm):
    """A cache cut back to its prompt keeps the pages its reply wrote: they count."""
    from edgepack.serve.prefix import PrefixStore

    store = PrefixStore(lm.model, budget_bytes=1 << 30, max_positions=lm.max_positions)
    prompt = list(range(3, 15))
    cache, _ = store.take(prompt, 40)
    lm.model.forward(prompt + [7] * 10, cache)  # the prompt and ten generated positions
    store.give(cache, prompt, [7] * 10)
    assert store.held[0].cache.length == 12 and store.held_bytes == 22 * store.bytes_per_token
    cache, reused = store.take(prompt + [5, 6], 40)  # the conversation goes on in the same cache
    assert reused == 12
    store.give(cache, prompt + [5, 6], [])
    assert store.held_bytes == 22 * store.bytes_per_token  # still 22 written, though 14 are kept


def test_default_parallel_follows_the_memory_left(lm, monkeypatch):
    from edgepack.plan.serving import headroom_bytes
    from edgepack.serve import memory
    from edgepack.serve.memory import default_parallel, server_memory

    sizes = {"context": lm.max_positions, "cache_bytes": 0, "max_body_bytes": 1 << 20}
    peak3 = server_memory(lm, parallel=3, **sizes).peak_bytes
    assert default_parallel(lm, budget_bytes=1 << 40, **sizes) == 4
    assert default_parallel(lm, budget_bytes=peak3 + headroom_bytes(peak3), **sizes) == 3
    assert default_parallel(lm, budget_bytes=0, **sizes) == 1
    monkeypatch.setattr(memory, "memory_for_serving", lambda: peak3 + headroom_bytes(peak3))
    assert serve.create_app(lm, max_body_bytes=1 << 20, cache_bytes=0).state.worker.parallel == 3  # the default


def test_context_option_bounds_requests(lm):
    app = serve.create_app(lm, context=16, parallel=1)
    assert app.state.worker.prefixes.max_positions == 16 and app.state.memory.context == 16
    with Live(app) as live:
        response = httpx.post(live.url + "/v1/completions", json={"prompt": "The capital of France is",
                                                                   "max_tokens": 64}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        assert "maximum context length is 16 tokens" in response.json()["error"]["message"]
        live.post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4})


@pytest.mark.parametrize("option, value", [("--context", "1"), ("--parallel", "0"), ("--cache-bytes", "-1")])
def test_bad_serve_numbers_are_one_line_errors(packed, capsys, option, value):
    from edgepack.cli import main as cli_main

    assert cli_main(["serve", str(packed("llama", 8)), option, value]) != 0
    err = capsys.readouterr().err
    assert f"error: {option} must be" in err and "hint:" in err and "Traceback" not in err
