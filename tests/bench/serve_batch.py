"""Continuous batching and prefix reuse of `edgepack serve`, measured on loopback.

    .venv/bin/python tests/bench/serve_batch.py /tmp/serving-8 [--rounds 2] [--activation-bits 8] [--server-process]

Prints, per round (A/B alternated, the box may be noisy; the load average beside each line):
- 4 greedy streams one at a time vs together (--parallel 4): aggregate tokens/s (all completion
  tokens over the wall time, prompts included), the ratio; the decode-only ratio (tokens after
  the first over the time from first token to last: one at a time, summed over the requests;
  together, from the first stream's first token to the last stream's end, later prompts
  included); p50/p99 time to first token under load, and whether the texts are identical;
  with --server-process also tokens per CPU-second of the server process (what a token
  costs where other programs share the cores); with several rounds, the median ratios;
- a 10-turn chat (~1,500 tokens of history at the last turn): the last turn's time to first
  token with prefix reuse vs without (--cache-bytes 0).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from edgepack import serve
from edgepack.runtime import load
from edgepack.serve.guard import server_config

PROMPTS = ["Write a story about a dragon.", "Explain how a CPU cache works.", "List ten fruits and their colors.",
           "Describe the city of Paris."]
FILLER = ("Here is some background about my project: I am building a small garden with tomatoes, basil, "
          "peppers and a few herbs; the soil is sandy and the summers are hot and dry. ")


class Live:
    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(server_config(app, host="127.0.0.1", port=0, max_queue=8, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def stream(url, path, body):
    """(text, seconds to first token, seconds in all, completion tokens, perf_counter at start)"""
    t0, first, pieces, usage = time.perf_counter(), None, [], 0
    body = dict(body, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", url + path, json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                pieces.append(piece)
    return "".join(pieces), first, time.perf_counter() - t0, usage, t0


class Process:
    """`edgepack serve` in a process of its own, as users run it: this one's client threads
    share no GIL with its worker and event loop. Ended by its pid."""

    def __init__(self, bundle, parallel, cache_bytes, activation_bits):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, **({"EDGEPACK_ACTIVATION_BITS": str(activation_bits)} if activation_bits else {}))
        self.cmd = [sys.executable, "-m", "edgepack.cli", "serve", str(bundle), "--port", str(port), "--parallel",
                    str(parallel), "--cache-bytes", str(cache_bytes), "--log-level", "warning", "--no-verify"]
        self.env = env

    def __enter__(self):
        self.server = subprocess.Popen(self.cmd, env=self.env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.server.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.__exit__()
        raise SystemExit("the server did not come up in 120 s")

    def cpu_seconds(self) -> float:
        """CPU time the server has used, all its threads (what a token costs when the box is busy)"""
        with open(f"/proc/{self.server.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc):
        self.server.terminate()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()


def streams(lm, n_tokens, together, server=None):
    """server: a function (parallel) -> a Process to run against, else the app in this process"""
    bodies = [{"prompt": p, "max_tokens": n_tokens, "min_tokens": n_tokens, "temperature": 0} for p in PROMPTS]
    parallel = 4 if together else 1
    with (server(parallel) if server else Live(serve.create_app(lm, parallel=parallel, cache_bytes=0))) as live:
        results = [None] * len(bodies)
        cpu0 = live.cpu_seconds() if server else None
        t0 = time.perf_counter()
        if together:
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(live.url, "/v1/completions", bodies[i])))
                       for i in range(len(bodies))]
            [t.start() for t in threads]
            [t.join() for t in threads]
        else:
            for i, b in enumerate(bodies):
                results[i] = stream(live.url, "/v1/completions", b)
        wall = time.perf_counter() - t0
        cpu = live.cpu_seconds() - cpu0 if server else None
    tokens = sum(r[3] for r in results)
    after_first = sum(r[3] - 1 for r in results)
    if together:  # from the first token of any stream to the end of the last
        decode_s = max(r[4] + r[2] for r in results) - min(r[4] + r[1] for r in results)
    else:
        decode_s = sum(r[2] - r[1] for r in results)
    return [r[0] for r in results], tokens / wall, [r[1] for r in results], after_first / decode_s, tokens / cpu if cpu else None


def chat(lm, cache_bytes, turns=10, words=110):
    messages, ttft = [{"role": "system", "content": "You are a helpful gardening assistant."}], None
    with Live(serve.create_app(lm, parallel=1, cache_bytes=cache_bytes)) as live:
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Turn {turn}. " + " ".join((FILLER * 4).split()[:words])})
            text, ttft, *_ = stream(live.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 24,
                                                                        "temperature": 0})
            messages.append({"role": "assistant", "content": text})
            time.sleep(0.3)  # a user reads and types; the server recomputes the reply meanwhile
        metrics = httpx.get(live.url + "/metrics").json()
    return ttft, len(lm.encode_prompt(messages[:-1])), metrics["prefix_reused_tokens"], text


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bundle", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--skip", choices=["chat", "streams"], default=None)
    p.add_argument("--activation-bits", type=int, choices=[32, 8], default=None,
                   help="activations into int8 products of decode steps (EDGEPACK_ACTIVATION_BITS); default: the engine's")
    p.add_argument("--server-process", action="store_true",
                   help="streams against `edgepack serve` in a process of its own (default: the app in this one)")
    args = p.parse_args()
    lm = load(args.bundle)
    if args.activation_bits and lm.backend == "native":
        from edgepack.runtime.engine import _engine

        _engine.activation_bits(args.activation_bits)
    if lm.backend == "native":
        from edgepack.runtime.engine import _engine

        print(f"activation bits {_engine.activation_bits()}, isa {_engine.set_isa()}", flush=True)
    ratios, decode_ratios, cpu_ratios, all_identical = [], [], [], True
    for r in range(args.rounds):
        if args.skip != "streams":
            server = (lambda n: Process(args.bundle, n, 0, args.activation_bits)) if args.server_process else None
            texts1, rate1, _, decode1, per_cpu1 = streams(lm, args.tokens, together=False, server=server)
            texts4, rate4, firsts, decode4, per_cpu4 = streams(lm, args.tokens, together=True, server=server)
            if per_cpu1:
                cpu_ratios.append(per_cpu4 / per_cpu1)
            firsts = sorted(firsts)
            ratios.append(rate4 / rate1)
            decode_ratios.append(decode4 / decode1)
            all_identical &= texts1 == texts4
            print(f"round {r}: one at a time {rate1:.1f} tok/s, 4 together {rate4:.1f} tok/s, ratio {rate4 / rate1:.2f} "
                  f"(decode only {decode1:.1f} vs {decode4:.1f}, {decode4 / decode1:.2f}), identical {texts1 == texts4}, "
                  f"TTFT p50 {statistics.median(firsts):.3f} s p99 {firsts[-1]:.3f} s, load {_load()}"
                  + (f"; tokens per server CPU-second {per_cpu1:.1f} vs {per_cpu4:.1f}, {per_cpu4 / per_cpu1:.2f}"
                     if per_cpu1 else ""), flush=True)
        if args.skip != "chat":
            off = chat(lm, 0)
            on = chat(lm, 512 << 20)
            print(f"round {r}: chat last turn ({on[1]} prompt tokens): TTFT without reuse {off[0]:.3f} s, with "
                  f"{on[0]:.3f} s, ratio {on[0] / off[0]:.3f}, reused {on[2]} tokens, same last reply {on[3] == off[3]}", flush=True)
    if len(ratios) > 1:
        print(f"median of {len(ratios)} rounds: ratio {statistics.median(ratios):.2f} (decode only "
              f"{statistics.median(decode_ratios):.2f}), all texts identical {all_identical}"
              + (f"; per server CPU-second {statistics.median(cpu_ratios):.2f}" if cpu_ratios else ""), flush=True)


def _load() -> str:
    """the 1-minute load average (this box's other programs share its cores)"""
    try:
        return "%.2f" % os.getloadavg()[0]
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
