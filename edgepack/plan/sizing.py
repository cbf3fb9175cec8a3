"""What a setting costs in bytes: stored weights (bitsandbytes' and edgepack's real storage
layouts, so the planned weight bytes equal the bundle's ``memory.weight_bytes`` exactly),
the KV cache, activations, and each device's budget. Pure: numbers in, numbers out.

How the runtime spends memory beyond the weights depends on its code path;
``RuntimeMemory`` holds those choices in one place (cache dtype and growth, logits rows,
copies made while loading), so a runtime change is a one-line change here, checked by
tests/bench/plan_accuracy.py. The runtime's own chunk sizes are edgepack.runtime.constants',
which the runtime reads too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from edgepack.plan.model import Block, ModelDescription

MIB = 1 << 20
GIB = 1 << 30
BITS = (16, 8, 4)  # best quality first
DEFAULT_CONTEXT = 2048  # tokens, capped by the model's max_position_embeddings
BLOCKSIZE = 64  # bitsandbytes' 4-bit block; transformers reads only 64
# edgepack's CPU int4 (qlinear.Int4Linear): groups of 32 inputs share a 16-bit scale and
# zero; torch's kernel needs out_features % 16 == 0 and in_features % group == 0
INT4_GROUP = 32
INT4_ROW_MULTIPLE = 16
QUANT_TYPES = ("nf4", "fp4", "int4")
NESTED_BLOCKSIZE = 256  # double quant: one float32 absmax per 256 uint8 block scales
# double quant's nested_offset is a float32 mean printed by json.dumps: ~19 characters
# ("0.04861259460449219"); the only storage byte count the planner cannot know exactly.
NESTED_OFFSET_CHARS = 19

# --- what the process costs before any weight: measured, per platform --------------------
# x86_64: measured by tests/bench/plan_accuracy.py on 2026-11-24 (torch 2.13.0+cpu,
# transformers 5.23.0, Python 3.11, glibc): peak RSS of `edgepack run` on a tiny bundle,
# whose weights, KV cache and activations are under 1 MiB, minus its tokenizer. That is
# the interpreter, torch, the runtime's imports and torch's CPU kernels initialised by the
# first forward pass; the transformers path adds transformers and the modeling code.
# aarch64: estimated, not measured: torch's aarch64 wheels map less kernel code than
# x86-64's (no AVX-512 variants), so ~10% below.
BASELINE_BYTES = {
    ("x86_64", "native"): 30 * MIB,  # no torch: the interpreter, tokenizers, psutil, edgepack.runtime.engine._engine
    ("x86_64", "lean"): 247 * MIB,
    ("x86_64", "transformers"): 357 * MIB,
    ("aarch64", "native"): 28 * MIB,  # estimated
    ("aarch64", "lean"): 225 * MIB,  # estimated
    ("aarch64", "transformers"): 320 * MIB,  # estimated
}
BASELINE_SOURCE = {
    "x86_64": "measured on x86-64 Linux by tests/bench/plan_accuracy.py, 2026-11-24, torch 2.13 CPU",
    "aarch64": "estimated for aarch64 from the x86-64 measurement, not measured on an ARM board",
}
# The tokenizer the runtime loads (`tokenizers` from tokenizer.json, freed heap trimmed
# after): RSS grows ~320 bytes per vocabulary entry (measured by the bench: SmolLM2's
# 49,152 entries -> 15 MiB).
TOKENIZER_BYTES_PER_TOKEN = 323
# A CUDA build of torch on the host: CUDA runtime, cuBLAS and kernel images mapped and
# initialised in host RAM. Estimated (no GPU here): torch 2.x with CUDA 12 lazy loading
# shows ~0.5 GiB more RSS after the first CUDA op than the CPU build.
CUDA_HOST_BYTES = 512 * MIB
# The CUDA context on each GPU: ~300-500 MiB (torch 2.x, CUDA 12 lazy loading: context +
# cuBLAS workspace + kernels loaded on first use; the figure in the built-in profiles'
# reserved_note). Profiles count it in gpus[i].reserved_bytes, so only what a profile's
# reserve lacks of it is added.
CUDA_CONTEXT_BYTES = 450 * MIB
# Kept free on each device: allocator fragmentation, a longer prompt than planned, what
# the estimates above miss. 10% of the peak, at least 64 MiB.
HEADROOM_FRACTION = 0.10
HEADROOM_MIN_BYTES = 64 * MIB


# --- storage layout ----------------------------------------------------------------------


@dataclass(frozen=True)
class Quant:
    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False
    dtype: str = "bfloat16"  # what stays 16-bit
    table_bits: int | None = None  # the embedding table and output layer: 16, 8, or None: pack's default for bits

    @property
    def tables(self) -> int:
        """The bits the embedding table and output layer are stored at (16 or 8)."""
        return default_table_bits(self.bits, self.quant_type) if self.table_bits is None else self.table_bits

    @property
    def label(self) -> str:
        if self.bits == 4 and self.quant_type == "int4":
            return "4-bit int4 (CPU)"
        if self.bits == 4:
            return f"4-bit {self.quant_type}" + (" + double quant" if self.double_quant else "")
        return {16: "16-bit", 8: "8-bit int8"}[self.bits]


def default_table_bits(bits: int, quant_type: str = "nf4", engine: bool = True) -> int:
    """What pack stores the embedding table and output layer at unless told: 8 bits in the
    CPU engine's formats (8-bit and int4 bundles) of a model the engine runs (it reads them
    as stored: the output layer is read every token; with a scale per block of 32 they cost
    about Q8_0's quality, FORMAT.md); 16 in 16-bit and nf4/fp4 bundles and for models only
    the torch backend runs (it holds them at 16 bits anyway, and plain transformers loads
    16-bit tables)."""
    return 8 if engine and (bits == 8 or (bits == 4 and quant_type == "int4")) else 16


def table_bytes(rows: int, cols: int) -> int:
    """Stored bytes of an 8-bit table [rows, cols]: int8 codes and a float16 scale per block
    of 32 of a row, or a float32 scale per row where rows are not whole blocks (the
    exporter's quantize.table_scheme)."""
    return rows * cols + (2 * rows * (cols // 32) if cols % 32 == 0 else 4 * rows)


def quant_state_bytes(out_features: int, in_features: int, q: Quant) -> int:
    """The JSON bitsandbytes packs into a uint8 tensor beside each 4-bit weight
    (``weight.quant_state.bitsandbytes__nf4``), written as json.dumps writes it."""
    state: dict[str, Any] = {"quant_type": q.quant_type, "blocksize": BLOCKSIZE, "dtype": q.dtype,
                             "shape": [out_features, in_features]}
    extra = 0
    if q.double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=0)
        extra = NESTED_OFFSET_CHARS - 1  # "0" stands for the offset's digits
    return len(json.dumps(state)) + extra


def linear_weight_bytes(out_features: int, in_features: int, q: Quant) -> int:
    """Bytes the bundle stores for one linear weight (its bias is counted apart)."""
    n = out_features * in_features
    if q.bits == 16:
        return 2 * n
    if q.bits == 8:
        return n + 4 * out_features  # int8 codes + float32 SCB, the absmax of each row
    if q.quant_type == "int4":
        if out_features % INT4_ROW_MULTIPLE or in_features % INT4_GROUP:
            return 2 * n  # kept in 16-bit
        return n // 2 + 2 * 2 * (in_features // INT4_GROUP) * out_features  # codes + scale and zero per group
    blocks = math.ceil(n / BLOCKSIZE)
    if q.double_quant:  # uint8 block scales + float32 per 256 of them + their 256-entry map
        absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * 256
    else:
        absmax = 4 * blocks  # float32 per block of 64
    # two codes per byte + scales + the 16-entry nf4/fp4 map + the packed quant_state
    return math.ceil(n / 2) + absmax + 4 * 16 + quant_state_bytes(out_features, in_features, q)


def block_weight_bytes(block: Block, q: Quant, fp32_linears: bool = False, tables_as_stored: bool = True) -> int:
    """Stored bytes of one block. fp32_linears: 8-bit layers bitsandbytes offloads to the
    CPU beside a GPU run in float32 there (llm_int8_enable_fp32_cpu_offload).
    tables_as_stored False: 8-bit tables at 2 bytes a value, as the torch backend holds
    them (it dequantizes them at load; the engine reads them as stored)."""
    plain = 2 * (block.kept_params + block.bias_params) + block.other_bytes
    if q.tables == 8 and block.table_rows and tables_as_stored:  # int8 codes + their scales, not 2 bytes a value
        plain -= 2 * block.table_rows * block.table_cols - table_bytes(block.table_rows, block.table_cols)
    if fp32_linears:
        return plain + 4 * block.linear_params
    return plain + sum(linear_weight_bytes(o, i, q) for _, o, i in block.linears)


def weight_bytes(desc: ModelDescription, q: Quant) -> int:
    """What the bundle's manifest will call memory.weight_bytes."""
    q = resolved(q, desc)
    return sum(block_weight_bytes(b, q) for b in desc.blocks)


def resolved(q: Quant, desc: ModelDescription, native: bool = True) -> Quant:
    """``q`` with pack's default table bits for this model filled in (default_table_bits);
    native False: a plan for another runtime than the engine (pack gets that plan)."""
    if q.table_bits is not None:
        return q
    return replace(q, table_bits=default_table_bits(q.bits, q.quant_type, desc.engine and native))


# --- how the runtime spends memory beyond the weights ---------------------------------------


@dataclass(frozen=True)
class RuntimeMemory:
    """What one runtime code path allocates; change here when the runtime changes."""

    name: str
    kv_bytes: int  # per cached value
    kv_static: bool  # preallocated for the context; else grown by torch.cat (old + new at once)
    activation_bytes: int  # residual stream, norms, rotary, attention
    logits_all_rows: bool  # the prefill computes logits for every prompt position
    fused_copies_at_load: bool  # one layer's q/k/v and gate/up copied into fused tensors at a time
    stages_on_cpu: bool  # every tensor is attached on the CPU before moving to its device
    # Heap that glibc keeps after the per-call dequantization of 4-bit layers on the CPU
    # (its transients are reused imperfectly across layers and tokens), per weight of the
    # largest 4-bit layer. Measured by tests/bench/plan_accuracy.py on smollm2-135m
    # (0.88M-weight layers): the transformers path's peak varies by +-30 MiB run to run
    # around +20 MiB; the lean path stays within its 16 bytes per weight of workspace.
    heap_growth_per_4bit_weight: int = 0


# edgepack.runtime.engine (Llama family at int8, int4 or 16 bits on an x86-64 CPU: the C engine, no
# torch): a static bf16 KV cache, tensors read in place (no fused copies), float32 activations
# of at most PROMPT_CHUNK prompt tokens at a time, float32 logits of the last position.
NATIVE = RuntimeMemory("native", 2, True, 4, False, False, False)
# edgepack.runtime.torch.llama (Llama family on CPU): float32 activations and a static bf16 KV cache
# (lean.KV_DTYPE), logits of the last position only, fused int8/16-bit projections built at load.
LEAN = RuntimeMemory("lean", 2, True, 4, False, True, False)
# transformers modules (other architectures, and every GPU): DynamicCache in the compute
# dtype, grown by concatenation; logits [batch, prompt, vocab] in the compute dtype.
TRANSFORMERS = RuntimeMemory("transformers", 2, False, 2, True, False, True, heap_growth_per_4bit_weight=24)
COMPUTE_BYTES = 2  # bf16/fp16 matmul inputs and outputs
RESIDUAL_COPIES = 4  # hidden state, normed copy, attention output, residual sum
# int4 at load: a fused layer's codes concatenated and repacked for the kernel (256 rows
# of int32 at a time), one layer at a time: the concatenated codes + the repacked copy
INT4_REPACK_BYTES_PER_WEIGHT = 1
# Workspace of the torch backend's CPU paths (chunk sizes and row thresholds from
# edgepack.runtime.constants): 4-bit layers dequantized DEQUANT_CHUNK_WEIGHTS at a time;
# 16-bit layers from WIDE_ROWS prompt tokens multiplied in float32 through a buffer of
# WIDE_CHUNK_WEIGHTS weights kept for the process, the float32 input and one chunk's output;
# int8 layers from INT8_WIDE_ROWS tokens through int8 GEMMs on two-digit activations: the
# digits, float32 work on INT8_DIGIT_ROWS rows, one chunk's int32 products and result.
DEQUANT_BYTES_PER_WEIGHT = {"cpu": 16, "cuda": 2}  # CPU: long codes + float32 values; bnb: fp16
FUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
# The C engine's prompt pass: activations of PROMPT_CHUNK tokens at a time, and per thread
# PROMPT_ROWS weight rows in float32 and a row of attention scores; threads: one per core,
# counted for NATIVE_THREADS (more cores add ~100 KiB each)
NATIVE_THREADS = 8


def kv_cache_bytes(desc: ModelDescription, rt: RuntimeMemory, layers: int, context: int, batch: int) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x context x batch x bytes; a growing cache
    also holds one layer's old K (or V) while torch.cat builds the new one. The C engine's
    sliding-window layers hold min(sliding_window, context) positions (a ring)."""
    per_layer_tensor = desc.num_key_value_heads * desc.head_dim * context * batch * rt.kv_bytes
    if layers == 0:
        return 0
    if rt is NATIVE and desc.sliding_layers:
        sliding = min(desc.sliding_layers, layers)
        positions = (layers - sliding) * context + sliding * min(desc.sliding_window, context)
        return 2 * desc.num_key_value_heads * desc.head_dim * positions * batch * rt.kv_bytes
    return 2 * layers * per_layer_tensor + (0 if rt.kv_static else per_layer_tensor)


def activation_bytes(desc: ModelDescription, rt: RuntimeMemory, tokens: int, batch: int, *,
                     holds_layers: bool, holds_output: bool) -> dict[str, int]:
    """Peak transient bytes of the prefill of ``tokens`` prompt tokens, by part."""
    bt = batch * tokens
    parts: dict[str, int] = {}
    if holds_layers:
        residual = RESIDUAL_COPIES * bt * desc.hidden_size * rt.activation_bytes
        # projections in the compute dtype + rotated q, k and the attention output in the
        # activation dtype; scaled_dot_product_attention (CPU flash / CUDA mem-efficient
        # kernels) never materialises [heads, prompt, context] scores
        attention = bt * desc.qkv_width * (COMPUTE_BYTES + 2 * rt.activation_bytes)
        # gated: gate and up outputs, act(gate), their product; else fc output and act
        mlp = bt * desc.intermediate_size * COMPUTE_BYTES * (4 if desc.gated_mlp else 3)
        parts["layer"] = residual + max(attention, mlp)
    if holds_output:
        rows = tokens if rt.logits_all_rows else 1
        parts["logits"] = batch * rows * desc.vocab_size * COMPUTE_BYTES + 2 * bt * desc.hidden_size * rt.activation_bytes
    return parts


def baseline_bytes(desc: ModelDescription, arch: str, rt: RuntimeMemory) -> int:
    """The process before any weight: interpreter, torch, the runtime's imports, the tokenizer."""
    return BASELINE_BYTES[(arch, rt.name)] + TOKENIZER_BYTES_PER_TOKEN * desc.vocab_size


# --- devices ---------------------------------------------------------------------------------


@dataclass
class DeviceBudget:
    device: str  # cpu, cuda:0, ...
    capacity_bytes: int
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    activations_bytes: int = 0
    loading_bytes: int = 0  # held only while loading: staged or fused copies
    allocator_bytes: int = 0  # heap the allocator keeps from freed transients
    baseline_bytes: int = 0
    cuda_context_bytes: int = 0
    headroom_bytes: int = 0
    label: str = ""  # "NVIDIA Tesla T4", "RAM", "shared RAM + GPU"

    @property
    def peak_bytes(self) -> int:
        running = self.allocator_bytes + self.kv_cache_bytes + self.activations_bytes
        return self.baseline_bytes + self.cuda_context_bytes + self.weights_bytes + max(self.loading_bytes, running)

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.headroom_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity_bytes, "weights": self.weights_bytes, "kv_cache": self.kv_cache_bytes,
                "activations": self.activations_bytes, "loading": self.loading_bytes, "allocator": self.allocator_bytes,
                "baseline": self.baseline_bytes, "cuda_context": self.cuda_context_bytes,
                "headroom": self.headroom_bytes, "peak": self.peak_bytes, "total": self.total_bytes,
                "fits": self.fits, "label": self.label}



def human(n: int) -> str:
    """1.23 GiB / 456.7 MiB / 12 KiB."""
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"
