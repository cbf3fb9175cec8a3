"""What precision the source's weights already have, and what each bit-width costs in quality.

    from edgepack.plan.source import SourcePrecision, from_gguf, from_config
    src = from_gguf(path)          # SmolLM2's default GGUF: 4 bits (Q4_1)
    src.cap_bits("int4")           # 4: more bits would only add bytes
    expected_kl(8, src, "int4")    # the project's measured mean KL at that setting, or None

A source that is already quantized holds no more than its bits: packing a Q4_1 GGUF at 16
bits stores the 4-bit values in 16-bit words, twice the bytes of 8 bits and four times
int4's, with nothing gained. The planner never chooses more bits than ``cap_bits``.
Standard library only: the GGUF header (gguf.py) or config.json's quantization_config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.format.ggml import GGUF_BITS, type_in_name

# ggml types whose values edgepack's int4 (affine groups of 32 inputs, a 16-bit scale and
# zero each) holds as they are: Q4_0 (symmetric groups of 32) and Q4_1 (affine groups of 32)
INT4_HOLDS = ("Q4_0", "Q4_1")

# --- quality: mean KL(source || bundle) per token, as the exporter measures it -------------------
#
# The project's measurements on the default model (SmolLM2-135M from its Q4_1 GGUF), held-out
# text, README's cpu_bench table: 8-bit 0.00137, edgepack int4 0.00021 (the Q4_1 grid kept),
# llama.cpp Q8_0 0.00396 and Q4_1 0.00286 in the same run. 16-bit only rounds to bfloat16
# (perplexity +0.07% there): counted as 0. int4 from a source it does not hold exactly, and
# nf4/fp4 from any source, were not measured: unknown, so never within the budget.
KL_8BIT = 0.00137
KL_INT4_SAME_GRID = 0.00021
# On x86 with AVX2 the C engine rounds the inputs of a decode step's int8 and int4 products to
# int8 per block of 32 (its int8 activations, on by default there: 1.6x the decode speed at 8
# bits, 2.3x at int4 on this project's Zen 1 box; ARM keeps 24 bits, as exact as float32).
# Measured the same way with the default 8-bit tables (tests/bench/table_quality.py
# --activation-bits 8): 8-bit 0.00301, int4 0.00305. The figures above hold with
# `--activations float`.
KL_8BIT_INT8_ACTIVATIONS = 0.00301
KL_INT4_SAME_GRID_INT8_ACTIVATIONS = 0.00305
# The budget of --prefer balanced: the mean KL of llama.cpp's Q8_0 on the same model and text
# (0.00396), the quantization llama.cpp's users take as near-lossless, rounded up.
KL_BUDGET = 0.004
KL_SOURCE = "mean KL to the source measured on the default model (README, cpu_bench.py)"


@dataclass(frozen=True)
class SourcePrecision:
    bits: int | None  # of the source's weight matrices (most elements); None: unknown
    label: str  # "GGUF Q4_1", "bfloat16", "GPTQ 4-bit", ...
    gguf_type: str | None = None  # the dominant ggml type of a GGUF source
    detail: str = ""  # e.g. the other types in the file

    @property
    def quantized(self) -> bool:
        return self.bits is not None and self.bits < 16

    def cap_bits(self, quant_type: str) -> int:
        """The most bits worth storing: the source's own, rounded up to a width edgepack
        stores. From a 4-bit source that is 4 when the 4-bit type holds its grid (int4 from
        Q4_0/Q4_1), else 8 (the closest re-quantization); 16 only from a 16-bit source."""
        if not self.quantized:
            return 16
        if self.bits <= 4 and quant_type == "int4" and self.gguf_type in INT4_HOLDS:
            return 4
        return 8

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "quantized": self.quantized}


UNKNOWN = SourcePrecision(None, "unknown")


def expected_kl(bits: int, quant_type: str | None, source: SourcePrecision,
                int8_activations: bool = False) -> float | None:
    """The mean KL to the source this project measured for such a setting, or None;
    int8_activations: as the C engine decodes on x86 by default."""
    if bits == 16:
        return 0.0
    if bits == 8:
        return KL_8BIT_INT8_ACTIVATIONS if int8_activations else KL_8BIT
    if quant_type == "int4" and source.gguf_type in INT4_HOLDS:
        return KL_INT4_SAME_GRID_INT8_ACTIVATIONS if int8_activations else KL_INT4_SAME_GRID
    return None


def from_gguf(path: str | Path) -> SourcePrecision:
    from edgepack.plan.gguf import tensor_types

    try:
        counts = tensor_types(path)
    except (OSError, ValueError):
        counts = None
    if not counts:
        return from_gguf_name(Path(path).name)
    dominant = max(counts, key=counts.get)
    others = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if k != dominant)
    detail = f"{dominant} on {counts[dominant] / 1e6:.1f}M of the matrices' weights" + (f"; {others}" if others else "")
    return SourcePrecision(GGUF_BITS.get(dominant), f"GGUF {dominant}", dominant, detail)


def from_gguf_name(name: str) -> SourcePrecision:
    """From a GGUF file name alone ("...Q4_1.gguf"), when the file is not here (a Hub repo)."""
    kind = type_in_name(name)
    if kind is None:
        return UNKNOWN
    return SourcePrecision(GGUF_BITS[kind], f"GGUF {kind}", kind, f"from the file name {name}")


def from_config(config: dict[str, Any]) -> SourcePrecision:
    """From config.json: a pre-quantized checkpoint's quantization_config, else its dtype."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        method = str(qc.get("quant_method", "quantized"))
        bits = qc.get("bits") or qc.get("w_bit") or qc.get("weight_bits")
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            bits = 4
        elif qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            bits = 8
        elif method in ("fp8", "fbgemm_fp8"):
            bits = 8
        elif method == "mxfp4":
            bits = 4
        if isinstance(bits, int) and not isinstance(bits, bool) and 0 < bits <= 16:
            return SourcePrecision(bits, f"{method} {bits}-bit", None, "config.json quantization_config")
        return SourcePrecision(None, f"{method} (bits unknown)", None, "config.json quantization_config")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    bits = {"float32": 32, "float16": 16, "bfloat16": 16}.get(dtype)
    return SourcePrecision(bits, dtype, None, "config.json torch_dtype") if bits else UNKNOWN
