"""Chunked prefill in `edgepack serve`: one greedy stream decoding while a ~2,000-token prompt
arrives, against `edgepack serve` in a process of its own (as users run it), per --prefill-chunk.

    flock /work/wt/bench.lock .venv/bin/python tests/bench/serve_chunked.py /tmp/serving-8 --chunks 0 32

Prints per chunk size: the running stream's longest gap between two tokens, its median gap
while the long prompt was computed and the tokens it got meanwhile, and the long request's
time to first token (the load average beside each line: the box may be shared).
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from serve_batch import FILLER, Process, _load  # same folder

RUNNING = "Write a long story about a dragon who learns to bake bread."


def timed_stream(url, body, times):
    """Stream ``body``, appending the perf_counter of each piece of text to ``times``; its
    prompt tokens."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    prompt_tokens = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if any(c.get("text") for c in chunk.get("choices", [])):
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
    return prompt_tokens


def one(bundle, chunk, long_prompt, tokens, after):
    server = Process(bundle, 2, 0, None)
    server.cmd += ["--prefill-chunk", str(chunk)]
    with server as live:
        stream_times, long_times = [], []
        body = {"prompt": RUNNING, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
        running = threading.Thread(target=timed_stream, args=(live.url, body, stream_times))
        running.start()
        while len(stream_times) < after and running.is_alive():
            time.sleep(0.005)
        sent = time.perf_counter()
        prompt_tokens = timed_stream(live.url, {"prompt": long_prompt, "max_tokens": 8, "temperature": 0}, long_times)
        running.join()
    first = long_times[0]
    gaps = [b - a for a, b in zip(stream_times, stream_times[1:])]
    during = [b - a for a, b in zip(stream_times, stream_times[1:]) if b > sent and a < first]
    got = sum(1 for t in stream_times if sent < t < first)
    return {"chunk": chunk, "ttft": first - sent, "max_gap": max(gaps), "median_gap_during": statistics.median(during)
            if during else None, "tokens_during": got, "prompt_tokens": prompt_tokens,
            "still_running": stream_times[-1] > first}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bundle", type=Path)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 32])
    p.add_argument("--words", type=int, default=1650, help="words of the long prompt (~1.2 tokens each)")
    p.add_argument("--tokens", type=int, default=300, help="tokens of the running stream")
    p.add_argument("--after", type=int, default=20, help="the running stream's tokens before the long prompt comes")
    args = p.parse_args()
    long_prompt = "Summarize this. " + " ".join((FILLER * (args.words // 20 + 1)).split()[: args.words])
    for chunk in args.chunks:
        r = one(args.bundle, chunk, long_prompt, args.tokens, args.after)
        during = "-" if r["median_gap_during"] is None else f"{r['median_gap_during']:.3f} s"
        print(f"--prefill-chunk {chunk:3d}: long prompt {r['prompt_tokens']} tokens, "
              f"time to first token {r['ttft']:.2f} s; running stream: longest gap {r['max_gap']:.3f} s, "
              f"median gap meanwhile {during}, {r['tokens_during']} tokens meanwhile"
              f"{'' if r['still_running'] else ' (it ended before the long prompt did)'}; load {_load()}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
