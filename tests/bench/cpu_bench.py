"""CPU benchmark: edgepack beside llama.cpp, the seed recipe and transformers bf16, in one run.

    .venv/bin/python tests/bench/cpu_bench.py [--repeats 3] [--threads 2] [--no-peers] [--profile]

On the default model (SmolLM2-135M-Instruct), per engine and format (edgepack: 16, 8, 4-bit
int4 (its CPU format), nf4 and fp4), as medians of fresh
processes: decode tokens/s (128 greedy tokens, end-of-sequence ignored), prompt tokens/s on a
~256-token prompt, time from process start to the first token, peak RSS (VmHWM), file bytes,
and held-out quality against the full-precision source (perplexity, mean KL, top-1
agreement on tests/bench/gguf_heldout.txt plus the start of Python's pydoc topics, ~4k
tokens, the same token ids for every edgepack format, fed through the KV cache as generated
tokens are: one token a step through edgepack.runtime.engine._engine where decode steps run there, else 16
tokens at a time (8-bit: 4), below the prompt paths of torch ops; "8 rtn" is the
8-bit bundle packed with --no-smoothing --no-gptq, bitsandbytes' round-to-nearest, scored
for quality only). Then the
ratios edgepack / llama.cpp and edgepack / seed, and (--profile) where one decode step of
the 8-bit and int4 bundles spends its time. Each speed run waits for the machine to be quiet and
records how much CPU other processes used meanwhile (`foreign`): these machines are noisy,
and ratios from the same run are the figures that count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import peer_llamacpp as peer  # noqa: E402  (same folder; llama.cpp side and shared helpers)

PROMPT_TOKENS, NEW_TOKENS = 256, 128
# formats scored for quality only: "8 rtn" (8-bit rounded to nearest, without smoothing or
# GPTQ) runs the same kernels as "8"
QUALITY_ONLY = {"8 rtn"}


# --- workers (fresh processes; print one JSON line) ------------------------------------------


def quality_ids(tokenizer) -> list[int]:
    return tokenizer.encode(peer.quality_text(), add_special_tokens=False)


def heldout_ids(tokenizer, n: int | None = None) -> list[int]:
    ids = tokenizer.encode(peer.HELDOUT.read_text(), add_special_tokens=False)
    if n is None:
        return ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def worker_edgepack(path: str, threads: int) -> dict:
    t0 = float(os.environ.get(peer.T0_ENV, time.time()))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # both backends read it; torch is imported only by its own
    import edgepack

    lm = edgepack.load(path, verify=False)
    if lm.backend == "torch":
        import torch

        torch.set_num_threads(threads)
    loaded = time.time()
    prompt = lm.tokenizer.decode(heldout_ids(lm.tokenizer, PROMPT_TOKENS))
    steps = lm.stream_steps(prompt, max_new_tokens=NEW_TOKENS + 1, min_new_tokens=NEW_TOKENS + 1, temperature=0)
    first = next(steps)
    first_token_s = time.time() - t0
    last = first
    for last in steps:
        pass
    return {
        "load_s": loaded - t0,
        "first_token_s": first_token_s,
        "prompt_tok_s": first.prompt_tokens / first.prompt_seconds,
        "decode_tok_s": (last.generated_tokens - 1) / last.decode_seconds,
        "peak_rss_kib": peer.peak_rss_kib(),
        "backend": lm.backend,
    }


def worker_hf(path: str, threads: int, mode: str) -> dict:
    """transformers: `bf16` (plain), or the seed recipe `seed8` / `seed4` (bitsandbytes on load)."""
    t0 = float(os.environ.get(peer.T0_ENV, time.time()))
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kwargs = {"dtype": torch.bfloat16} if mode == "bf16" else {
        "quantization_config": BitsAndBytesConfig(load_in_8bit=True) if mode == "seed8" else BitsAndBytesConfig(load_in_4bit=True),
        "device_map": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    loaded = time.time()
    ids = torch.tensor([heldout_ids(tokenizer, PROMPT_TOKENS)])
    times = []

    class Clock:
        def put(self, _value):
            times.append(time.perf_counter())

        def end(self):
            pass

    start = time.perf_counter()
    model.generate(ids, max_new_tokens=NEW_TOKENS + 1, min_new_tokens=NEW_TOKENS + 1, do_sample=False, streamer=Clock())
    first_token_s = loaded - t0 + (times[1] - start)
    return {
        "load_s": loaded - t0,
        "first_token_s": first_token_s,
        "prompt_tok_s": ids.shape[1] / (times[1] - start),
        "decode_tok_s": (len(times) - 2) / (times[-1] - times[1]),
        "peak_rss_kib": peer.peak_rss_kib(),
    }


def worker_quality(path: str, tokens_npy: str, out_npy: str) -> dict:
    import torch

    import edgepack

    lm = edgepack.load(path, verify=False)
    tokens = torch.as_tensor(np.load(tokens_npy))[None]
    with torch.no_grad():
        if lm.backend == "native":  # edgepack's CPU engine: one token a step, as it decodes
            cache = lm.model.new_cache(tokens.shape[1])
            steps = [torch.frombuffer(lm.model.forward([int(t)], cache), dtype=torch.float32) for t in tokens[0]]
            logits = torch.stack(steps).double()
        elif getattr(lm.model, "native_off", "") is None:  # decode steps run in edgepack.runtime.engine._engine: one token a step
            cache = lm.model.new_cache(tokens.shape[1])
            logits = torch.stack([lm.model.native_step(int(t), cache) for t in tokens[0]]).double()
        elif hasattr(lm.model, "new_cache"):  # the lean decoder on torch ops: chunk by chunk
            cache = lm.model.new_cache(tokens.shape[1])
            # quality is scored half as many tokens per forward through the KV cache as the
            # runtime's prompt paths start at (qlinear.INT8_WIDE_ROWS for int8 layers: 4;
            # WIDE_ROWS for 16-bit ones: 16), so these are the numerics of decoding (the decode
            # kernels compute each row alike: on the default 8-bit bundle 1 and 4 rows a step
            # score KL 0.00158 / 0.00156)
            from edgepack.runtime.torch.linear import INT8_WIDE_ROWS, WIDE_ROWS

            step = (INT8_WIDE_ROWS if lm.manifest["quantization"]["bits"] == 8 else WIDE_ROWS) // 2
            chunks = range(0, tokens.shape[1], step)
            logits = torch.cat([lm.model(tokens[:, i : i + step], cache).logits[0] for i in chunks]).double()
        else:
            logits = lm.model(tokens).logits[0].double()
    np.save(out_npy, torch.log_softmax(logits, -1).float().numpy())
    return {"logprobs": out_npy}


# --- driver ------------------------------------------------------------------------------------


def spawn(*args: str) -> dict:
    env = dict(os.environ, **{peer.T0_ENV: repr(time.time())})  # first-token time includes interpreter start
    # As installed: bytecode cached. With PYTHONDONTWRITEBYTECODE (set in some sandboxes) an
    # editable checkout recompiles edgepack's modules in every process, ~25 ms of first token.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run([sys.executable, __file__, "worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(repeats: int, *args: str) -> dict:
    spawn(*args)  # warm-up: page cache, bytecode
    runs = []
    for _ in range(repeats):
        peer.wait_for_quiet()
        runs.append(spawn(*args))
    keys = ("decode_tok_s", "prompt_tok_s", "first_token_s", "load_s", "peak_rss_kib")
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "backend": runs[-1].get("backend", "")}


def worker_torch_rss() -> dict:
    import torch  # noqa: F401

    return {"peak_rss_kib": peer.peak_rss_kib()}


def pack_bundles(work: Path) -> dict[str, Path]:
    from edgepack.export.pack import pack

    bundles = {}
    settings = {"16": {"bits": 16}, "8": {"bits": 8}, "8 rtn": {"bits": 8, "smoothing": False, "gptq": False},
                "4 int4": {"bits": 4, "quant_type": "int4"}, "4 nf4": {"bits": 4}, "4 fp4": {"bits": 4, "quant_type": "fp4"}}
    for name, opts in settings.items():
        out = work / f"bundle-{name.replace(' ', '-')}"
        pack("smollm2-135m", out, force=True, **opts)
        bundles[name] = out
    return bundles


def save_fp32(work: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.export.sources import resolve_source

    src = resolve_source("smollm2-135m")
    out = work / "fp32"
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file).save_pretrained(out)
    return out


def quality_rows(bundles: dict[str, Path], tokens: np.ndarray, ref: np.ndarray, work: Path) -> dict:
    np.save(work / "tokens.npy", tokens)
    rows = {}
    for name, path in bundles.items():
        out = spawn("quality", str(path), str(work / "tokens.npy"), str(work / f"lp-{name.replace(' ', '-')}.npy"))
        lp = np.load(out["logprobs"])
        rows[name] = {"perplexity": peer.perplexity(lp, tokens), **peer.compare_logprobs(ref, lp),
                      "ppl_delta_se_pct": ppl_delta_se_pct(ref, lp, tokens), "n_tokens": len(tokens)}
    return rows


def ppl_delta_se_pct(ref: np.ndarray, lp: np.ndarray, tokens: np.ndarray) -> float:
    """Standard error (in %) of the perplexity ratio to the reference, from the per-token
    log-likelihood differences (paired: the same tokens)."""
    pos = np.arange(len(tokens) - 1)
    diff = ref[pos, tokens[1:]].astype(np.float64) - lp[pos, tokens[1:]]
    return float(100 * diff.std(ddof=1) / np.sqrt(len(diff)))


def profile_decode_step(bundle: Path, threads: int) -> str:
    """Where one decode step goes: edgepack.runtime.engine._engine's own clock per part of the step where
    the step runs there, else torch's profiler over the step's ops."""
    import torch

    import edgepack

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    lm = edgepack.load(bundle, verify=False)
    if lm.backend == "native":
        from edgepack.runtime.engine import _engine

        cache = lm.model.new_cache(512)
        lm.model.forward(heldout_ids(lm.tokenizer, 64), cache)
        for _ in range(5):
            lm.model.forward([42], cache)
        _engine.profile(True)
        start = time.perf_counter()
        for _ in range(100):
            lm.model.forward([42], cache)
        wall = (time.perf_counter() - start) / 100
        return _profile_lines(_engine, wall, "edgepack's CPU engine")
    cache = lm.model.new_cache(512)
    lm.model.logits_last(torch.tensor([heldout_ids(lm.tokenizer, 64)]), cache)
    token = torch.tensor([[42]])
    for _ in range(5):
        lm.model.logits_last(token, cache)
    if getattr(lm.model, "native_off", "") is None:
        from edgepack.runtime.engine import _engine

        _engine.profile(True)
        start = time.perf_counter()
        for _ in range(100):
            lm.model.logits_last(token, cache)
        wall = (time.perf_counter() - start) / 100
        return _profile_lines(_engine, wall, "the torch backend's C step")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            lm.model.logits_last(token, cache)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def _profile_lines(_engine, wall: float, what: str) -> str:
    parts = _engine.profile(False)
    steps, sync = parts.pop("steps"), parts.pop("sync", {})
    lines = [f"{what} ({_engine.set_isa()} kernels), 100 steps at positions 69-168: {wall * 1e3:.2f} ms a step"]
    lines += [f"  {name:<28}{sec / steps * 1e3:>7.3f} ms {sec / steps / wall:>6.1%}" for name, sec in parts.items()]
    rest = wall - sum(parts.values()) / steps
    lines.append(f"  {'Python, call, logits buffer':<28}{rest * 1e3:>7.3f} ms {rest / wall:>6.1%}")
    if sync:  # the pool's own counts: how often the threads meet, and what meeting costs the caller
        wait = sync.pop("wait seconds") / steps
        lines.append("  per step: " + ", ".join(f"{n / steps:.1f} {name}" for name, n in sync.items())
                     + f"; caller waiting for the others after its own rows {wait * 1e3:.3f} ms ({wait / wall:.1%}, inside the parts above)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peers", action="store_true", help="skip llama.cpp (no build of llama.cpp)")
    parser.add_argument("--profile", action="store_true", help="print a profile of one 8-bit decode step")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgepack-cpu-bench-"))
    bundles = pack_bundles(work)
    fp32 = save_fp32(work)
    rows: list[dict] = []
    for name, path in bundles.items():
        if name in QUALITY_ONLY:
            continue
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        rows.append({"engine": "edgepack", "format": name, "bytes": size, **speed(args.repeats, "edgepack", str(path), str(args.threads))})
    ckpt = (fp32 / "model.safetensors").stat().st_size
    for mode in ("seed8", "seed4", "bf16"):
        rows.append({"engine": "transformers", "format": mode, "bytes": ckpt, **speed(args.repeats, "hf", str(fp32), str(args.threads), mode)})
    peer_result = None
    if not args.no_peers:
        peer_result = peer.run_bench(repeats=args.repeats, threads=args.threads, prompt_n=PROMPT_TOKENS, new_n=NEW_TOKENS)
        for r in peer_result["rows"]:
            rows.append({"engine": "llama.cpp", "format": r["format"], "bytes": r["file_bytes"], **r})
    # quality: edgepack bundles on the same token ids llama.cpp was scored on
    from transformers import AutoTokenizer

    tokens = np.array(quality_ids(AutoTokenizer.from_pretrained(fp32)))
    src = __import__("gguf_variants").default_src_gguf()
    ref = peer.reference_logprobs(src, tokens)
    quality = quality_rows(bundles, tokens, ref, work)
    print_table(rows, quality, peer.perplexity(ref, tokens), args)
    if args.profile:
        for name in ("8", "4 int4"):
            print(f"\nwhere one decode step of the {name} bundle spends its time:")
            print(profile_decode_step(bundles[name], args.threads))


def print_table(rows, quality, ref_ppl, args) -> None:
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} greedy tokens, "
          f"medians of {args.repeats} fresh processes; reference perplexity {ref_ppl:.3f}\n")
    head = f"{'engine':<13}{'format':<8}{'MB':>7}{'decode t/s':>11}{'prompt t/s':>11}{'1st tok s':>10}{'RSS MiB':>9}{'ppl':>9}{'KL':>9}{'top1':>7}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        q = quality.get(r["format"], r) if r["engine"] == "edgepack" else r
        ppl = q.get("perplexity", float("nan"))
        print(f"{r['engine']:<13}{r['format']:<8}{r['bytes'] / 1e6:>7.1f}{r['decode_tok_s']:>11.1f}{r['prompt_tok_s']:>11.1f}"
              f"{r['first_token_s']:>10.2f}{r['peak_rss_kib'] / 1024:>9.0f}{ppl:>9.3f}{q.get('kl_mean', float('nan')):>9.5f}"
              f"{q.get('top1_agree', float('nan')):>7.3f}")
    by = {(r["engine"], r["format"]): r for r in rows}
    print()
    pairs = (("8", "Q8_0", "seed8"), ("4 int4", "Q4_1", "seed4"), ("4 nf4", "Q4_1", "seed4"), ("16", "F16", "bf16"))
    for ours, peer_fmt, seed in pairs:
        e = by.get(("edgepack", ours))
        for other in (("llama.cpp", peer_fmt), ("transformers", seed)):
            o = by.get(other)
            if e and o:
                print(f"edgepack {ours:<6} / {other[0]} {other[1]:<6}: decode {e['decode_tok_s'] / o['decode_tok_s']:.2f}x, "
                      f"prompt {e['prompt_tok_s'] / o['prompt_tok_s']:.2f}x, first token {e['first_token_s'] / o['first_token_s']:.2f}x, "
                      f"peak RSS {e['peak_rss_kib'] / o['peak_rss_kib']:.2f}x")
    eight = by.get(("edgepack", "8"))
    if eight:
        torch_mib = statistics.median(spawn("torch_rss")["peak_rss_kib"] for _ in range(3)) / 1024
        weights_mib = eight["bytes"] / 2**20
        line = torch_mib + 1.15 * weights_mib
        print(f"\nedgepack 8 ({eight['backend']} backend): first token {eight['first_token_s']:.2f} s (target <= 1.5 s); "
              f"peak RSS {eight['peak_rss_kib'] / 1024:.0f} MiB (target <= bare import torch {torch_mib:.0f} MiB "
              f"+ 1.15 x {weights_mib:.1f} MiB of weights = {line:.0f} MiB)")
    print()
    for name, q in quality.items():
        print(f"edgepack {name:<6} perplexity vs source: {100 * (q['perplexity'] / ref_ppl - 1):+.2f}% "
              f"(standard error {q['ppl_delta_se_pct']:.2f}%, {q['n_tokens']} tokens)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "edgepack":
            result = worker_edgepack(rest[0], int(rest[1]))
        elif kind == "hf":
            result = worker_hf(rest[0], int(rest[1]), rest[2])
        elif kind == "torch_rss":
            result = worker_torch_rss()
        else:
            result = worker_quality(rest[0], rest[1], rest[2])
        print(json.dumps(result))
    else:
        main()
