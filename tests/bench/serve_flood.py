"""Flood `edgepack serve` with the oversized requests of issue #23 and measure what they cost:
the server's RSS (idle, peak, after) and the slowest /health answer while they run.

    .venv/bin/python tests/bench/serve_flood.py                    # tiny bundle, its 128-token context
    .venv/bin/python tests/bench/serve_flood.py --context 32768    # the same model claiming SmolLM2's

Cases: one 15.6 MB prompt, four at once, 450k one-character messages (all over the default
8 MiB body cap), then the same just under the cap (7.9 MB prompts, 260k messages). Checks:
every answer is a 4xx in OpenAI's shape, /health answers within 1 s throughout (the idle
baseline is printed first: on a loaded box it is the floor), and RSS
peaks under the idle level + 4 x the body cap + 256 MiB (four bodies held at once, their
parsing, one tokenisation). Exits 1 if a check fails. Only 127.0.0.1; the server (a
subprocess) is ended by its pid.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import MIB, REPO, RssSampler, free_port, tiny_bundle  # noqa: E402

# Loads the bundle, optionally claims a longer context (only the server's prompt bounds read
# it: every flood prompt is refused before generation), and serves it on loopback.
SERVER = """
import sys
from edgepack import serve
from edgepack.runtime import load
lm = load(sys.argv[1])
if int(sys.argv[3]):
    architecture = {**lm.manifest["architecture"], "max_position_embeddings": int(sys.argv[3])}
    lm.manifest = {**lm.manifest, "architecture": architecture}
serve.serve(lm, port=int(sys.argv[2]), log_level="warning")
"""


def start(bundle: Path, port: int, context: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(bundle), str(port), str(context)], cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not come up in 120 s")


def probe_health(url: str, done, slowest, failures) -> None:
    """Poll /health from a process of its own (the flooding threads here hold this one's GIL)."""
    while not done.is_set():
        t0 = time.perf_counter()
        try:
            ok = httpx.get(url + "/health", timeout=30).status_code == 200
        except httpx.HTTPError:
            ok = False
        failures.value += not ok
        slowest.value = max(slowest.value, time.perf_counter() - t0)
        time.sleep(0.05)


class HealthProbe:
    def __init__(self, url: str):
        ctx = multiprocessing.get_context("spawn")
        self.done, self._slowest, self._failures = ctx.Event(), ctx.Value("d", 0.0), ctx.Value("i", 0)
        self.process = ctx.Process(target=probe_health, args=(url, self.done, self._slowest, self._failures))

    def start(self):
        self.process.start()
        time.sleep(1.0)  # its imports, before the flood starts

    def join(self):
        self.process.join(30)
        self.slowest, self.failures = self._slowest.value, self._failures.value


def post(url: str, path: str, body: bytes) -> int:
    try:
        response = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=300)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return response.status_code if set(response.json().get("error", {})) >= {"message", "code"} else -1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: pack a tiny one)")
    p.add_argument("--context", type=int, default=0, help="claim this context length (default: the bundle's)")
    args = p.parse_args()
    cap = 8 * MIB
    big = json.dumps({"prompt": "Paris is nice. " * 1_040_000, "max_tokens": 4}).encode()  # 15.6 MB
    under = json.dumps({"prompt": "Paris is nice. " * 520_000, "max_tokens": 4}).encode()  # 7.8 MB
    many = json.dumps({"messages": [{"role": "user", "content": "a"}] * 450_000}).encode()
    fewer = json.dumps({"messages": [{"role": "user", "content": "a"}] * 230_000}).encode()
    cases = [
        ("idle (baseline)", "/health", b"", 0),  # /health alone: the box's own latency
        ("15.6 MB prompt", "/v1/completions", big, 1),
        ("15.6 MB prompt x4", "/v1/completions", big, 4),
        ("450k messages", "/v1/chat/completions", many, 1),
        ("7.8 MB prompt", "/v1/completions", under, 1),
        ("7.8 MB prompt x4", "/v1/completions", under, 4),
        ("230k messages", "/v1/chat/completions", fewer, 1),
    ]
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or tiny_bundle(Path(tmp) / "tiny-llama-8")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start(bundle, port, args.context)
        try:
            httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)  # warm up
            time.sleep(1.0)
            process = psutil.Process(server.pid)
            idle = process.memory_info().rss
            print(f"context {args.context or 'of the bundle'}; RSS idle {idle / MIB:.0f} MiB")
            for name, path, body, copies in cases:
                sampler, probe = RssSampler(server.pid, 0.02), HealthProbe(url)
                sampler.start()
                probe.start()
                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(max(copies, 1)) as pool:
                    statuses = list(pool.map(lambda _: post(url, path, body), range(copies)))
                if not copies:
                    time.sleep(2.0)
                seconds = time.perf_counter() - t0
                time.sleep(0.3)
                sampler.done.set()
                probe.done.set()
                sampler.join()
                probe.join()
                peak = max(sampler.peak, idle)
                print(f"{name:18s} {len(body) / 1e6:5.1f} MB  answers {statuses}  {seconds:5.2f} s  "
                      f"RSS peak {peak / MIB:5.0f} MiB (+{(peak - idle) / MIB:.0f})  "
                      f"slowest /health {probe.slowest:.3f} s")
                if any(not isinstance(s, int) or not 400 <= s < 500 for s in statuses):
                    failures.append(f"{name}: answers {statuses}")
                if probe.slowest >= 1.0 or probe.failures:
                    failures.append(f"{name}: /health took {probe.slowest:.2f} s ({probe.failures} failed)")
                if peak - idle > 4 * cap + 256 * MIB:
                    failures.append(f"{name}: RSS grew {(peak - idle) / MIB:.0f} MiB")
            time.sleep(2.0)
            print(f"RSS after {process.memory_info().rss / MIB:.0f} MiB")
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
    for failure in failures:
        print(f"FAIL: {failure}")
    print("PASS" if not failures else "FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
