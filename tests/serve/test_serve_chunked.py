"""Chunked prefill in `edgepack serve`: a joining prompt is computed a piece at a time between
the running streams' decode steps, with the answers of computing it whole."""

import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from edgepack import serve  # noqa: E402
from edgepack.runtime.engine import c_module_unavailable  # noqa: E402
from edgepack.serve import worker as worker_module  # noqa: E402
from test_serve_batching import Live  # noqa: E402  (same folder)
from tiny import CORPUS  # noqa: E402

pytestmark = pytest.mark.skipif(c_module_unavailable() is not None, reason="the C engine cannot run here")
LONG = " ".join([CORPUS[0], CORPUS[1], CORPUS[3]])  # 88 tokens of the tiny tokenizer: 11 pieces of 8
ODD = LONG + " The"  # 89 tokens: 10 pieces of 8, then 9 (a last piece of one would be a decode step)
SHORT = "Once upon a time"
CHUNK = 8


@pytest.fixture(scope="module")
def lm(packed):
    from edgepack.runtime import load

    lm = load(packed("llama", 8))
    assert lm.backend == "native"
    return lm


@pytest.fixture(scope="module")
def family_lm(tmp_path_factory):
    """family -> a loaded 8-bit bundle of tests/families.py's tiny model."""
    from edgepack.export.pack import pack
    from edgepack.runtime import load
    from families import make_family_model
    from tiny import make_tokenizer

    root, done = tmp_path_factory.mktemp("chunked-families"), {}

    def get(family):
        if family not in done:
            tokenizer = make_tokenizer()
            make_family_model(family, len(tokenizer)).save_pretrained(root / family)
            tokenizer.save_pretrained(root / family)
            pack(str(root / family), root / f"{family}-8", bits=8)
            done[family] = load(root / f"{family}-8")
            assert done[family].backend == "native"
        return done[family]

    return get


def _in_pieces(model, ids, size):
    cache = model.new_cache(128)
    for a in range(0, len(ids), size):
        logits = model.forward(ids[a : a + size], cache)
    return cache, bytes(logits)


@pytest.mark.parametrize("family", ["gemma3", "mistral-sw", "phi4-mini"])
def test_prompt_pieces_write_what_a_whole_pass_does(family_lm, family):
    """Consecutive forward calls append to the cache; a sliding-window ring wraps across them
    (window 8, pieces of 5, 8 and 24); a longrope model's pieces agree only below its switch."""
    from families import ORIGINAL_MAX

    lm = family_lm(family)
    model = lm.model
    ids = lm.encode_prompt(LONG)
    short = ids[: ORIGINAL_MAX - 2] if model.long_rope_from else ids
    whole = model.new_cache(128)
    expected = bytes(model.forward(short, whole))
    steps = [bytes(model.forward([t], whole)) for t in (5, 6, 7)]
    for size in (5, CHUNK, 24):
        cache, logits = _in_pieces(model, short, size)
        assert logits == expected and cache.length == len(short)
        assert [bytes(model.forward([t], cache)) for t in (5, 6, 7)] == steps  # the cache holds the same keys
    if model.long_rope_from:
        assert len(ids) > model.long_rope_from == ORIGINAL_MAX
        assert _in_pieces(model, ids, CHUNK)[1] != bytes(model.forward(ids, model.new_cache(128)))


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi4-mini"])
def test_chunked_answers_equal_whole_prompts(lm, family_lm, family, monkeypatch):
    """Greedy texts with pieces of 8 are those of the whole prompt (and of EdgeModel.generate);
    phi4-mini's prompts past its longrope switch (64) are computed at once."""
    model = lm if family == "llama" else family_lm(family)
    prompts = [ODD, LONG[:150], SHORT]  # 89, 60 and 12 tokens
    expected = [model.generate(p, max_new_tokens=12, temperature=0) for p in prompts]
    sizes, forward = [], model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda ids, cache: sizes.append(len(ids)) or forward(ids, cache))
    for chunk in (CHUNK, 0):
        with Live(serve.create_app(model, parallel=2, cache_bytes=0, prefill_chunk=chunk)) as live:
            replies = [None] * len(prompts)

            def ask(i):
                body = {"prompt": prompts[i], "max_tokens": 12, "temperature": 0}
                replies[i] = live.post("/v1/completions", body)["choices"][0]["text"]

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert live.metrics()["prefix_computed_tokens"] == sum(len(model.encode_prompt(p)) for p in prompts)
        assert replies == expected, f"prefill_chunk {chunk}"
        if chunk:
            pieces = sorted(n for n in sizes if n > 1)
            whole = family == "phi4-mini"
            assert pieces == sorted(([89] if whole else [CHUNK] * 10 + [9]) + [CHUNK] * 7 + [4] + [CHUNK, 4])


class Recorder:
    """The worker thread's calls in order: ("piece", cache, tokens), ("step", caches), ("send",
    prompt, item), and the gauges seen during each piece."""

    def __init__(self, monkeypatch, lm, worker, fail_piece=None, piece_seconds=0.0, step_seconds=0.02):
        self.events, self.gauges = [], []
        forward, step_batch, send = lm.model.forward, lm.model.step_batch, worker_module._send

        def piece(tokens, cache):
            self.events.append(("piece", cache, len(tokens)))
            self.gauges.append(worker.gauges())
            if fail_piece is not None and len([e for e in self.events if e[:2] == ("piece", cache)]) == fail_piece:
                raise RuntimeError("this piece failed")
            time.sleep(piece_seconds)
            return forward(tokens, cache)

        def step(tokens, caches):
            self.events.append(("step", list(caches)))
            time.sleep(step_seconds)  # so the running stream outlasts the long prompt's pieces
            return step_batch(tokens, caches)

        def sending(job, item):
            self.events.append(("send", job.request.prompt, item))
            return send(job, item)

        monkeypatch.setattr(lm.model, "forward", piece)
        monkeypatch.setattr(lm.model, "step_batch", step)
        monkeypatch.setattr(worker_module, "_send", sending)

    def pieces(self, prompt_cache):
        return [i for i, e in enumerate(self.events) if e[0] == "piece" and e[1] is prompt_cache]


def _stream_first_then(live, body, then):
    """Stream ``body``; once its first token is in, call ``then``; return the streamed text."""
    import json

    text, started = [], False
    with httpx.stream("POST", live.url + "/v1/completions", json=dict(body, stream=True), timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text.append(json.loads(line[6:])["choices"][0]["text"])
            if not started:
                started = True
                then()
    return "".join(text)


def test_running_stream_gets_tokens_between_the_pieces(lm, monkeypatch):
    expected = [lm.generate(SHORT, max_new_tokens=60, min_new_tokens=60, temperature=0),
                lm.generate(LONG, max_new_tokens=6, temperature=0)]
    app = serve.create_app(lm, parallel=2, cache_bytes=0, prefill_chunk=CHUNK)
    rec = Recorder(monkeypatch, lm, app.state.worker)
    running = {"prompt": SHORT, "max_tokens": 60, "min_tokens": 60, "temperature": 0}  # 12 tokens: 8, then 4
    late = {}
    with Live(app) as live:
        def arrive():
            late["thread"] = threading.Thread(target=lambda: late.update(reply=live.post(
                "/v1/completions", {"prompt": LONG, "max_tokens": 6, "temperature": 0})))
            late["thread"].start()

        text = _stream_first_then(live, running, arrive)
        late["thread"].join(60)
        metrics = live.metrics()
    n = len(lm.encode_prompt(LONG))
    long_cache = [e[1] for e in rec.events if e[0] == "piece"][-1]
    pieces = rec.pieces(long_cache)
    sizes = [rec.events[i][2] for i in pieces]
    # pieces of 8; the last takes the rest, one more at most (a one-token piece would be a decode step)
    assert sum(sizes) == n and set(sizes[:-1]) == {CHUNK} and 2 <= sizes[-1] <= CHUNK + 1 and len(pieces) >= 10
    for a, b in zip(pieces, pieces[1:]):  # between two pieces: one step of the running stream, its token sent
        between = rec.events[a + 1 : b]
        assert [e[0] for e in between] == ["step", "send"] and between[1][1] == SHORT
        assert long_cache not in between[0][1]
    first_late = next(i for i, e in enumerate(rec.events) if e[0] == "send" and e[1] == LONG)
    assert pieces[-1] < first_late  # its first token comes after its last piece
    assert all(g["slots_in_use"] == 2 and g["slots_prefilling"] == 1 for g in rec.gauges[-len(pieces):])
    assert [text, late["reply"]["choices"][0]["text"]] == expected
    assert metrics["slots_prefilling"] == 0 and metrics["slots_in_use"] == 0


def test_cancel_while_prefilling_frees_the_slot(lm, monkeypatch):
    expected = lm.generate(LONG, max_new_tokens=4, temperature=0)
    app = serve.create_app(lm, parallel=1, prefill_chunk=4)  # one slot: the next request needs it back
    rec = Recorder(monkeypatch, lm, app.state.worker, piece_seconds=0.05)  # 22 pieces: ~1.1 s
    with Live(app) as live:
        before = live.metrics()
        with pytest.raises(httpx.ReadTimeout):  # the client leaves during the prompt
            httpx.post(live.url + "/v1/completions", json={"prompt": LONG, "max_tokens": 4}, timeout=0.4)
        deadline = time.monotonic() + 10
        while live.metrics()["slots_in_use"] and time.monotonic() < deadline:
            time.sleep(0.05)
        after = live.metrics()
        computed = len(rec.events)
        assert after["slots_in_use"] == 0 and after["slots_prefilling"] == 0
        assert after["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
        assert after["generated_tokens"] == before["generated_tokens"]
        assert 1 <= computed < len(lm.encode_prompt(LONG)) // 4, "its prompt went on after the client left"
        assert after["held_caches"] == 1  # what was computed is held for a retry
        reply = live.post("/v1/completions", {"prompt": LONG, "max_tokens": 4, "temperature": 0})
        assert live.metrics()["prefix_reused_tokens"] >= 4 * (computed - 1)
    assert reply["choices"][0]["text"] == expected


def test_cancel_while_waiting_for_pieces_frees_the_slot_at_once(lm, monkeypatch):
    """A request whose prompt waits behind another's pieces leaves as soon as it is cancelled."""
    app = serve.create_app(lm, parallel=2, cache_bytes=0, prefill_chunk=4)
    rec = Recorder(monkeypatch, lm, app.state.worker, piece_seconds=0.1)  # the first prompt: ~2.2 s
    with Live(app) as live:
        first = threading.Thread(target=live.post, args=("/v1/completions", {"prompt": LONG, "max_tokens": 2}))
        first.start()
        while not rec.events:
            time.sleep(0.01)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", json={"prompt": ODD, "max_tokens": 2}, timeout=0.4)
        first.join(60)
        assert live.metrics()["requests"]["cancelled"] == 1
    caches = {id(e[1]) for e in rec.events if e[0] == "piece"}
    assert len(caches) == 1, "the cancelled prompt was computed"
    in_use = [g["slots_in_use"] for g in rec.gauges]
    assert 2 in in_use and in_use[-1] == 1  # gone before the first prompt's last piece


def test_a_failing_piece_ends_that_request_only(lm, monkeypatch):
    expected = lm.generate(SHORT, max_new_tokens=30, min_new_tokens=30, temperature=0)
    app = serve.create_app(lm, parallel=2, cache_bytes=0, prefill_chunk=CHUNK)
    Recorder(monkeypatch, lm, app.state.worker, fail_piece=3)  # the long prompt's third piece
    running = {"prompt": SHORT, "max_tokens": 30, "min_tokens": 30, "temperature": 0}
    late = {}
    with Live(app) as live:
        def arrive():
            late["thread"] = threading.Thread(target=lambda: late.update(response=httpx.post(
                live.url + "/v1/completions", json={"prompt": LONG, "max_tokens": 6}, timeout=60)))
            late["thread"].start()

        text = _stream_first_then(live, running, arrive)
        late["thread"].join(60)
        assert live.metrics()["slots_in_use"] == 0
    assert late["response"].status_code == 500 and "RuntimeError" in late["response"].text
    assert text == expected


def test_prefill_chunk_option_reaches_the_worker(packed, monkeypatch, capsys):
    from edgepack.cli import main as cli_main

    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: apps.append(self.config.app))
    bundle = str(packed("llama", 8))
    for args, expected in (([], worker_module.DEFAULT_PREFILL_CHUNK), (["--prefill-chunk", "16"], 16),
                           (["--prefill-chunk", "0"], 0)):
        assert cli_main(["serve", bundle, "--port", "0", *args]) == 0
        assert apps[-1].state.worker.prefill_chunk == expected
    for bad in ("1", "-8"):
        assert cli_main(["serve", bundle, "--prefill-chunk", bad]) != 0
        err = capsys.readouterr().err
        assert "error: --prefill-chunk must be 0 or at least 2" in err and "hint:" in err and "Traceback" not in err
