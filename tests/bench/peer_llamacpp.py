"""llama.cpp peer for the edgepack benchmark.

Subcommands:
  env                       build llama.cpp (llama-bench, llama-quantize) from the
                            llama-cpp-python sdist, and a venv for its bindings (cached)
  worker  --gguf F ...      first token, RSS and the bindings' own speed, in a fresh process
  quality --gguf F ...      perplexity + per-position log-probs on gguf_heldout.txt
  bench   --repeats 3       make the GGUF variants, run everything, print medians
  diagnose --gguf F         llama-bench (flash attention auto / off, 2 and 1 threads)
                            beside the bindings' eval loop: where a Python-driven peer loses

Speed is llama.cpp's own llama-bench; `worker` and `quality` run under the private venv's
Python with the sdist's llama_cpp package over the same build's shared libraries;
`env` and `bench` run under the project venv (bench needs gguf/transformers/torch).
For a combined bench import this file and use `run_bench()` / `format_table()`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_ENV = BENCH_DIR / ".peer-venv"
HELDOUT = BENCH_DIR / "gguf_heldout.txt"
T0_ENV = "EDGEPACK_T0"  # wall-clock time the parent spawned the worker

# llama.cpp as its users build it: a Release build for *this* CPU (-march=native; we
# benchmark where we build), from the llama.cpp that ships inside the llama-cpp-python sdist
# (vendor/llama.cpp), so the speed rows (llama-bench) and the quality rows (the Python
# bindings, loading the same shared libraries) run one build of one llama.cpp.
CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
              "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
TARGETS = ["llama-bench", "llama-quantize"]
SDIST_SPEC = "llama-cpp-python"
# the bindings' own dependencies, for the quality rows (the package itself is put on the path)
BINDING_DEPS = ["numpy", "diskcache", "jinja2", "typing_extensions"]


# --------------------------------------------------------------------------- env

def env_python(env_dir: Path = DEFAULT_ENV) -> Path:
    return Path(env_dir) / "py" / "bin" / "python"


def _sdist(env_dir: Path) -> Path:
    """The unpacked llama-cpp-python sdist (downloaded once with pip)."""
    src = env_dir / "src"
    found = sorted(p for p in src.glob("llama_cpp_python-*") if p.is_dir()) if src.exists() else []
    if not found:
        src.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "-d", str(src), SDIST_SPEC], check=True)
        tarball = sorted(src.glob("llama_cpp_python-*.tar.gz"))[-1]
        subprocess.run(["tar", "xzf", str(tarball), "-C", str(src)], check=True)
        found = sorted(p for p in src.glob("llama_cpp_python-*") if p.is_dir())
    return found[-1]


def ensure_llamacpp_build(env_dir: Path = DEFAULT_ENV) -> dict:
    """llama.cpp's own tools built from the sdist's vendor/llama.cpp (cached in env_dir).

    Returns {"bin", "source", "sdist", "commit", "build_s"}."""
    env_dir = Path(env_dir)
    sdist = _sdist(env_dir)
    source, build = sdist / "vendor" / "llama.cpp", env_dir / "build"
    t0 = time.monotonic()
    if not all((build / "bin" / t).exists() for t in TARGETS):
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *gen, *CMAKE_ARGS], check=True)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TARGETS],
                       check=True)
    commit = subprocess.run(["git", "-C", str(source), "log", "-1", "--format=%h %cs"], capture_output=True,
                            text=True).stdout.strip()
    return {"bin": str(build / "bin"), "source": str(source), "sdist": sdist.name, "commit": commit,
            "build_s": round(time.monotonic() - t0, 1)}


def ensure_llamacpp_env(env_dir: Path = DEFAULT_ENV) -> dict:
    """The build above plus a small venv whose Python loads the sdist's `llama_cpp` package
    over the build's shared libraries (LLAMA_CPP_LIB_PATH): the quality rows' peer.

    Returns the build's dict plus {"python", "env"} (the environment a worker runs in)."""
    env_dir = Path(env_dir)
    build = ensure_llamacpp_build(env_dir)
    py = env_python(env_dir)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(py.parent.parent)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *BINDING_DEPS], check=True)
    env = {"PYTHONPATH": str(env_dir / "src" / build["sdist"]), "LLAMA_CPP_LIB_PATH": build["bin"]}
    return {**build, "python": str(py), "env": env}


# ------------------------------------------------------------ worker side (peer venv)

def _load(gguf: str, threads: int, n_ctx: int, logits_all: bool = False):
    import llama_cpp
    return llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads,
                           n_ctx=n_ctx, logits_all=logits_all, verbose=False)


def _last_logits(llm) -> np.ndarray:
    import llama_cpp
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def heldout_tokens(llm) -> list[int]:
    # add_bos follows the GGUF (tokenizer.ggml.add_bos_token), as llama.cpp's own tools do.
    return llm.tokenize(HELDOUT.read_text().encode(), add_bos=True)


QUALITY_PYDOC_CHARS = 15_000  # ~4k tokens in all: a perplexity delta resolves to ~0.15% (1 SE)


def quality_text() -> str:
    """The text quality is scored on: the held-out file plus the start of Python's own pydoc
    topics (in every CPython, PSF license). The held-out file alone (308 tokens) leaves a
    standard error of ~0.45% on a perplexity delta: too coarse for a 0.3% target."""
    import pydoc_data.topics as topics

    pydoc = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return HELDOUT.read_text() + "\n\n" + pydoc[:QUALITY_PYDOC_CHARS]


def quality_tokens(llm) -> list[int]:
    return llm.tokenize(quality_text().encode(), add_bos=True)


def prompt_tokens(llm, n: int) -> list[int]:
    """Exactly n prompt tokens: the held-out text, cycled if it is shorter than n."""
    base = heldout_tokens(llm)
    return (base * (n // len(base) + 1))[:n]


def peak_rss_kib() -> int:
    """Peak resident set of this process in KiB.

    ru_maxrss survives execve on Linux, so a worker spawned by a big parent
    (the driver holds a torch model) would report the parent's peak. VmHWM
    belongs to the process's own address space and starts fresh at exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_worker(gguf: str, threads: int, prompt_n: int, new_n: int, n_ctx: int = 1024) -> dict:
    """Speed of one cold process: load, prefill prompt_n tokens, greedy-decode new_n.

    Uses the low-level eval + argmax loop so end-of-sequence cannot stop decoding
    early and no sampler overhead is measured.
    """
    t0 = float(os.environ.get(T0_ENV, time.time()))
    t_import = time.time()
    import llama_cpp  # noqa: F401  (timed: part of the cold start)
    t_load = time.time()
    llm = _load(gguf, threads, n_ctx)
    t_loaded = time.time()
    prompt = prompt_tokens(llm, prompt_n)

    t_pp = time.perf_counter()
    llm.eval(prompt)
    tok = int(_last_logits(llm).argmax())
    prompt_s = time.perf_counter() - t_pp
    first_token_s = time.time() - t0

    t_dec = time.perf_counter()
    for _ in range(new_n):
        llm.eval([tok])
        tok = int(_last_logits(llm).argmax())
    decode_s = time.perf_counter() - t_dec

    return {
        "gguf": gguf, "threads": threads, "prompt_tokens": len(prompt), "new_tokens": new_n,
        "import_s": round(t_load - t_import, 4), "load_s": round(t_loaded - t_load, 4),
        "first_token_s": round(first_token_s, 4),
        "prompt_tok_s": round(len(prompt) / prompt_s, 2),
        "decode_tok_s": round(new_n / decode_s, 2),
        "peak_rss_kib": peak_rss_kib(),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def perplexity(logprobs: np.ndarray, tokens: np.ndarray) -> float:
    """Row i predicts token i+1; the last row has no target."""
    nll = -logprobs[np.arange(len(tokens) - 1), tokens[1:]]
    return float(np.exp(nll.mean()))


def run_quality(gguf: str, threads: int, out_dir: str, n_ctx: int = 8192, tokens_file: str = "") -> dict:
    """Full log-probs (n_tokens x vocab, float32) of the quality text, saved as .npy.
    ``tokens_file``: a .npy of token ids to score instead (the caller's own tokenization;
    the context is then sized to it, since the bindings keep n_ctx x vocab floats of scores:
    8.6 GB at n_ctx 8192 for Gemma's 262k vocabulary)."""
    given = np.load(tokens_file).astype(np.int64) if tokens_file else None
    llm = _load(gguf, threads, len(given) if given is not None else n_ctx, logits_all=True)
    tokens = given if given is not None else np.asarray(quality_tokens(llm), dtype=np.int64)
    llm.eval(tokens.tolist())
    scores = llm.scores
    logprobs = np.concatenate([log_softmax(np.asarray(scores[lo:min(lo + 256, len(tokens))]))
                               for lo in range(0, len(tokens), 256)])
    out = Path(out_dir or tempfile.mkdtemp(prefix="peer-llamacpp-"))
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(gguf).stem
    lp_path, tok_path = out / f"{stem}.logprobs.npy", out / f"{stem}.tokens.npy"
    np.save(lp_path, logprobs)
    np.save(tok_path, tokens)
    return {"gguf": gguf, "n_tokens": len(tokens), "perplexity": round(perplexity(logprobs, tokens), 4),
            "logprobs": str(lp_path), "tokens": str(tok_path)}


# --------------------------------------------------------- driver side (project venv)

def _cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal; guest time is already in user
        vals = [int(v) for v in f.readline().split()[1:9]]
    idle = vals[3] + vals[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(vals) - idle) / hz, sum(vals) / hz


def wait_for_quiet(max_busy: float = 0.15, timeout: float = 300, window: float = 1.0) -> float:
    """Block until machine-wide CPU use stays below `max_busy` for `window` s.

    With 2 cores, one foreign busy process makes llama.cpp's 2 spinning threads
    10x slower, so speed runs must not overlap other work. Returns seconds waited
    (gives up after `timeout` and lets the run go ahead; `foreign_cpu` shows it).
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        b0, t0 = _cpu_seconds()
        time.sleep(window)
        b1, t1 = _cpu_seconds()
        if (b1 - b0) / max(t1 - t0, 1e-9) < max_busy:
            break
    return round(time.monotonic() - start - window, 1)


def spawn(mode: str, gguf: Path, peer: dict, *extra: str, timeout: float = 600) -> dict:
    """Run `mode` in a fresh interpreter and return its JSON line.

    T0 is taken just before the spawn so first-token time covers interpreter start.
    Adds `foreign_cpu`: share of the machine's CPU used by *other* processes
    during the run (anything above ~0.05 means the timing is contaminated).
    """
    cmd = [peer["python"], str(Path(__file__).resolve()), mode, "--gguf", str(gguf), *extra]
    busy0, total0 = _cpu_seconds()
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, **peer["env"], **{T0_ENV: repr(time.time())})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    busy1, total1 = _cpu_seconds()
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["foreign_cpu"] = round(max(0.0, busy1 - busy0 - own) / max(total1 - total0, 1e-9), 3)
    return result


def llama_bench(peer: dict, gguf: Path, threads: int, prompt_n: int = 0, new_n: int = 0, depth: int = 0,
                reps: int = 1) -> dict:
    """llama.cpp's own benchmark, one process: prompt tokens/s (pp: a batch of prompt_n tokens)
    and decode tokens/s (tg: new_n tokens one at a time), both after `depth` tokens already in
    the KV cache; llama-bench runs an untimed warm-up first and reports the mean of `reps`.
    Adds `foreign_cpu` as spawn() does."""
    cmd = [str(Path(peer["bin"]) / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", str(reps),
           "-p", str(prompt_n), "-n", str(new_n), "-d", str(depth), "-o", "json"]
    busy0, total0 = _cpu_seconds()
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    busy1, total1 = _cpu_seconds()
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    out = {"foreign_cpu": round(max(0.0, busy1 - busy0 - own) / max(total1 - total0, 1e-9), 3)}
    for test in json.loads(proc.stdout):
        key = "decode_tok_s" if test["n_gen"] else "prompt_tok_s"
        out[key] = test["avg_ts"]
        out["build"] = f"{test.get('build_commit')} ({test.get('cpu_info', '').strip()}, {test.get('backends')})"
    return out


def measure_speed(gguf: Path, peer: dict, repeats: int = 3, threads: int = 2,
                  prompt_n: int = 256, new_n: int = 128, quiet: bool = True) -> dict:
    """Medians over `repeats` rounds of fresh processes: decode and prompt tokens/s from
    llama-bench (llama.cpp's own loop, no Python between tokens); time to the first token,
    load time and peak RSS from a process that loads the model through the Python bindings
    and runs the prompt (their decode figure is kept as `bindings_decode_tok_s`: it shows
    what a Python loop around llama_decode costs). One warm-up of each first, so every
    counted run finds the file in the page cache."""
    args = ("--threads", str(threads), "--prompt-tokens", str(prompt_n), "--new-tokens", str(new_n))
    spawn("worker", gguf, peer, *args)
    runs = []
    for _ in range(repeats):
        waited = wait_for_quiet() if quiet else 0.0
        bench = llama_bench(peer, gguf, threads, prompt_n, new_n)
        py = spawn("worker", gguf, peer, *args)
        runs.append({**py, "bindings_decode_tok_s": py["decode_tok_s"], "bindings_prompt_tok_s": py["prompt_tok_s"],
                     **bench, "foreign_cpu": max(bench["foreign_cpu"], py["foreign_cpu"]), "waited_s": waited})
        print(f"[peer] {Path(gguf).name}: llama-bench decode {bench['decode_tok_s']:.1f} tok/s, bindings "
              f"{py['decode_tok_s']:.1f}; foreign_cpu {runs[-1]['foreign_cpu']}, waited {waited}s", file=sys.stderr, flush=True)
    keys = ("decode_tok_s", "prompt_tok_s", "bindings_decode_tok_s", "bindings_prompt_tok_s", "first_token_s",
            "load_s", "import_s", "peak_rss_kib")
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    # worst case, not median: one contaminated run is enough to distrust a row
    med["foreign_cpu_max"] = max(r["foreign_cpu"] for r in runs)
    return {**med, "runs": runs}


def diagnose(gguf: Path, peer: dict, repeats: int = 3, threads: int = 2, new_n: int = 128) -> dict:
    """Why the Python-driven peer decodes slower than llama.cpp's own loop: rounds of fresh
    processes, alternating llama-bench (flash attention auto, as llama.cpp's tools run; and
    off, as llama-cpp-python's Llama() defaults to), llama-bench at 1 thread, and the
    bindings' eval loop (this file's worker, 256-token prompt first). Medians of decode tok/s."""
    variants = {"llama-bench fa auto": ("-fa", "auto"), "llama-bench fa off": ("-fa", "off")}
    runs: dict = {name: [] for name in [*variants, "llama-bench 1 thread", "bindings (Llama.eval loop)"]}
    for _ in range(repeats):
        for name, extra in variants.items():
            runs[name].append(_bench_extra(peer, gguf, threads, new_n, extra))
        runs["llama-bench 1 thread"].append(_bench_extra(peer, gguf, 1, new_n, ()))
        py = spawn("worker", gguf, peer, "--threads", str(threads), "--prompt-tokens", "256", "--new-tokens", str(new_n))
        runs["bindings (Llama.eval loop)"].append(py["decode_tok_s"])
        print(f"[diagnose] {({k: round(v[-1], 1) for k, v in runs.items()})} load avg {os.getloadavg()[0]:.1f}",
              file=sys.stderr, flush=True)
    return {name: statistics.median(v) for name, v in runs.items()}


def _bench_extra(peer: dict, gguf: Path, threads: int, new_n: int, extra: tuple) -> float:
    cmd = [str(Path(peer["bin"]) / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "1", "-p", "0",
           "-n", str(new_n), "-o", "json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)[0]["avg_ts"]


def reference_logprobs(src_gguf: Path, tokens: np.ndarray) -> np.ndarray:
    """Log-probs of the dequantized float32 model (transformers' GGUF loader)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src_gguf.parent, gguf_file=src_gguf.name,
                                                 dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens)[None]).logits[0]
    return torch.log_softmax(logits.double(), -1).float().numpy()


def compare_logprobs(ref: np.ndarray, lp: np.ndarray) -> dict:
    """Mean KL(ref || lp) in nats and top-1 agreement over next-token positions."""
    ref, lp = ref[:-1], lp[:-1]
    kl = (np.exp(ref.astype(np.float64)) * (ref - lp)).sum(-1)
    top1 = (ref.argmax(-1) == lp.argmax(-1)).mean()
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agree": float(top1)}


def _quality_rows(paths: dict, peer: dict, src: Path, threads: int, out_dir: str) -> dict:
    qual = {fmt: spawn("quality", p, peer, "--threads", str(threads), "--out-dir", out_dir)
            for fmt, p in paths.items()}
    tokens = np.load(next(iter(qual.values()))["tokens"])
    ref = reference_logprobs(src, tokens)
    for q in qual.values():
        assert np.array_equal(np.load(q["tokens"]), tokens), "variants tokenized differently"
        q.update(compare_logprobs(ref, np.load(q["logprobs"])))
    qual["reference"] = {"perplexity": round(perplexity(ref, tokens), 4), "n_tokens": len(tokens)}
    return qual


def run_bench(repeats: int = 3, threads: int = 2, prompt_n: int = 256, new_n: int = 128,
              env_dir: Path = DEFAULT_ENV, variants_dir: Path | None = None,
              quality: bool = True, quiet: bool = True, logprobs_dir: Path | None = None) -> dict:
    """Return {"rows": [per-format dict], "reference": {...}, "build": {...}}.

    The per-position log-prob .npy files (~60 MB each) go to a temp dir that is
    removed afterwards unless `logprobs_dir` is given.
    """
    import gguf_variants  # project venv only (needs the gguf package)
    build = ensure_llamacpp_env(env_dir)
    src = gguf_variants.default_src_gguf()
    paths = gguf_variants.make_variants(src, variants_dir or gguf_variants.DEFAULT_OUT)
    qual = {}
    if quality:
        with tempfile.TemporaryDirectory(prefix="peer-llamacpp-") as tmp:
            qual = _quality_rows(paths, build, src, threads, str(logprobs_dir or tmp))
    rows = []
    for fmt, p in paths.items():
        speed = measure_speed(p, build, repeats, threads, prompt_n, new_n, quiet)
        rows.append({"format": fmt, "file_bytes": p.stat().st_size, **speed, **qual.get(fmt, {})})
    return {"rows": rows, "reference": qual.get("reference"), "build": build}


def format_table(result: dict) -> str:
    head = (f"{'format':6} {'file MB':>8} {'decode t/s':>10} {'prompt t/s':>10} {'1st tok s':>9} "
            f"{'load s':>7} {'RSS MiB':>8} {'ppl':>8} {'KL':>8} {'top1':>6} {'foreign':>7}")
    lines = [head]
    for r in result["rows"]:
        lines.append(
            f"{r['format']:6} {r['file_bytes'] / 1e6:8.1f} {r['decode_tok_s']:10.1f} "
            f"{r['prompt_tok_s']:10.1f} {r['first_token_s']:9.3f} {r['load_s']:7.3f} "
            f"{r['peak_rss_kib'] / 1024:8.1f} {r.get('perplexity', float('nan')):8.3f} "
            f"{r.get('kl_mean', float('nan')):8.5f} {r.get('top1_agree', float('nan')):6.3f} {r['foreign_cpu_max']:7.2f}")
    if result.get("reference"):
        lines.append(f"reference (dequantized float32, transformers): ppl "
                     f"{result['reference']['perplexity']:.3f} on {result['reference']['n_tokens']} tokens")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--env-dir", type=Path, default=DEFAULT_ENV)
    for name in ("worker", "quality"):
        w = sub.add_parser(name)
        w.add_argument("--gguf", required=True)
        w.add_argument("--threads", type=int, default=2)
        w.add_argument("--n-ctx", type=int, default=1024)
    sub.choices["worker"].add_argument("--prompt-tokens", type=int, default=256)
    sub.choices["worker"].add_argument("--new-tokens", type=int, default=128)
    sub.choices["quality"].add_argument("--out-dir", default="")
    sub.choices["quality"].add_argument("--tokens-file", default="", help="score these token ids (.npy)")
    sub.choices["quality"].set_defaults(n_ctx=8192)  # the quality text is ~3.9k tokens
    d = sub.add_parser("diagnose")
    d.add_argument("--gguf", required=True)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("bench")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--env-dir", type=Path, default=DEFAULT_ENV)
    b.add_argument("--variants-dir", type=Path, default=None)
    b.add_argument("--no-quality", action="store_true")
    b.add_argument("--no-wait", action="store_true", help="do not wait for an idle CPU before speed runs")
    b.add_argument("--json", type=Path, default=None, help="also write the full result here")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    if a.cmd == "env":
        print(json.dumps(ensure_llamacpp_env(a.env_dir)))
    elif a.cmd == "worker":
        print(json.dumps(run_worker(a.gguf, a.threads, a.prompt_tokens, a.new_tokens, a.n_ctx)))
    elif a.cmd == "diagnose":
        print(json.dumps(diagnose(Path(a.gguf), ensure_llamacpp_env(), a.repeats, a.threads)))
    elif a.cmd == "quality":
        print(json.dumps(run_quality(a.gguf, a.threads, a.out_dir, a.n_ctx, a.tokens_file)))
    else:
        sys.path.insert(0, str(BENCH_DIR))
        res = run_bench(a.repeats, a.threads, env_dir=a.env_dir, variants_dir=a.variants_dir,
                        quality=not a.no_quality, quiet=not a.no_wait)
        if a.json:
            a.json.write_text(json.dumps(res, indent=1, default=str))
        print(format_table(res))


if __name__ == "__main__":
    main()
