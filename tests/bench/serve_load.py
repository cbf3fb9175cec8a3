"""Load test of `edgepack serve` on loopback: many concurrent streaming clients against one
server whose queue is smaller than the crowd.

    .venv/bin/python tests/bench/serve_load.py                 # a tiny random-weight bundle
    .venv/bin/python tests/bench/serve_load.py --bundle smollm2-8bit --max-tokens 64

Checks: every request either streams to `data: [DONE]` or gets 503 (nothing else: no
resets, no 500s); the server answers /health afterwards; its RSS comes back near the idle
level (a burst must cost latency, not memory). Prints requests/s, tokens/s, p50/p99
latency, the 503 count and RSS idle/peak/after; exits 1 if a check fails.

Bounded: --clients x --requests-per-client requests at most, stopped after --duration
seconds, only to 127.0.0.1, and the server (a subprocess) is ended by its pid.
"""

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
PROMPT = "The capital of France is"


def tiny_bundle(out: Path) -> Path:
    """The test suite's tiny Llama, packed at 8 bits (no network)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import make_model, make_tokenizer

    from edgepack.export.pack import pack

    tokenizer = make_tokenizer()
    with tempfile.TemporaryDirectory() as src:
        make_model("llama", len(tokenizer)).save_pretrained(src)
        tokenizer.save_pretrained(src)
        pack(src, out, bits=8)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, max_queue: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgepack.cli", "serve", str(bundle), "--port", str(port),
           "--max-queue", str(max_queue), "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not come up in 120 s")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.process, self.every_s = psutil.Process(pid), every_s
        self.peak = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every_s)


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code, "retry_after": response.headers.get("retry-after")}
            done = False
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return {"status": "stream-error", "error": chunk["error"]}
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            if not done:
                return {"status": "truncated"}
    except httpx.HTTPError as exc:
        return {"status": type(exc).__name__}
    return {"status": 200, "latency_s": time.perf_counter() - t0, "tokens": tokens}


async def crowd(url: str, args) -> tuple[list[dict], float]:
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "min_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    deadline = time.monotonic() + args.duration
    results: list[dict] = []
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.duration + 30, limits=limits) as client:

        async def user():
            for _ in range(args.requests_per_client):
                if time.monotonic() > deadline:
                    return
                result = await one_request(client, body)
                results.append(result)
                if result["status"] == 503:  # back off as told, as a polite client does
                    await asyncio.sleep(min(float(result["retry_after"] or 1), 2.0))

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(args.clients)))
        return results, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, as the server's /metrics."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: pack a tiny one)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--duration", type=float, default=120.0, help="stop sending new requests after this many seconds")
    p.add_argument("--rss-tolerance-mib", type=float, default=64.0, help="allowed RSS growth after the load")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or tiny_bundle(Path(tmp) / "tiny-llama-8")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(bundle, port, args.max_queue)
        try:
            # warm up (first-call allocations, lazy imports), then take the idle level
            httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": args.max_tokens}, timeout=60)
            time.sleep(1.0)
            process = psutil.Process(server.pid)
            rss_idle = process.memory_info().rss
            sampler = RssSampler(server.pid)
            sampler.start()
            results, wall_s = asyncio.run(crowd(url, args))
            sampler.done.set()
            sampler.join()
            time.sleep(2.0)
            rss_after = process.memory_info().rss
            health = httpx.get(url + "/health", timeout=10)
            metrics = httpx.get(url + "/metrics", timeout=10).json()
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()

    ok = [r for r in results if r["status"] == 200]
    rejected = [r for r in results if r["status"] == 503]
    other = [r for r in results if r["status"] not in (200, 503)]
    latencies = [r["latency_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    print(f"clients {args.clients}, max-queue {args.max_queue}, max_tokens {args.max_tokens}, {len(results)} requests "
          f"in {wall_s:.1f} s")
    print(f"completed {len(ok)}, 503 {len(rejected)}, other {len(other)} {[r['status'] for r in other][:5]}")
    print(f"requests/s {len(ok) / wall_s:.2f}, tokens/s {tokens / wall_s:.1f}")
    print(f"latency p50 {percentile(latencies, 50):.3f} s, p99 {percentile(latencies, 99):.3f} s")
    print(f"server metrics: generated {metrics['generated_tokens']} tokens, requests {metrics['requests']}")
    print(f"RSS idle {rss_idle / MIB:.0f} MiB, peak {max(sampler.peak, rss_idle) / MIB:.0f} MiB, "
          f"after {rss_after / MIB:.0f} MiB")

    failures = []
    if other:
        failures.append(f"{len(other)} requests neither completed nor got 503")
    if not ok:
        failures.append("no request completed")
    if health.status_code != 200 or health.json().get("status") != "ok":
        failures.append(f"/health answered {health.status_code} after the load")
    if rss_after - rss_idle > args.rss_tolerance_mib * MIB:
        failures.append(f"RSS grew by {(rss_after - rss_idle) / MIB:.0f} MiB over the idle level")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("PASS" if not failures else "FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
