"""The planner's memory and speed models against reality, on this machine's CPU.

    .venv/bin/python tests/bench/plan_accuracy.py [--bundles DIR] [--tiny-only] [--sliding-only]
    .venv/bin/python tests/bench/plan_accuracy.py --speed [--bundles DIR] [--repeats 3]

--speed: the predicted decode tokens/s (plan/speed.py: bytes read a token / this box's read
bandwidth as `edgepack profile` measures it x the engine's efficiency) beside the measured
decode speed of the default model at 8 bits and int4, each a median of fresh processes
(a 16-token prompt, then 64 greedy steps on edgepack's C engine, threads as shipped), with
the 1-minute load average at each run; exit status 1 if a prediction is off by more than
20%.

For the default model (alias smollm2-135m) and the tiny test models, packed at 16/8/4 bits,
at two context lengths, a fresh ``edgepack run BUNDLE PROMPT --max-new-tokens N
--min-new-tokens N`` process runs with a prompt of ``context - N`` tokens, so prompt plus
generation fill the context. Its peak RSS (VmHWM, reported by the process at exit) is
printed beside the planner's predicted peak for the same setting (baseline + weights +
max(loading copies, allocator heap + KV cache + activations); headroom is a margin, not
use). Llama-family models run every runtime path: edgepack's C engine (native: int8, int4
and 16-bit), its lean decoder on torch and transformers (EDGEPACK_LEAN=0). A random
Gemma-3-shaped model (sliding_case: 10 of 12 layers attend to a 512-token window, 44M
weights) runs on the C engine at contexts past its window, where the KV cache of the
sliding-window layers is a ring of 512 positions. Exit status 1 if any prediction is off by
more than 10%.

It first measures what sizing.BASELINE_BYTES and TOKENIZER_BYTES_PER_TOKEN hold: the
process of `edgepack run` on a tiny bundle (weights, KV cache and activations under 1 MiB:
what remains is interpreter + torch + the runtime's imports + a 400-token tokenizer), and
the RSS a fresh process gains loading SmolLM2's 49,152-token tokenizer.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edgepack.plan import planner, sizing  # noqa: E402

MIB = 1 << 20
TOLERANCE = 0.10
DEFAULT_MODEL = "smollm2-135m"
TEXT = (
    "The capital of France is Paris. The capital of Italy is Rome. Water boils at one hundred "
    "degrees, and the quick brown fox jumps over the lazy dog. Small boxes run small models: a "
    "Raspberry Pi, a Jetson, a laptop without a GPU. Quantization stores weights in eight or four "
    "bits instead of sixteen. "
) * 300
# `edgepack run` as its console script runs it, plus an exit hook printing the process's
# own high-water RSS (VmHWM). Not ru_maxrss from wait4: Python starts children with vfork,
# and Linux carries the parent's high-water mark into the child's ru_maxrss at exec.
EDGEPACK = [sys.executable, "-c", (
    "import atexit, sys\n"
    "def report():\n"
    "    hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
    "    sys.stderr.write(f'\\nBENCH_VMHWM_KIB {hwm}\\n')\n"
    "atexit.register(report)\n"
    "from edgepack.cli import main\n"
    "sys.exit(main())\n"
)]


def peak_rss(cmd: list[str], env: dict[str, str] | None = None, timeout_s: float = 600) -> int:
    """Peak RSS in bytes of a fresh `edgepack` process, as the kernel counted it."""
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:6])} exited {done.returncode}: {done.stderr[-2000:]}")
    line = next(ln for ln in reversed(done.stderr.splitlines()) if ln.startswith("BENCH_VMHWM_KIB "))
    return int(line.split()[1]) * 1024


def prompt_of(bundle: Path, tokens: int) -> str:
    """Text that the bundle's tokenizer encodes (special tokens included) to ``tokens`` ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    take = tokens
    for _ in range(20):
        text = tok.decode(ids[:take])
        got = len(tok.encode(text, add_special_tokens=True).ids)
        if got == tokens:
            return text
        take += tokens - got
    raise RuntimeError(f"no prompt of exactly {tokens} tokens for {bundle}")


# --- bundles ------------------------------------------------------------------------------------


def tiny_sources(root: Path) -> dict[str, Path]:
    from tiny import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    paths = {}
    for kind in ("gpt2", "llama"):
        path = root / f"tiny-{kind}"
        if not (path / "config.json").is_file():
            make_model(kind, len(tokenizer)).save_pretrained(path)
            tokenizer.save_pretrained(path)
        paths[f"tiny-{kind}"] = path
    return paths


SETTINGS = {16: (16, "nf4"), 8: (8, "nf4"), 4: (4, "nf4"), "int4": (4, "int4")}  # label -> (bits, quant_type)
# runtime path -> (environment, `edgepack run` flags)
PATHS = {
    "native": ({}, ["--backend", "native"]),
    "lean": ({"EDGEPACK_LEAN": "1"}, ["--backend", "torch"]),
    "transformers": ({"EDGEPACK_LEAN": "0"}, ["--backend", "torch"]),
}


def bundles_for(name: str, source: str, root: Path) -> dict[int | str, Path]:
    from edgepack.export.pack import pack

    out = {}
    for label, (bits, quant_type) in SETTINGS.items():
        path = root / f"{name}-{label}bit"
        if not (path / "edgepack.json").is_file():
            print(f"packing {name} at {label}", file=sys.stderr, flush=True)
            pack(source, path, bits=bits, quant_type=quant_type, force=True)
        out[label] = path
    return out


# A Gemma-3-shaped model (gemma-3-1b's 5 sliding-window layers to 1 global, head_dim 256,
# one KV head; narrower and shallower): 44M weights, 88 MB at 16 bits, so the weights are
# measurable beside the engine's ~30 MiB process. At 4096 tokens of context its KV cache is
# 13 MiB with rings of the 512-token window, 48 MiB without: a cache kept whole would put the
# prediction ~35 MiB (20-40%) under the measured peak.
SLIDING_MODEL = "gemma3-sw"
SLIDING_SETTINGS = (16, 8, "int4")
SLIDING_CONTEXTS = (1024, 4096)


def sliding_case(root: Path) -> tuple:
    """(name, source, bundles, contexts, new_tokens, paths) of the sliding-window model, packed
    into ``root`` once (bundles kept there are reused)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from edgepack.export.pack import pack
    from tiny import make_tokenizer

    source = root / SLIDING_MODEL
    if not (source / "config.json").is_file():
        tokenizer = make_tokenizer()
        config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536,
                                  num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                  sliding_window=512, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0)
        assert config.layer_types.count("sliding_attention") == 10
        torch.manual_seed(0)
        Gemma3ForCausalLM(config).save_pretrained(source)
        tokenizer.save_pretrained(source)
    bundles = {}
    for label in SLIDING_SETTINGS:
        bits, quant_type = SETTINGS[label]
        path = root / f"{SLIDING_MODEL}-{label}bit"
        if not (path / "edgepack.json").is_file():
            print(f"packing {SLIDING_MODEL} at {label}", file=sys.stderr, flush=True)
            pack(str(source), path, bits=bits, quant_type=quant_type, force=True)
        bundles[label] = path
    return SLIDING_MODEL, str(source), bundles, SLIDING_CONTEXTS, 16, ("native",)


def sliding_only(root: Path, keep: bool) -> int:
    """--sliding-only: the sliding-window model's rows and their worst error; 1 if one is off."""
    print(HEADER)
    rows = compare(*sliding_case(root))
    worst = max(abs(r["predicted"] / r["measured"] - 1) for r in rows)
    print(f"\n{len(rows)} runs of {SLIDING_MODEL}, worst error {worst:.1%} (tolerance ±{TOLERANCE:.0%})")
    if not keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 1 if worst > TOLERANCE else 0


# --- baseline -----------------------------------------------------------------------------------

TOKENIZER_PROBE = """
import sys
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
def trim():  # the runtime gives freed heap back after loading the tokenizer (glibc)
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
from tokenizers import Tokenizer
trim()
before = rss()
tok = Tokenizer.from_file(sys.argv[1])
trim()
print(rss() - before, tok.get_vocab_size(with_added_tokens=True))
"""


def measure_baselines(tiny_llama: dict[int, Path]) -> dict[str, int]:
    """The process of `edgepack run` on the tiny 16-bit llama bundle, by runtime path,
    minus the (< 1 MiB) weights, KV cache, activations and tokenizer the planner predicts."""
    from edgepack.cli.plan import describe_model, load_config

    bundle = tiny_llama[16]
    desc = describe_model(load_config(str(bundle)))
    out = {}
    for path in PATHS:
        env, flags = PATHS[path]
        runs = [peak_rss([*EDGEPACK, "run", str(bundle), "Hello", "--max-new-tokens", "2", "--no-verify", *flags], env)
                for _ in range(3)]
        p = planner.plan(desc, _profile(), context=16, prompt_tokens=8, bits=16, runtime=path)
        rest = p.devices["cpu"].peak_bytes - p.devices["cpu"].baseline_bytes
        tokenizer = sizing.TOKENIZER_BYTES_PER_TOKEN * desc.vocab_size
        out[path] = min(runs) - rest - tokenizer
    return out


def measure_tokenizer(bundle: Path) -> float:
    done = subprocess.run([sys.executable, "-c", TOKENIZER_PROBE, str(bundle / "tokenizer.json")],
                          capture_output=True, text=True, check=True)
    grown, vocab = map(int, done.stdout.split())
    return grown / vocab


# --- the comparison -----------------------------------------------------------------------------


def _profile() -> dict:
    """This machine as a CPU-only profile with room to spare: only the prediction matters."""
    from edgepack.plan.profile import load_profile

    d = load_profile("cpu-laptop-16gb").to_dict()
    arch = platform.machine()
    d.update(name="bench-cpu", ram_bytes=1 << 40, ram_reserved_bytes=0)
    d["cpu"] = {**d["cpu"], "arch": arch}
    return d


def compare(name: str, source: str, bundles: dict[int, Path], contexts: tuple[int, ...], new_tokens: int,
            paths: tuple[str, ...]) -> list[dict]:
    from edgepack.cli.plan import describe_model, load_config

    desc = describe_model(load_config(source), name=name)
    rows = []
    for label, bundle in bundles.items():
        bits, quant_type = SETTINGS[label]
        for context in contexts:
            prompt_tokens = context - new_tokens
            prompt = prompt_of(bundle, prompt_tokens)
            for path in paths:
                if path == "native" and label == 4:
                    continue  # nf4: not the C engine's format
                env, flags = PATHS[path]
                cmd = [*EDGEPACK, "run", str(bundle), prompt, "--max-new-tokens", str(new_tokens),
                       "--min-new-tokens", str(new_tokens), "--temperature", "0", "--no-verify", *flags]
                measured = peak_rss(cmd, env)
                p = planner.plan(desc, _profile(), context=context, prompt_tokens=prompt_tokens, bits=bits,
                                 quant_type=quant_type, runtime=path)
                cpu = p.devices["cpu"]
                rows.append(dict(model=name, bits=label, path=path, context=context, prompt=prompt_tokens,
                                 predicted=cpu.peak_bytes, measured=measured, weights=cpu.weights_bytes,
                                 kv=cpu.kv_cache_bytes, act=cpu.activations_bytes, loading=cpu.loading_bytes,
                                 heap=cpu.allocator_bytes,
                                 baseline=cpu.baseline_bytes))
                print(_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'model':<14}{'bits':>4} {'runtime':<13}{'ctx':>5}{'prompt':>7}{'baseline':>9}{'weights':>9}"
          f"{'KV':>7}{'act':>7}{'load':>7}{'heap':>7}{'predicted':>10}{'measured':>10}{'error':>8}")


def _row(r: dict) -> str:
    err = r["predicted"] / r["measured"] - 1
    mib = lambda k: f"{r[k] / MIB:.1f}"  # noqa: E731
    flag = "" if abs(err) <= TOLERANCE else "  <-- off"
    return (f"{r['model']:<14}{r['bits']:>4} {r['path']:<13}{r['context']:>5}{r['prompt']:>7}{mib('baseline'):>9}"
            f"{mib('weights'):>9}{mib('kv'):>7}{mib('act'):>7}{mib('loading'):>7}{mib('heap'):>7}{mib('predicted'):>10}"
            f"{mib('measured'):>10}{err:>+8.1%}{flag}")


# --- speed --------------------------------------------------------------------------------------

SPEED_TOLERANCE = 0.20
SPEED_PROMPT, SPEED_NEW = 16, 64
DECODE_WORKER = """
import json, sys, time
import edgepack
lm = edgepack.load(sys.argv[1], verify=False)
if lm.backend != "native":
    raise SystemExit(f"the {lm.backend} backend ran, not edgepack's CPU engine")
prompt_n, new_n = int(sys.argv[2]), int(sys.argv[3])
ids = (lm.tokenizer.encode("The capital of France is Paris. " * 8, add_special_tokens=False) * prompt_n)[:prompt_n]
model = lm.model
cache = model.new_cache(prompt_n + 4 + new_n + 1)  # prompt, warm-up steps, timed steps
token = model.sample(model.forward(ids, cache), 0)
for _ in range(4):  # warm: first steps fault the weights in
    token = model.sample(model.forward([token], cache), 0)
start, cpu = time.perf_counter(), time.process_time()
for _ in range(new_n):
    token = model.sample(model.forward([token], cache), 0)
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"decode_tok_s": new_n / wall, "on_cpu_tok_s": new_n / (cpu / model.threads), "threads": model.threads}))
"""


def speed_report(root: Path, repeats: int) -> int:
    import json
    import statistics

    from edgepack.cli.plan import load_source
    from edgepack.plan.model import describe_model
    from edgepack.plan.probe import read_bandwidth

    config, precision = load_source(DEFAULT_MODEL)
    desc = describe_model(config, name=DEFAULT_MODEL)
    settings = {"8-bit": (8, "nf4"), "int4": (4, "int4")}
    bundles = {}
    for label, (bits, quant_type) in settings.items():
        path = root / f"{DEFAULT_MODEL}-{label}"
        if not (path / "edgepack.json").is_file():
            from edgepack.export.pack import pack

            print(f"packing {DEFAULT_MODEL} at {label}", file=sys.stderr, flush=True)
            # smoothing and GPTQ change values only, not the bytes a step reads (decode_bench.py packs so too)
            pack(DEFAULT_MODEL, path, bits=bits, quant_type=quant_type, force=True, smoothing=False, gptq=False)
        bundles[label] = path
    reads = []
    runs: dict[str, list[tuple[float, float, float]]] = {label: [] for label in settings}
    for _ in range(repeats):  # bandwidth and engines alternate, so load swings hit them alike
        reads.append(read_bandwidth()[0])
        for label, path in bundles.items():
            load = os.getloadavg()[0]
            done = subprocess.run([sys.executable, "-c", DECODE_WORKER, str(path), str(SPEED_PROMPT), str(SPEED_NEW)],
                                  capture_output=True, text=True, cwd=ROOT, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"decode worker on {path} exited {done.returncode}: {done.stderr[-2000:]}")
            got = json.loads(done.stdout.splitlines()[-1])
            runs[label].append((got["decode_tok_s"], load, got["on_cpu_tok_s"]))
    bandwidth = statistics.median(reads)
    profile = _profile()
    profile["memory_bandwidth"] = {"read_bytes_per_s": int(bandwidth), "basis": "measured",
                                   "theoretical_bytes_per_s": None, "source": "plan_accuracy.py --speed"}
    context = SPEED_PROMPT + 4 + SPEED_NEW // 2  # the cache's mean length over the timed steps
    print(f"read bandwidth (edgepack profile's probe, median of {repeats}): {bandwidth / 1e9:.1f} GB/s "
          f"({', '.join(f'{r / 1e9:.1f}' for r in reads)})")
    try:  # the C loop decode_bench.py's efficiency was measured against, for comparison
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import membw

        c_read = membw.measure(gib=0.5, passes=3)["threads_all"]["on_cpu"]
        print(f"membw.py (C, all threads, on-CPU time): {c_read:.1f} GB/s")
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"membw.py: not run ({exc})")
    print(f"{'setting':<8}{'MB/token':>9}{'efficiency':>11}{'predicted':>10}{'measured':>10}{'error':>8}"
          f"{'on-CPU':>8}{'error':>8}  runs (tok/s @ load avg)")
    off = 0
    for label, (bits, quant_type) in settings.items():
        p = planner.plan(desc, profile, context=context, prompt_tokens=SPEED_PROMPT, bits=bits, quant_type=quant_type,
                         runtime="native", source=precision)
        measured = statistics.median(r[0] for r in runs[label])
        on_cpu = statistics.median(r[2] for r in runs[label])
        err = p.speed.tokens_per_s / measured - 1
        off += abs(err) > SPEED_TOLERANCE
        cpu = p.speed.devices["cpu"]
        print(f"{label:<8}{p.speed.bytes_per_token / 1e6:>9.1f}{cpu['efficiency']:>11.3f}{p.speed.tokens_per_s:>10.1f}"
              f"{measured:>10.1f}{err:>+8.1%}{on_cpu:>8.1f}{p.speed.tokens_per_s / on_cpu - 1:>+8.1%}  "
              + ", ".join(f"{t:.1f} @ {la:.1f}" for t, la, _ in runs[label])
              + ("  <-- off" if abs(err) > SPEED_TOLERANCE else ""))
    print(f"(predicted at {context} tokens of cache, the mean over the timed steps; tolerance ±{SPEED_TOLERANCE:.0%} "
          "on the wall-clock figure; on-CPU: steps over the process's CPU time / threads, which a busy box "
          "inflates less but spinning workers deflate)")
    return 1 if off else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, default=None, help="keep bundles here and reuse them (default: a temp dir)")
    parser.add_argument("--tiny-only", action="store_true", help=f"skip {DEFAULT_MODEL}")
    parser.add_argument("--speed", action="store_true", help="predicted decode tokens/s beside the measured, only")
    parser.add_argument("--repeats", type=int, default=3, help="--speed: fresh processes per setting")
    parser.add_argument("--sliding-only", action="store_true", help=f"only the sliding-window model ({SLIDING_MODEL})")
    args = parser.parse_args()
    root = args.bundles or Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.speed:
        return speed_report(root, args.repeats)
    if args.sliding_only:
        return sliding_only(root, keep=args.bundles is not None)
    tiny = {name: (str(path), bundles_for(name, str(path), root)) for name, path in tiny_sources(root).items()}

    print(f"platform: {platform.machine()} {platform.system()}, python {platform.python_version()}")
    baselines = measure_baselines(tiny["tiny-llama"][1])
    for path, measured in baselines.items():
        held = sizing.BASELINE_BYTES[(platform.machine(), path)]
        print(f"baseline ({path} runtime, no tokenizer): measured {measured / MIB:.1f} MiB, "
              f"sizing.BASELINE_BYTES has {held / MIB:.1f} MiB ({held / measured - 1:+.1%})")
    models = [("tiny-gpt2", *tiny["tiny-gpt2"], (64, 128), 8, ("transformers",)),
              ("tiny-llama", *tiny["tiny-llama"], (64, 128), 8, ("native", "lean", "transformers"))]
    models.append(sliding_case(root))
    if not args.tiny_only:
        smol = bundles_for(DEFAULT_MODEL, DEFAULT_MODEL, root)
        per_token = measure_tokenizer(smol[16])
        print(f"tokenizer: {per_token:.0f} bytes per vocabulary entry measured, "
              f"sizing.TOKENIZER_BYTES_PER_TOKEN has {sizing.TOKENIZER_BYTES_PER_TOKEN}")
        models.append((DEFAULT_MODEL, DEFAULT_MODEL, smol, (256, 1024), 16, ("native", "lean", "transformers")))
    print()
    print(HEADER)
    rows = []
    for name, source, bundles, contexts, new_tokens, paths in models:
        rows += compare(name, source, bundles, contexts, new_tokens, paths)
    off = [r for r in rows if abs(r["predicted"] / r["measured"] - 1) > TOLERANCE]
    worst = max(abs(r["predicted"] / r["measured"] - 1) for r in rows)
    print(f"\n{len(rows)} runs, worst error {worst:.1%}; {len(off)} outside ±{TOLERANCE:.0%}"
          f" (MiB; predicted = baseline + weights + max(load, heap + KV + act), no headroom)")
    if not args.bundles:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
