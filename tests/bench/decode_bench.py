"""Decode against the memory limit: edgepack 8-bit beside llama.cpp Q8_0 (llama-bench), quiet and busy.

    .venv/bin/python tests/bench/decode_bench.py [--cases 135m,1b,135m-int4] [--repeats 3] [--new-tokens 64]
                                                 [--no-busy] [--long] [--profile] [--table-bits 8] [--json F]

A bench a weak peer cannot flatter: it prints the box's read bandwidth (membw.py), each
bundle's bytes read per decoded token (every weight matrix once, the output layer included;
a tied embedding counts once, as the head), the bound those give (bandwidth / bytes), and
each engine's decode speed as a fraction of it. The peer is llama.cpp's own `llama-bench`,
built Release with GGML_NATIVE=ON from the llama.cpp inside the llama-cpp-python sdist
(peer_llamacpp.ensure_llamacpp_build), at the same thread counts.

Cases: `135m`, the default model (SmolLM2-135M-Instruct; edgepack 8-bit, packed without
smoothing and GPTQ, which change values only; GGUF Q8_0 from gguf_variants.py); `135m-int4`,
the same model at 4 bits: edgepack int4 (which holds the source's Q4_1 groups as they are)
beside llama.cpp running that Q4_1 source file; `1b`, random weights in Llama-3.2-1B's shapes with its
128256-token vocabulary (model_1b.py; edgepack 8-bit, GGUF by convert_hf_to_gguf.py +
llama-quantize Q8_0). Rounds of fresh processes alternate the engines (edgepack 2 and 1
threads, llama.cpp 2 and 1 threads); figures are medians over rounds, and the machine's
1-minute load average is recorded beside each. `busy`: the same rounds with one spinning
process (a pure Python busy loop, pinned nowhere) beside the run.

--long: prompt speed at 256 and 2048 tokens, decode speed after 2048 tokens of context,
and time from process start to the first token of a 2048-token prompt (135m only).
--profile: edgepack's own clock over one 8-bit decode step of each case (cpu_bench's), with
the pool's counts (parallel calls, futex wake-ups and sleeps per step).
--table-bits 8 (default): edgepack's bundles store the embedding table / output layer at 8
bits (`pack --table-bits 8`), as llama.cpp's Q8_0 does; the same bundle with 16-bit tables
runs in the same rounds at 2 threads ("edgepack t16"). 16: only the 16-bit-table bundles.
The edgepack rows run the engine as shipped: int8 activations into its int8 products (llama.cpp
Q8_0's arithmetic, the default on x86); "edgepack f32": the case's bundle with float32
activations (EDGEPACK_ACTIVATION_BITS=32, `--activations float`), 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORK = BENCH / ".work"
sys.path.insert(0, str(BENCH))
import membw  # noqa: E402  (same folder)
import peer_llamacpp as peer  # noqa: E402

ENGINES = (("edgepack", 0), ("edgepack", 2), ("edgepack", 1), ("llama.cpp", 2), ("llama.cpp", 1))  # 0: as shipped (threads adapted per step)
# with --table-bits 8: the same bundle with 16-bit tables, 2 threads, in the same rounds
BASELINE = ("edgepack t16", 2)
# the engine with float32 activations (EDGEPACK_ACTIVATION_BITS=32) on the case's bundle, 2 threads
FLOAT_ACTS = ("edgepack f32", 2)


# --- workers (fresh processes; print one JSON line) ------------------------------------------


def worker_edgepack(path: str, threads: int, prompt_n: int, new_n: int) -> dict:
    """edgepack's engine as `run` drives it: a prompt of prompt_n token ids (the held-out text,
    cycled), then new_n greedy steps, each a forward of one token and the C argmax."""
    t0 = float(os.environ.get(peer.T0_ENV, time.time()))
    if threads:  # a count asked for is used as given; none: the engine adapts it per step
        os.environ["EDGEPACK_THREADS"] = str(threads)
    else:
        os.environ.pop("EDGEPACK_THREADS", None), os.environ.pop("OMP_NUM_THREADS", None)
    import edgepack

    lm = edgepack.load(path, verify=False)
    if lm.backend != "native":
        raise SystemExit(f"the {lm.backend} backend ran, not edgepack's CPU engine")
    loaded = time.time()
    ids = lm.tokenizer.encode(peer.HELDOUT.read_text(), add_special_tokens=False)
    ids = (ids * (prompt_n // len(ids) + 1))[:prompt_n]
    model = lm.model
    cache = model.new_cache(prompt_n + new_n + 1)
    start = time.perf_counter()
    token = model.sample(model.forward(ids, cache), 0)
    prompt_s = time.perf_counter() - start
    first_token_s = time.time() - t0
    start = time.perf_counter()
    for _ in range(new_n):
        token = model.sample(model.forward([token], cache), 0)
    decode_s = time.perf_counter() - start
    return {"load_s": loaded - t0, "first_token_s": first_token_s, "prompt_tok_s": prompt_n / prompt_s,
            "decode_tok_s": new_n / decode_s if new_n else float("nan"), "threads": model.threads}


def worker_profile(path: str, threads: int) -> dict:
    import cpu_bench

    return {"profile": cpu_bench.profile_decode_step(Path(path), threads)}


# --- driver ------------------------------------------------------------------------------------


def load_average() -> float:
    return os.getloadavg()[0]


def spawn_edgepack(*args, activation_bits: int | None = None) -> dict:
    """A worker; activation_bits None: the engine's default."""
    env = dict(os.environ, **{peer.T0_ENV: repr(time.time())})
    env.pop("EDGEPACK_ACTIVATION_BITS", None)
    if activation_bits:
        env["EDGEPACK_ACTIVATION_BITS"] = str(activation_bits)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode cached
    load = load_average()
    out = subprocess.run([sys.executable, __file__, "worker", *map(str, args)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load_avg": load}


def one_run(engine: str, threads: int, case: dict, llama: dict, new_n: int) -> dict:
    if engine == FLOAT_ACTS[0]:
        return spawn_edgepack("edgepack", case["edgepack"], threads, 16, new_n, activation_bits=32)
    if engine.startswith("edgepack"):
        return spawn_edgepack("edgepack", case[engine], threads, 16, new_n)
    load = load_average()
    return {**peer.llama_bench(llama, case["gguf"], threads, 0, new_n), "load_avg": load}


class Spinner:
    """One busy process beside the run: a pure busy loop, pinned nowhere."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def engines(case: dict) -> tuple:
    return ENGINES + ((BASELINE,) if BASELINE[0] in case else ()) + (FLOAT_ACTS,)


def rounds(case: dict, llama: dict, repeats: int, new_n: int, label: str) -> dict:
    """{(engine, threads): {"decode_tok_s": median, "load_avg": [..], "runs": [..]}}."""
    runs: dict = {key: [] for key in engines(case)}
    for r in range(repeats):
        for engine, threads in engines(case):
            run = one_run(engine, threads, case, llama, new_n)
            runs[(engine, threads)].append(run)
            print(f"[{case['name']} {label} round {r + 1}] {engine} t={threads}: {run['decode_tok_s']:.1f} tok/s "
                  f"(load avg {run['load_avg']:.1f})", file=sys.stderr, flush=True)
    return {key: {"decode_tok_s": statistics.median(x["decode_tok_s"] for x in v),
                  "load_avg": [round(x["load_avg"], 1) for x in v], "runs": v} for key, v in runs.items()}


def safetensors_bytes(bundle: Path) -> int:
    return sum(f.stat().st_size for f in Path(bundle).glob("*.safetensors"))


def weight_bytes_per_token(bundle: Path) -> int:
    """Bytes a decode step reads from the bundle: every tensor once (norms and scales
    included); an untied embedding table is only indexed (one row), so it is left out."""
    headers = [json.loads(_header(f)) for f in Path(bundle).glob("*.safetensors")]
    tied = not any(name.startswith("lm_head.") for h in headers for name in h)
    total = 0
    for header in headers:
        for name, info in header.items():
            if name == "__metadata__" or (not tied and "embed_tokens" in name):
                continue
            total += info["data_offsets"][1] - info["data_offsets"][0]
    return total


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(n)


def gguf_bytes_per_token(path: Path) -> int:
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if tied or t.name != "token_embd.weight")


def kv_bytes_per_token(config: dict) -> int:
    """Key and value bytes one position adds to the cache: both engines keep 16-bit caches."""
    heads = config["num_attention_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"] * (config.get("num_key_value_heads") or heads) * dim * 2 * 2


def bundle_135m(table_bits: int) -> Path:
    from edgepack.export.pack import pack

    bundle = WORK / ("smollm2-135m-edgepack8" + ("-t8" if table_bits == 8 else ""))
    if not (bundle / "edgepack.json").exists():
        # smoothing and GPTQ change values only: the bytes and the kernels are the same
        pack("smollm2-135m", bundle, bits=8, smoothing=False, gptq=False, force=True, table_bits=table_bits)
    return bundle


def bundle_135m_int4(table_bits: int) -> Path:
    from edgepack.export.pack import pack

    bundle = WORK / ("smollm2-135m-edgepack-int4" + ("-t8" if table_bits == 8 else ""))
    if not (bundle / "edgepack.json").exists():  # int4 holds the source's Q4_1 groups as they are
        pack("smollm2-135m", bundle, bits=4, quant_type="int4", force=True, table_bits=table_bits)
    return bundle


def prepare(names: list[str], llama: dict, table_bits: int) -> list[dict]:
    cases = []
    for name in names:
        bundles = {}
        if name == "135m-int4":
            import gguf_variants

            bundles[table_bits] = bundle_135m_int4(table_bits)
            gguf_path = Path(gguf_variants.default_src_gguf())
            label = "SmolLM2-135M-Instruct int4 from its Q4_1 GGUF (vocab 49152, tied) beside that Q4_1 file"
        elif name == "135m":
            import gguf_variants

            for bits in {table_bits, 16}:
                bundles[bits] = bundle_135m(bits)
            gguf_path = gguf_variants.make_variants(out_dir=WORK / "gguf-135m")["Q8_0"]
            label = "SmolLM2-135M-Instruct (vocab 49152, tied)"
        else:
            import model_1b

            for bits in {table_bits, 16}:
                built = model_1b.build(table_bits=bits)
                bundles[bits] = Path(built["edgepack"])
            gguf_path = Path(built["gguf"])
            label = "random Llama, Llama-3.2-1B shapes (vocab 128256, tied)"
        bundle = bundles[table_bits]
        config = json.loads((bundle / "config.json").read_text())
        case = {"name": name, "label": label + (", edgepack with 8-bit tables" if table_bits == 8 else ""),
                "edgepack": str(bundle), "gguf": str(gguf_path),
                "bytes": {"edgepack": weight_bytes_per_token(bundle), "llama.cpp": gguf_bytes_per_token(gguf_path)},
                "kv_bytes_per_position": kv_bytes_per_token(config)}
        if table_bits == 8 and 16 in bundles:
            case[BASELINE[0]] = str(bundles[16])
            case["bytes"][BASELINE[0]] = weight_bytes_per_token(bundles[16])
        cases.append(case)
    return cases


def long_context(case: dict, llama: dict, repeats: int) -> dict:
    """Prompt tok/s at 256 and 2048 tokens, decode tok/s after 2048, first token of 2048."""
    out: dict = {"edgepack": [], "llama.cpp": []}
    args = ("--threads", "2", "--prompt-tokens", "2048", "--new-tokens", "1", "--n-ctx", "2112")
    for _ in range(repeats):
        short = spawn_edgepack("edgepack", case["edgepack"], 2, 256, 0)
        full = spawn_edgepack("edgepack", case["edgepack"], 2, 2048, 64)
        out["edgepack"].append({"prompt256_tok_s": short["prompt_tok_s"], "prompt2048_tok_s": full["prompt_tok_s"],
                                "decode_at2048_tok_s": full["decode_tok_s"], "first_token2048_s": full["first_token_s"],
                                "load_avg": full["load_avg"]})
        load = load_average()
        pp = peer.llama_bench(llama, case["gguf"], 2, prompt_n=256, new_n=0)["prompt_tok_s"]
        pp2 = peer.llama_bench(llama, case["gguf"], 2, prompt_n=2048, new_n=0)["prompt_tok_s"]
        tg = peer.llama_bench(llama, case["gguf"], 2, prompt_n=0, new_n=64, depth=2048)["decode_tok_s"]
        first = peer.spawn("worker", case["gguf"], llama, *args)["first_token_s"]
        out["llama.cpp"].append({"prompt256_tok_s": pp, "prompt2048_tok_s": pp2, "decode_at2048_tok_s": tg,
                                 "first_token2048_s": first, "load_avg": load})
        print(f"[long] edgepack {out['edgepack'][-1]}\n[long] llama.cpp {out['llama.cpp'][-1]}", file=sys.stderr, flush=True)
    return {eng: {k: statistics.median(r[k] for r in v) for k in v[0]} for eng, v in out.items()}


def print_report(bw: dict, llama: dict, cases: list[dict], results: dict, longs: dict, new_n: int) -> None:
    gb = bw["threads_all"]["on_cpu"]
    print(f"\nread bandwidth (membw.py, sum over a 1 GiB buffer, best of 5 passes): 1 thread {bw['threads_1']['on_cpu']:.1f} GB/s, "
          f"{bw['cpus']} threads {gb:.1f} GB/s over each thread's own CPU time (wall clock on this shared box: "
          f"{bw['threads_1']['wall']:.1f} / {bw['threads_all']['wall']:.1f}); bounds below use {gb:.1f} GB/s")
    print(f"llama.cpp: {llama['sdist']} vendor/llama.cpp {llama['commit']}, llama-bench, Release, GGML_NATIVE=ON")
    for case in cases:
        print(f"\n{case['label']}: {new_n} greedy tokens after a 16-token prompt, medians over rounds (load avg = 1-min loadavg at each run's start)")
        head = f"{'engine':<13}{'thr':>5}{'MB/token':>10}{'bound t/s':>10}   {'quiet t/s':>9}{'of bound':>9}  {'load avg':<16}{'busy t/s':>9}{'of quiet':>9}  {'load avg':<16}"
        print(head + "\n" + "-" * len(head))
        for engine, threads in engines(case):
            nbytes = case["bytes"]["edgepack" if engine == FLOAT_ACTS[0] else engine]
            bound = gb * 1e9 / nbytes
            q = results[case["name"]]["quiet"][(engine, threads)]
            b = results[case["name"]].get("busy", {}).get((engine, threads))
            line = (f"{engine:<13}{threads or 'auto':>5}{nbytes / 1e6:>10.1f}{bound:>10.1f}   {q['decode_tok_s']:>9.1f}{q['decode_tok_s'] / bound:>9.0%}  "
                    f"{','.join(map(str, q['load_avg'])):<16}")
            if b:
                line += f"{b['decode_tok_s']:>9.1f}{b['decode_tok_s'] / q['decode_tok_s']:>9.0%}  {','.join(map(str, b['load_avg'])):<16}"
            print(line)
        res = results[case["name"]]
        for label in ("quiet", "busy"):
            if label in res:
                e2, l2 = res[label][("edgepack", 2)]["decode_tok_s"], res[label][("llama.cpp", 2)]["decode_tok_s"]
                e1, l1 = res[label][("edgepack", 1)]["decode_tok_s"], res[label][("llama.cpp", 1)]["decode_tok_s"]
                best_e, best_l = max(e1, e2), max(l1, l2)
                auto = res[label][("edgepack", 0)]["decode_tok_s"]
                print(f"{label}: edgepack/llama.cpp at 2 threads {e2 / l2:.2f}x, at 1 thread {e1 / l1:.2f}x, best of each "
                      f"{best_e / best_l:.2f}x; edgepack as shipped (auto) / llama.cpp's best {auto / best_l:.2f}x")
                f32 = res[label][FLOAT_ACTS]["decode_tok_s"]
                print(f"{label}: int8 / float32 activations at 2 threads {e2 / f32:.2f}x")
                if BASELINE in res[label]:
                    print(f"{label}: 8-bit tables / 16-bit tables at 2 threads {e2 / res[label][BASELINE]['decode_tok_s']:.2f}x")
    for name, lc in longs.items():
        case = next(c for c in cases if c["name"] == name)
        print(f"\nlong context, {case['label']}, 2 threads (medians):")
        print(f"{'engine':<10}{'pp256 t/s':>10}{'pp2048 t/s':>11}{'tg@2048 t/s':>12}{'of bound':>9}{'1st tok 2048 s':>15}")
        for engine in ("edgepack", "llama.cpp"):
            r = lc[engine]
            bound = gb * 1e9 / (case["bytes"][engine] + 2048 * case["kv_bytes_per_position"])
            print(f"{engine:<10}{r['prompt256_tok_s']:>10.1f}{r['prompt2048_tok_s']:>11.1f}{r['decode_at2048_tok_s']:>12.1f}"
                  f"{r['decode_at2048_tok_s'] / bound:>9.0%}{r['first_token2048_s']:>15.2f}")
        e, ll = lc["edgepack"], lc["llama.cpp"]
        print(f"edgepack/llama.cpp: pp256 {e['prompt256_tok_s'] / ll['prompt256_tok_s']:.2f}x, pp2048 {e['prompt2048_tok_s'] / ll['prompt2048_tok_s']:.2f}x, "
              f"decode@2048 {e['decode_at2048_tok_s'] / ll['decode_at2048_tok_s']:.2f}x, first token (time) {e['first_token2048_s'] / ll['first_token2048_s']:.2f}x "
              f"(llama.cpp's through its Python bindings: process start, load, prompt)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="135m,1b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-busy", action="store_true")
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--table-bits", type=int, choices=(8, 16), default=8,
                    help="edgepack's embedding table / output layer (8: also runs the 16-bit-table bundle as a baseline)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    unknown = sorted(set(a.cases.split(",")) - {"135m", "1b", "135m-int4"})
    if unknown:
        raise SystemExit(f"error: unknown case {unknown[0]!r}\nhint: --cases takes 135m, 1b and 135m-int4, comma-separated")
    WORK.mkdir(exist_ok=True)
    llama = peer.ensure_llamacpp_env()
    cases = prepare(a.cases.split(","), llama, a.table_bits)
    bw = membw.measure()
    results: dict = {}
    for case in cases:
        for engine, _ in set(engines(case)):  # page cache warm
            one_run(engine, 2, case, llama, 4)
        results[case["name"]] = {"quiet": rounds(case, llama, a.repeats, a.new_tokens, "quiet")}
        if not a.no_busy:
            with Spinner():
                results[case["name"]]["busy"] = rounds(case, llama, a.repeats, a.new_tokens, "busy")
        if len(cases) > 1:  # each case's table as soon as it is measured (a 1B case takes a while)
            print_report(bw, llama, [case], results, {}, a.new_tokens)
    longs = {"135m": long_context(cases[0], llama, a.repeats)} if a.long and cases[0]["name"] == "135m" else {}
    print_report(bw, llama, cases, results, longs, a.new_tokens)
    if a.profile:
        for case in cases:
            print(f"\nwhere one 8-bit decode step of {case['label']} spends its time (2 threads):")
            print(spawn_edgepack("profile", case["edgepack"], 2)["profile"])
    if a.json:
        flat = {n: {lab: {f"{e} t={t}": v for (e, t), v in r.items()} for lab, r in res.items()} for n, res in results.items()}
        a.json.write_text(json.dumps({"bandwidth": bw, "cases": cases, "results": flat, "long": longs}, indent=1, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "edgepack":
            result = worker_edgepack(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            result = worker_profile(rest[0], int(rest[1]))
        print(json.dumps(result))
    else:
        main()
