"""Pack memory benchmark: peak RSS of `edgepack pack` against the checkpoint it reads.

    .venv/bin/python tests/bench/pack_memory.py [--layers 22] [--dtype bfloat16] [--settings 8,int4,nf4] [--seed]

On the 135M default model the fixed ~400 MiB of torch + transformers + bitsandbytes
dominates any ratio, so this builds a bigger Llama checkpoint with random weights (hidden
2048, intermediate 5632, vocabulary 49152, untied: 1.17B parameters at 22 layers, 2.2 GiB
in bf16, sharded at 1GB like a Hub checkpoint) and packs it in fresh processes, each one's
peak RSS (VmHWM) printed beside the checkpoint's size. --seed adds the seed recipe
(transformers + BitsAndBytesConfig quantizing on load, plus one forward) in the same run.
Target (issue #4): pack peak <= 1.3 x the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20
HWM = "next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))"
SETTINGS = {"8": (8, "nf4"), "int4": (4, "int4"), "nf4": (4, "nf4"), "16": (16, "nf4")}


def build_checkpoint(out: Path, layers: int, dtype: str) -> int:
    code = f"""
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from edgepack.export.sources import resolve_source
src = resolve_source("smollm2-135m")
tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers={layers},
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
torch.manual_seed(0)
torch.set_default_dtype(torch.{dtype})
model = LlamaForCausalLM(cfg)
model.save_pretrained({str(out)!r}, max_shard_size="1GB")
tok.save_pretrained({str(out)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def pack_peak(ckpt: Path, out: Path, bits: int, quant_type: str) -> dict:
    code = (
        "import json, time\nt = time.perf_counter()\nfrom edgepack.export.pack import pack\n"
        f"m = pack({str(ckpt)!r}, {str(out)!r}, bits={bits}, quant_type={quant_type!r}, force=True)\n"
        f"print(json.dumps({{'peak': {HWM}, 'seconds': time.perf_counter() - t, "
        "'weight_bytes': m['memory']['weight_bytes']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def seed_peak(ckpt: Path, bits: int) -> dict:
    code = (
        "import json, time, torch\nt = time.perf_counter()\n"
        "from transformers import AutoModelForCausalLM, BitsAndBytesConfig\n"
        f"q = BitsAndBytesConfig(load_in_8bit=True) if {bits} == 8 else BitsAndBytesConfig(load_in_4bit=True)\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, quantization_config=q, device_map='cpu')\n"
        "with torch.inference_mode():\n    m(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))\n"
        f"print(json.dumps({{'peak': {HWM}, 'seconds': time.perf_counter() - t}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--settings", default="8,int4,nf4", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--seed", action="store_true", help="also measure the seed recipe (8-bit)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgepack-pack-memory-"))
    try:
        started = time.perf_counter()
        size = build_checkpoint(work / "ckpt", args.layers, args.dtype)
        print(f"random Llama checkpoint: {args.layers} layers, {args.dtype}, {size / MIB:.0f} MiB "
              f"(built in {time.perf_counter() - started:.0f} s)\n")
        print(f"{'run':<22}{'peak RSS MiB':>13}{'x checkpoint':>14}{'seconds':>9}{'bundle weights MiB':>20}")
        for name in args.settings.split(","):
            bits, quant_type = SETTINGS[name]
            r = pack_peak(work / "ckpt", work / f"out-{name}", bits, quant_type)
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
            print(f"{'edgepack pack ' + name:<22}{r['peak'] / MIB:>13.0f}{r['peak'] / size:>14.2f}{r['seconds']:>9.0f}"
                  f"{r['weight_bytes'] / MIB:>20.0f}")
        if args.seed:
            r = seed_peak(work / "ckpt", 8)
            print(f"{'seed bnb 8-bit load':<22}{r['peak'] / MIB:>13.0f}{r['peak'] / size:>14.2f}{r['seconds']:>9.0f}")
        print("\ntarget: pack peak <= 1.3 x checkpoint")
    finally:
        if args.keep:
            print(f"work dir: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
