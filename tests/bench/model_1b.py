"""A 1B-class case for the CPU bench: random weights in Llama-3.2-1B's shapes.

    python tests/bench/model_1b.py [--vocab 128256]   # prints the paths as JSON

Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 heads / 8 key-value heads of 64, MLP
8192, tied embeddings, vocabulary 128256), random weights (decode and prompt speed do not
depend on the values), SmolLM2's tokenizer (49152 tokens; ids above it are never fed, and
llama.cpp's converter names them [PAD<id>]). Written once, cached in tests/bench/.work/:
  - the Hugging Face checkpoint (bfloat16 safetensors, ~2.5 GB),
  - the edgepack 8-bit bundle (packed with smoothing and GPTQ off: both only change values;
    with --table-bits 8, its embedding table / output layer at 8 bits too),
  - the GGUF Q8_0 file as llama.cpp's users make it: its convert_hf_to_gguf.py (from the
    same llama-cpp-python sdist the peer is built from) to F16, then llama-quantize Q8_0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORK = BENCH / ".work"
LLAMA_3_2_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=64, intermediate_size=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                    rope_theta=500000.0, max_position_embeddings=8192)


def checkpoint(vocab: int) -> Path:
    out = WORK / f"llama1b-v{vocab}-hf"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(BENCH))
    from gguf_variants import default_src_gguf

    src = default_src_gguf()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = LlamaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.02, **LLAMA_3_2_1B)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp-write")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="20GB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def bundle(hf: Path, table_bits: int = 16) -> Path:
    out = hf.with_name(hf.name.replace("-hf", "-edgepack8" + ("-t8" if table_bits == 8 else "")))
    if (out / "edgepack.json").exists():
        return out
    from edgepack.export.pack import pack

    pack(str(hf), out, bits=8, smoothing=False, gptq=False, force=True, table_bits=table_bits)
    return out


def gguf_q8(hf: Path, llama_bin: Path, convert_py: Path) -> Path:
    out = hf.with_name(hf.name.replace("-hf", "-Q8_0.gguf"))
    if out.exists():
        return out
    f16 = hf.with_name(hf.name.replace("-hf", "-F16.gguf"))
    if not f16.exists():
        # the converter imports the gguf-py that ships beside it, not whatever gguf is
        # installed, and imports sentencepiece before it looks for a tokenizer.model: that one
        # wheel goes to a folder of its own (the project's venv stays as it is)
        deps = BENCH / ".peer-venv" / "convert-deps"
        if not (deps / "sentencepiece").exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "sentencepiece"], check=True)
        env = dict(os.environ, PYTHONPATH=f"{convert_py.parent / 'gguf-py'}{os.pathsep}{deps}")
        part = f16.with_name(f16.name + ".tmp-write")  # a killed conversion leaves no file that looks whole
        subprocess.run([sys.executable, str(convert_py), str(hf), "--outtype", "f16", "--outfile", str(part)],
                       check=True, env=env)
        part.rename(f16)
    part = out.with_name(out.name + ".tmp-write")
    subprocess.run([str(llama_bin / "llama-quantize"), str(f16), str(part), "Q8_0", "2"], check=True)
    part.rename(out)
    f16.unlink()
    return out


def build(vocab: int = 128256, table_bits: int = 16) -> dict:
    sys.path.insert(0, str(BENCH))
    import peer_llamacpp as peer

    WORK.mkdir(exist_ok=True)
    llama = peer.ensure_llamacpp_build()
    hf = checkpoint(vocab)
    return {"hf": str(hf), "edgepack": str(bundle(hf, table_bits)),
            "gguf": str(gguf_q8(hf, Path(llama["bin"]), Path(llama["source"]) / "convert_hf_to_gguf.py"))}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--table-bits", type=int, choices=(8, 16), default=16, help="the edgepack bundle's embedding table")
    a = ap.parse_args()
    print(json.dumps(build(a.vocab, a.table_bits)))
