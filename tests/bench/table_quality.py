"""What 8-bit tables (``edgepack pack --table-bits 8``) cost in quality on the default model.

    .venv/bin/python tests/bench/table_quality.py [--formats 8,4-int4] [--tables t16,t8,t8b32] [--rtn]
                                                  [--work DIR] [--activation-bits 8] [--peer-q8]

Packs SmolLM2-135M-Instruct per format with each kind of tables (the tied embedding table /
output layer): t16 16-bit, t8 8-bit with a scale per row (int8-rowwise), t8b32 8-bit with a
float16 scale per block of 32 (int8-block32, the default), then scores each bundle as
cpu_bench does: held-out perplexity, mean KL and top-1 agreement against the float32
source on cpu_bench's quality text (~4k tokens), one token a step through edgepack's CPU
engine. Prints one row per bundle, and per format the perplexity delta each 8-bit kind adds
over t16 with its standard error (paired per-token differences between the two bundles:
the same tokens). --activation-bits 8 also scores each 8-bit and int4 bundle with the engine's int8
activations (EDGEPACK_ACTIVATION_BITS=8; the other rows pin float32, =32). A bundle already
in --work is scored as it is, not packed again. --peer-q8: also llama.cpp Q8_0
(gguf_variants.py's file, llama.cpp's own arithmetic through its Python bindings,
peer_llamacpp.py) on the same tokens, as a row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import cpu_bench  # noqa: E402
import gguf_variants  # noqa: E402
import peer_llamacpp as peer  # noqa: E402

FORMATS = {"8": {"bits": 8}, "4-int4": {"bits": 4, "quant_type": "int4"}, "16": {"bits": 16}}
TABLES = {"t16": 16, "t8": 8, "t8b32": 8}  # t8: a scale per row (the exporter's choice for rows not whole blocks)


def pack_tables(out: Path, kind: str, **options) -> None:
    """pack() with tables of ``kind`` (TABLES)."""
    from edgepack.export import quantize
    from edgepack.export.pack import pack

    chosen = quantize.table_scheme
    if kind == "t8":
        quantize.table_scheme = lambda widths: quantize.TABLE_SCHEME_ROWWISE
    try:
        pack("smollm2-135m", out, force=True, table_bits=TABLES[kind], **options)
    finally:
        quantize.table_scheme = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="8,4-int4", help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--tables", default="t16,t8,t8b32", help=f"comma-separated, of {', '.join(TABLES)}")
    parser.add_argument("--work", default=None, help="folder for the bundles (default: a new temporary one)")
    parser.add_argument("--rtn", action="store_true",
                        help="8-bit: pack without smoothing and GPTQ (round to nearest: minutes less on a busy box)")
    parser.add_argument("--activation-bits", type=int, choices=(8, 32), default=32,
                        help="8: also score the 8-bit and int4 bundles with int8 activations")
    parser.add_argument("--peer-q8", action="store_true", help="also score llama.cpp Q8_0 on the same tokens")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from edgepack.export.sources import resolve_source

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="edgepack-table-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    bundles = {}
    for fmt in args.formats.split(","):
        for kind in args.tables.split(","):
            out = work / f"bundle-{fmt}{'-rtn' if args.rtn and fmt == '8' else ''}-{kind}"
            if not (out / "edgepack.json").exists():
                rtn = {"smoothing": False, "gptq": False} if args.rtn and fmt == "8" else {}
                pack_tables(out, kind, **FORMATS[fmt], **rtn)
            bundles[f"{fmt} {kind}"] = out
    src = resolve_source("smollm2-135m")
    tokens = np.array(cpu_bench.quality_ids(AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)))
    ref = peer.reference_logprobs(gguf_variants.default_src_gguf(), tokens)
    np.save(work / "tokens.npy", tokens)
    ref_ppl = peer.perplexity(ref, tokens)
    print(f"SmolLM2-135M-Instruct, {len(tokens)} tokens of cpu_bench's quality text; source perplexity {ref_ppl:.4f}")
    print(f"{'bundle':<14}{'MB':>8}{'ppl':>9}{'vs source':>11}{'KL':>10}{'top1':>8}")
    lps = {}
    runs = [(name, path, "32") for name, path in bundles.items()]
    if args.activation_bits == 8:
        runs += [(name + " a8", path, "8") for name, path in bundles.items() if name.startswith(("8 ", "4-int4 "))]
    for name, path, act_bits in runs:
        os.environ["EDGEPACK_ACTIVATION_BITS"] = act_bits  # the worker's engine reads it at import
        saved = work / f"lp-{path.name}{'-a8' if act_bits == '8' else ''}.npy"  # scored before: kept in --work
        if not saved.exists():
            cpu_bench.spawn("quality", str(path), str(work / "tokens.npy"), str(saved))
        lps[name] = lp = np.load(saved)
        q = peer.compare_logprobs(ref, lp)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6
        ppl = peer.perplexity(lp, tokens)
        print(f"{name:<14}{size:>8.1f}{ppl:>9.4f}{100 * (ppl / ref_ppl - 1):>+10.2f}%{q['kl_mean']:>10.5f}{q['top1_agree']:>8.4f}")
    if args.peer_q8:
        gguf = gguf_variants.make_variants(out_dir=BENCH / ".work" / "gguf-135m")["Q8_0"]
        out = peer.spawn("quality", gguf, peer.ensure_llamacpp_env(), "--threads", "2", "--out-dir", str(work))
        if not np.array_equal(np.load(out["tokens"]), tokens):
            raise SystemExit("llama.cpp tokenized the quality text differently: no row for it")
        lp = np.load(out["logprobs"])
        q, ppl = peer.compare_logprobs(ref, lp), peer.perplexity(lp, tokens)
        print(f"{'llama.cpp Q8_0':<14}{gguf.stat().st_size / 1e6:>8.1f}{ppl:>9.4f}{100 * (ppl / ref_ppl - 1):>+10.2f}%"
              f"{q['kl_mean']:>10.5f}{q['top1_agree']:>8.4f}")
    pos = np.arange(len(tokens) - 1)
    for fmt in args.formats.split(","):
        for kind in [k for k in args.tables.split(",") if k != "t16" and f"{fmt} t16" in lps]:
            wide, narrow = lps[f"{fmt} t16"], lps[f"{fmt} {kind}"]
            diff = wide[pos, tokens[1:]].astype(np.float64) - narrow[pos, tokens[1:]]
            print(f"{fmt}: 8-bit tables ({kind}) change perplexity by {100 * (np.exp(diff.mean()) - 1):+.3f}% "
                  f"(standard error {100 * diff.std(ddof=1) / np.sqrt(len(diff)):.3f}%)")
    for name in [n for n in lps if n.endswith(" a8")]:
        diff = lps[name[:-3]][pos, tokens[1:]].astype(np.float64) - lps[name][pos, tokens[1:]]
        print(f"{name[:-3]}: int8 activations change perplexity by {100 * (np.exp(diff.mean()) - 1):+.3f}% "
              f"(standard error {100 * diff.std(ddof=1) / np.sqrt(len(diff)):.3f}%)")


if __name__ == "__main__":
    main()
