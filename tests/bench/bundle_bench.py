"""Bundle benchmark: edgepack bundles at 16/8/4 bits beside the seed recipe, in one run.

    .venv/bin/python tests/bench/bundle_bench.py [--model smollm2-135m] [--repeats 3] [--tokens 64]

For each bit-width it prints bundle bytes, pack time and pack peak RSS, and, as medians
over fresh processes: load time, peak RSS of a process that loads the bundle and generates
`--tokens` tokens, and decode tokens/s. Beside them, the seed recipe —
`AutoModelForCausalLM.from_pretrained(fp32_checkpoint, quantization_config=BitsAndBytesConfig(...))`,
quantizing on every load — and a bare `import torch` process as the memory baseline.
Figures that count are ratios within this run: these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a short story about a robot who learns to paint."
MIB = 1024 * 1024


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries a parent's
    high-water mark into a child it starts."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- workers: each runs in a fresh process and prints one JSON line ------------------------


def worker_torch() -> dict:
    import torch  # noqa: F401

    return {"peak_rss": peak_rss_bytes()}


def worker_edgepack(path: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    import edgepack

    lm = edgepack.load(path, verify=False)  # hashing is a one-time cost, measured separately
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_bytes()
    steps = list(lm.stream_steps(PROMPT, max_new_tokens=tokens, min_new_tokens=tokens, temperature=0))
    return {
        "load_s": load_s,
        "first_token_s": steps[0].prompt_seconds,
        "decode_tps": (len(steps) - 1) / steps[-1].decode_seconds,
        "load_peak_rss": load_peak,
        "peak_rss": peak_rss_bytes(),
    }


def worker_seed(path: str, bits: int, tokens: int) -> dict:
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    config = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="auto")
    tokenizer = AutoTokenizer.from_pretrained(path)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    times = []

    class Clock:  # a streamer that timestamps every token generate() emits
        def put(self, _value):
            times.append(time.perf_counter())

        def end(self):
            pass

    start = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=Clock())
    # the first put() is the prompt itself, the second the first new token
    return {
        "load_s": load_s,
        "first_token_s": times[1] - start,
        "decode_tps": (len(times) - 2) / (times[-1] - times[1]),
        "peak_rss": peak_rss_bytes(),
    }


# --- driver -------------------------------------------------------------------------------


def run_worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "worker", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


SETTINGS = {"16": (16, "nf4"), "8": (8, "nf4"), "4": (4, "nf4"), "int4": (4, "int4")}  # --bits names


def pack_measured(model: str, out: Path, bits: int, quant_type: str = "nf4") -> dict:
    code = (
        "import json, resource, time, sys\n"
        "t = time.perf_counter()\n"
        "from edgepack.export.pack import pack\n"
        f"m = pack({model!r}, {str(out)!r}, bits={bits}, quant_type={quant_type!r}, force=True)\n"
        "hwm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "print(json.dumps({'pack_s': time.perf_counter() - t, 'pack_peak_rss': hwm, "
        "'weight_bytes': m['memory']['weight_bytes'], "
        "'bundle_bytes': sum(f['size'] for f in m['files']), 'top1': m['verification']['top1_agreement_vs_source']}))\n"
    )
    out_p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out_p.stdout.strip().splitlines()[-1])


def save_checkpoint(model: str, out: Path, dtype: str = "float32") -> int:
    """A plain safetensors checkpoint of the model (the seed recipe starts from fp32)."""
    from edgepack.export.sources import resolve_source

    src = resolve_source(model)
    code = (
        "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"kw = {{'gguf_file': {src.gguf_file!r}}} if {src.gguf_file!r} else {{}}\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(src.path)!r}, dtype=torch.{dtype}, **kw)\n"
        "if getattr(m.config, 'quantization_config', None) is not None:\n"
        "    m.hf_quantizer = None; del m.config.quantization_config  # plain floats now, not GGUF\n"
        f"m.save_pretrained({str(out)!r}); AutoTokenizer.from_pretrained({str(src.path)!r}, **kw).save_pretrained({str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def label(bits: str) -> str:
    return "4-bit int4" if bits == "int4" else f"{bits}-bit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--bits", default="16,8,4,int4", help="comma list of 16, 8, 4 (nf4), int4")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed recipe")
    args = parser.parse_args()
    bits_list = args.bits.split(",")
    unknown = [b for b in bits_list if b not in SETTINGS]
    if unknown:
        parser.error(f"--bits: unknown {unknown}; use {', '.join(SETTINGS)}")
    work = Path(tempfile.mkdtemp(prefix="edgepack-bench-"))
    torch_rss = statistics.median(run_worker("torch")["peak_rss"] for _ in range(args.repeats))
    print(f"bare `import torch` peak RSS: {torch_rss / MIB:.0f} MiB   (model {args.model}, {args.tokens} tokens, "
          f"{args.repeats} fresh processes each, torch threads {os.cpu_count()})\n")
    rows = []
    for bits in bits_list:
        packed = pack_measured(args.model, work / f"b{bits}", *SETTINGS[bits])
        run = medians([run_worker("edgepack", str(work / f"b{bits}"), str(args.tokens)) for _ in range(args.repeats)])
        rows.append({"engine": f"edgepack {label(bits)}", **packed, **run})
    pack_rows = []
    for dtype in ("float32", "bfloat16"):
        size = save_checkpoint(args.model, work / dtype, dtype)
        for bits in (8, 4):
            measured = pack_measured(str(work / dtype), work / f"from-{dtype}-{bits}", bits)
            pack_rows.append((dtype, size, bits, measured))
    if not args.no_seed:
        ckpt_bytes = (work / "float32" / "model.safetensors").stat().st_size
        (work / "fp32").symlink_to(work / "float32")
        for bits in (8, 4):
            run = medians([run_worker("seed", str(work / "fp32"), str(bits), str(args.tokens)) for _ in range(args.repeats)])
            rows.append({"engine": f"seed bnb {bits}-bit", "bundle_bytes": ckpt_bytes, **run})
    header = f"{'engine':<18}{'bundle MB':>10}{'weights MB':>11}{'pack s':>8}{'pack RSS':>9}{'load s':>8}{'1st tok s':>10}{'peak RSS':>9}{'decode t/s':>11}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['engine']:<18}{r['bundle_bytes'] / 1e6:>10.1f}{r.get('weight_bytes', 0) / 1e6:>11.1f}"
              f"{r.get('pack_s', float('nan')):>8.1f}{r.get('pack_peak_rss', 0) / MIB:>9.0f}{r['load_s']:>8.2f}"
              f"{r['first_token_s']:>10.2f}{r['peak_rss'] / MIB:>9.0f}{r['decode_tps']:>11.1f}")
    print("\n(RSS in MiB; load s = process import + load; 1st tok s = prompt processing)")
    by = {r["engine"]: r for r in rows}
    for bits in bits_list:
        r = by[f"edgepack {label(bits)}"]
        budget = torch_rss + 1.2 * r["weight_bytes"]
        print(f"edgepack {label(bits)} peak RSS: loading {r['load_peak_rss'] / MIB:.0f} MiB "
              f"({'OK' if r['load_peak_rss'] <= budget else 'OVER'}), loading + {args.tokens} tokens "
              f"{r['peak_rss'] / MIB:.0f} MiB, vs target import torch + 1.2 x weights = "
              f"{budget / MIB:.0f} MiB: {'OK' if r['peak_rss'] <= budget else 'OVER'}"
              f" (weights-only overhead above torch: {(r['peak_rss'] - torch_rss) / r['weight_bytes']:.2f} x weights)")
        seed = by.get(f"seed bnb {SETTINGS[bits][0]}-bit")
        if seed:
            print(f"  vs seed {SETTINGS[bits][0]}-bit: peak RSS {r['peak_rss'] / seed['peak_rss']:.2f}x, load time "
                  f"{r['load_s'] / seed['load_s']:.2f}x, decode {r['decode_tps'] / seed['decode_tps']:.2f}x")
    if not args.no_seed:
        print(f"seed recipe fp32 checkpoint: {ckpt_bytes / MIB:.0f} MiB; seed 8-bit peak RSS = "
              f"{by['seed bnb 8-bit']['peak_rss'] / ckpt_bytes:.2f} x checkpoint")
    print("\npacking a safetensors checkpoint (streamed tensor by tensor; peak RSS of the whole pack process):")
    for dtype, size, bits, m in pack_rows:
        print(f"  {dtype} checkpoint {size / MIB:.0f} MiB -> {bits}-bit: pack peak RSS {m['pack_peak_rss'] / MIB:.0f} MiB = "
              f"{m['pack_peak_rss'] / size:.2f} x checkpoint; above bare torch: {(m['pack_peak_rss'] - torch_rss) / size:.2f} x, "
              f"{m['pack_s']:.1f} s")
    print(f"\nwork dir: {work}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "torch":
            result = worker_torch()
        elif kind == "edgepack":
            result = worker_edgepack(rest[0], int(rest[1]))
        else:
            result = worker_seed(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(result))
    else:
        main()
