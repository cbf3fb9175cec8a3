"""The server's peak RSS against the planner's figure for it (edgepack/plan/serving.py).

    .venv/bin/python tests/bench/serve_memory.py --overhead            # the process baseline
    .venv/bin/python tests/bench/serve_memory.py --bundle /tmp/serving-8 [--context 2048]

--overhead: `edgepack serve` on the test suite's tiny bundle, idle after one request; its
RSS minus the tiny model's weights, tokenizers and engine scratch is SERVER_BASELINE_BYTES.

Otherwise: `edgepack serve --parallel 4 --context C --cache-bytes 3 slots`. First three long
requests one after another (each fills C positions; their caches are then held for reuse,
filling the budget), then four concurrent streams of C tokens each. Prints the peak RSS
against the prediction: its serving part (everything but request bodies, which these small
requests do not exercise) and its whole. Only 127.0.0.1; the server is ended by its pid.
"""

import argparse
import concurrent.futures
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

from edgepack.plan.serving import SERVER_BASELINE_BYTES, predict_server_memory  # noqa: E402

WORDS = ("garden tomato basil pepper soil summer water shade seed harvest compost mulch trellis sunlight "
         "leaf root stem flower fruit weed").split()


def start(bundle: Path, port: int, *extra: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "edgepack.cli", "serve", str(bundle), "--port", str(port), "--log-level", "warning",
           *extra]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    server = subprocess.Popen(cmd, cwd=REPO, stderr=log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}: {Path(log.name).read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server, Path(log.name).read_text()
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.kill()
    raise SystemExit("the server did not come up in 180 s")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()


def prompt_of(tokenizer, tokens: int, seed: int) -> str:
    """A prompt of about ``tokens`` tokens, different from the start for each seed."""
    words = [WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)] for i in range(tokens * 2)]
    text = f"Note {seed}: " + " ".join(words)
    ids = tokenizer.encode(text, add_special_tokens=True)
    return tokenizer.decode(ids[: tokens - 1], skip_special_tokens=True)


def overhead() -> int:
    from edgepack.runtime import load

    with tempfile.TemporaryDirectory() as tmp:
        bundle = tiny_bundle(Path(tmp) / "tiny-llama-8")
        lm = load(bundle)
        port = free_port()
        server, _ = start(bundle, port, "--parallel", "1")
        try:
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
            time.sleep(2.0)
            rss = psutil.Process(server.pid).memory_info().rss
        finally:
            stop(server)
        from edgepack.serve.memory import shape_of

        parts = predict_server_memory(shape_of(lm), weights_bytes=lm.model.weight_bytes, parallel=1,
                                      context=lm.max_positions).parts
        known = parts["weights"] + parts["tokenizers"] + parts["engine_scratch"] + parts["kv_caches"]
        print(f"tiny bundle: RSS idle {rss / MIB:.1f} MiB; weights {parts['weights'] / MIB:.2f} MiB, tokenizers "
              f"{parts['tokenizers'] / MIB:.2f}, engine scratch {parts['engine_scratch'] / MIB:.2f}, KV "
              f"{parts['kv_caches'] / MIB:.2f}; baseline {(rss - known) / MIB:.1f} MiB "
              f"(SERVER_BASELINE_BYTES says {SERVER_BASELINE_BYTES / MIB:.0f})")
    return 0


def stream_tokens(url: str, prompt: str, tokens: int) -> int:
    body = {"prompt": prompt, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=1200)
    r.raise_for_status()
    return r.json()["usage"]["total_tokens"]


def measure(bundle: Path, context: int, parallel: int) -> int:
    from edgepack.runtime import load
    from edgepack.serve.memory import server_memory

    lm = load(bundle)
    slot = server_memory(lm, parallel=1, context=context, cache_bytes=0, max_body_bytes=0).parts["kv_caches"]
    cache_bytes = 3 * slot
    predicted = server_memory(lm, parallel=parallel, context=context, cache_bytes=cache_bytes, max_body_bytes=8 * MIB)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server, log = start(bundle, port, "--parallel", str(parallel), "--context", str(context),
                        "--cache-bytes", str(cache_bytes))
    print(log.strip())
    prompt_tokens = context - context // 8
    sampler = RssSampler(server.pid, 0.05)
    sampler.start()
    try:
        t0 = time.perf_counter()
        for i in range(3):  # fill the held caches' budget
            stream_tokens(url, prompt_of(lm.tokenizer, prompt_tokens, 100 + i), context // 8 - 2)
        held = httpx.get(url + "/metrics").json()
        print(f"after 3 requests ({time.perf_counter() - t0:.0f} s): held caches {held['held_caches']}, "
              f"{held['held_cache_bytes'] / MIB:.1f} MiB; RSS {psutil.Process(server.pid).memory_info().rss / MIB:.0f} MiB",
              flush=True)
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            totals = list(pool.map(lambda i: stream_tokens(url, prompt_of(lm.tokenizer, prompt_tokens, i), context // 8 - 2),
                                   range(parallel)))
        metrics = httpx.get(url + "/metrics").json()
    finally:
        sampler.done.set()
        sampler.join()
        stop(server)
    peak = sampler.peak
    print(f"{parallel} streams of {totals} tokens (context {context}), load {os.getloadavg()[0]:.1f}: "
          f"peak RSS {peak / MIB:.1f} MiB")
    print(f"predicted serving part {predicted.serving_bytes / MIB:.1f} MiB (peak/prediction "
          f"{peak / predicted.serving_bytes:.3f}); whole prediction with request bodies {predicted.peak_bytes / MIB:.1f} MiB "
          f"(ratio {peak / predicted.peak_bytes:.3f}); /metrics says {metrics.get('predicted_peak_bytes', 0) / MIB:.1f}")
    print("parts: " + ", ".join(f"{k} {v / MIB:.1f}" for k, v in predicted.parts.items()))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overhead", action="store_true", help="measure the process baseline on a tiny bundle")
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--parallel", type=int, default=4)
    args = p.parse_args()
    if args.overhead:
        return overhead()
    if args.bundle is None:
        p.error("give --bundle (or --overhead)")
    return measure(args.bundle, args.context, args.parallel)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
