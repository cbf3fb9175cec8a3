"""Pick bits and a device_map for a target device, from sizes alone.

    from edgepack.plan.planner import plan
    from edgepack.plan.profile import load_profile
    p = plan(description, load_profile("rpi5-4gb"), context=2048)
    p.bits, p.device_map, p.devices["cpu"].total_bytes, p.reasons

Pure code: it never imports torch and never reads hardware. ``description`` is a
``ModelDescription`` (per-block tensor sizes and config numbers; ``edgepack.cli.plan.
describe_model`` builds one from a config on the meta device) and the profile says what
the box has. The plan holds the chosen bits, an explicit device_map over the units
``edgepack.export.quantize.module_blocks`` lists, and the bytes each device needs:

    peak = baseline + weights + cuda_context + max(loading, allocator + kv_cache + activations)
    total = peak + headroom

Every figure is bytes. Weights use bitsandbytes' real storage layout, so the planned
weight bytes equal the bundle's ``memory.weight_bytes`` exactly (tested). How the runtime
spends memory beyond the weights depends on its code path; ``RuntimeMemory`` holds those
choices in one place (cache dtype and growth, logits rows, copies made while loading),
so a runtime change is a one-line change here, checked by tests/bench/plan_accuracy.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from edgepack.errors import PlanError

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


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One device_map unit (embeddings, a decoder layer, the final norm, lm_head, ...).

    linears: (name, out_features, in_features) of each linear weight the exporter would
    quantize. kept_params: elements of the floating tensors stored 16-bit (embeddings,
    norms, an untied output layer); bias_params: the quantized linears' biases, 16-bit
    too. other_bytes: non-floating tensors, stored as they are. tied_to: the block whose
    weight this one shares (a tied lm_head), which must sit on the same device.
    """

    name: str
    kind: str = "other"  # embedding | layer | norm | rotary | output | other
    linears: tuple[tuple[str, int, int], ...] = ()
    kept_params: int = 0
    bias_params: int = 0
    other_bytes: int = 0
    tied_to: str | None = None

    @property
    def linear_params(self) -> int:
        return sum(o * i for _, o, i in self.linears)


@dataclass(frozen=True)
class ModelDescription:
    name: str
    model_type: str
    blocks: tuple[Block, ...]
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    lean: bool = False  # edgepack's lean CPU decoder runs this architecture

    @property
    def num_parameters(self) -> int:
        return sum(b.kept_params + b.bias_params + b.linear_params for b in self.blocks)

    @property
    def qkv_width(self) -> int:
        """Outputs of the attention's q, k and v projections together."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def gated_mlp(self) -> bool:
        """Llama-style gate/up/down (two intermediate-wide outputs) vs GPT-2's fc/proj."""
        layer = next((b for b in self.blocks if b.kind == "layer"), None)
        return layer is not None and sum(o == self.intermediate_size for _, o, _ in layer.linears) >= 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [asdict(b) for b in self.blocks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelDescription:
        blocks = tuple(
            Block(**{**b, "linears": tuple(tuple(x) for x in b.get("linears", ()))}) for b in d["blocks"]
        )
        return cls(**{**d, "blocks": blocks})


# --- storage layout ----------------------------------------------------------------------


@dataclass(frozen=True)
class Quant:
    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False
    dtype: str = "bfloat16"  # what stays 16-bit

    @property
    def label(self) -> str:
        if self.bits == 4 and self.quant_type == "int4":
            return "4-bit int4 (CPU)"
        if self.bits == 4:
            return f"4-bit {self.quant_type}" + (" + double quant" if self.double_quant else "")
        return {16: "16-bit", 8: "8-bit int8"}[self.bits]


def quant_state_bytes(out_features: int, in_features: int, q: Quant) -> int:
    """The JSON bitsandbytes packs into a uint8 tensor beside each 4-bit weight
    (``weight.quant_state.bitsandbytes__nf4``), written as json.dumps writes it."""
    state: dict[str, Any] = {"quant_type": q.quant_type, "blocksize": BLOCKSIZE, "dtype": q.dtype,
                             "shape": [out_features, in_features]}  # fmt: skip
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


def block_weight_bytes(block: Block, q: Quant, fp32_linears: bool = False) -> int:
    """Stored bytes of one block. fp32_linears: 8-bit layers bitsandbytes offloads to the
    CPU beside a GPU run in float32 there (llm_int8_enable_fp32_cpu_offload)."""
    plain = 2 * (block.kept_params + block.bias_params) + block.other_bytes
    if fp32_linears:
        return plain + 4 * block.linear_params
    return plain + sum(linear_weight_bytes(o, i, q) for _, o, i in block.linears)


def weight_bytes(desc: ModelDescription, q: Quant) -> int:
    """What the bundle's manifest will call memory.weight_bytes."""
    return sum(block_weight_bytes(b, q) for b in desc.blocks)


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
# of at most NATIVE_CHUNK prompt tokens at a time, float32 logits of the last position.
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
# edgepack.runtime.torch.linear dequantizes 4-bit layers on the CPU at most this many weights at a time
DEQUANT_CHUNK_WEIGHTS = 1 << 18
DEQUANT_BYTES_PER_WEIGHT = {"cpu": 16, "cuda": 2}  # CPU: long codes + float32 values; bnb: fp16
# ... and multiplies a prompt of WIDE_ROWS tokens or more in float32 (16-bit layers on the
# CPU): a buffer of WIDE_CHUNK_WEIGHTS float32 weights kept for the process, the float32
# input and one chunk's float32 output (edgepack.runtime.torch.linear.wide_matmul)
WIDE_ROWS = 32
WIDE_CHUNK_WEIGHTS = 1 << 20
# ... and int8 layers from INT8_WIDE_ROWS tokens through int8 GEMMs on two-digit activations
# (edgepack.runtime.torch.linear.int8_wide_matmul): the int8 digits, float32 work on INT8_DIGIT_ROWS rows,
# one chunk's int32 products and float32 result
INT8_WIDE_ROWS = 8
INT8_WIDE_CHUNK = 1 << 19
INT8_DIGIT_ROWS = 64
INT8_TWO_DIGITS_MAX_IN = 126**2  # wider inputs get a third digit
FUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
# edgepack.runtime.engine._engine's prompt pass (its CHUNK, PB): activations of NATIVE_CHUNK tokens at a time,
# and per thread NATIVE_ROWS weight rows in float32 and a row of attention scores; threads:
# one per core, counted for NATIVE_THREADS (more cores add ~100 KiB each)
NATIVE_CHUNK = 96
NATIVE_ROWS = 16
NATIVE_THREADS = 8


def kv_cache_bytes(desc: ModelDescription, rt: RuntimeMemory, layers: int, context: int, batch: int) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x context x batch x bytes; a growing cache
    also holds one layer's old K (or V) while torch.cat builds the new one."""
    per_layer_tensor = desc.num_key_value_heads * desc.head_dim * context * batch * rt.kv_bytes
    if layers == 0:
        return 0
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
                "fits": self.fits, "label": self.label}  # fmt: skip


@dataclass
class Plan:
    model: str
    profile: str
    bits: int
    quant_type: str | None  # nf4/fp4 at 4 bits, else None
    double_quant: bool
    strategy: str  # gpu | offload | cpu
    runtime: str  # lean | transformers
    context: int
    prompt_tokens: int
    batch: int
    device_map: dict[str, str]
    devices: dict[str, DeviceBudget]
    fits: bool
    reasons: list[str] = field(default_factory=list)
    instead: list[str] = field(default_factory=list)  # what would fit, when this does not
    weight_bytes: int = 0  # as stored in the bundle, all devices

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "profile": self.profile, "bits": self.bits, "quant_type": self.quant_type,
            "double_quant": self.double_quant, "strategy": self.strategy, "runtime": self.runtime,
            "context": self.context, "prompt_tokens": self.prompt_tokens, "batch": self.batch,
            "fits": self.fits, "weight_bytes": self.weight_bytes, "device_map": dict(self.device_map),
            "devices": {k: v.to_dict() for k, v in self.devices.items()}, "reasons": list(self.reasons),
            "instead": list(self.instead),
        }  # fmt: skip


@dataclass(frozen=True)
class _Target:
    """The profile reduced to what placement needs."""

    name: str
    arch: str
    ram_bytes: int  # usable
    gpus: tuple[tuple[str, int, int], ...]  # (name, usable bytes, reserved bytes)
    unified: bool
    bnb_cuda: bool | None

    @classmethod
    def of(cls, profile: Any) -> _Target:
        if isinstance(profile, dict):
            from edgepack.plan.profile import DeviceProfile  # stdlib-only module: no torch

            profile = DeviceProfile.from_dict(profile)
        gpus = tuple((g.name, g.usable_bytes, g.reserved_bytes) for g in profile.gpus)
        arch = "aarch64" if profile.cpu.arch in ("aarch64", "arm64") else "x86_64"  # others: as x86-64
        return cls(profile.name, arch, profile.ram_usable_bytes, gpus, profile.unified_memory,
                   profile.bitsandbytes.cuda)  # fmt: skip

    @property
    def size_bytes(self) -> int:
        """Memory a model may use at all, to order profiles (a unified pool counts once)."""
        return self.ram_bytes + (0 if self.unified else sum(g[1] for g in self.gpus))


@dataclass(frozen=True)
class Options:
    context: int
    prompt_tokens: int
    batch: int
    quant_type: str
    double_quant: bool
    dtype: str
    runtime: str  # auto | lean | transformers


# --- placement -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setting:
    desc: ModelDescription
    target: _Target
    q: Quant
    strategy: str  # gpu | offload | cpu
    options: Options
    rt: RuntimeMemory


def _candidates(t: _Target, bits: int | None, quant_type: str = "nf4") -> list[tuple[int, str]]:
    """(bits, strategy), best first: everything on the accelerator at fewer bits before
    offloading at more bits, offloading before leaving the GPU idle. int4 is a CPU format."""
    wanted = [bits] if bits else list(BITS)
    if not t.gpus:
        return [(b, "cpu") for b in wanted]
    quantized_on_gpu = t.bnb_cuda is not False  # None: unknown, allowed and said so
    gpu = [(b, "gpu") for b in wanted if b == 16 or (quantized_on_gpu and not (b == 4 and quant_type == "int4"))]
    if t.unified:  # one pool: offloading to the CPU frees nothing
        return gpu + [(b, "cpu") for b in wanted if (b, "gpu") not in gpu]
    # bitsandbytes cannot offload 4-bit layers to the CPU beside a GPU
    offload = [(b, "offload") for b in wanted if b == 16 or (b == 8 and quantized_on_gpu)]
    return gpu + offload + [(b, "cpu") for b in wanted]


def _runtime_for(desc: ModelDescription, strategy: str, choice: str, arch: str = "x86_64", q: Quant | None = None) -> RuntimeMemory:
    if choice != "auto":
        return {"native": NATIVE, "lean": LEAN}.get(choice, TRANSFORMERS)
    if strategy != "cpu" or not desc.lean:
        return TRANSFORMERS  # the runtime's own rule
    # edgepack's C engine: int8, int4 and 16-bit layers, on by default where its kernels are
    # tuned (x86-64 with AVX2, aarch64 with NEON); nf4/fp4 the lean decoder on torch
    native_format = q is None or q.bits in (8, 16) or q.quant_type == "int4"
    return NATIVE if arch in ("x86_64", "aarch64") and native_format else LEAN


def _place(s: _Setting) -> Plan:
    """Fill the devices in forward order with whole blocks, like accelerate's sequential map."""
    t, gpus = s.target, [f"cuda:{i}" for i in range(len(s.target.gpus))]
    order = (gpus if s.strategy != "cpu" else []) + (["cpu"] if s.strategy != "gpu" else [])
    host = "cuda:0" if s.strategy != "cpu" and t.unified else "cpu"
    empty = {d: _empty_device(s, d, host) for d in dict.fromkeys(order + [host])}
    held = {d: _Held() for d in empty}
    device_map: dict[str, str] = {}
    k = 0
    for block in s.desc.blocks:
        if block.tied_to in device_map:  # shares its tensor: same device, no bytes of its own
            device = device_map[block.tied_to]
        else:
            tied = [b for b in s.desc.blocks if b.tied_to == block.name]  # the logits come along
            while k < len(order) - 1:
                trial = held[order[k]]
                for b in (block, *tied):
                    trial = trial + _Held.of(s, b, order[k])
                if _budget(s, empty[order[k]], trial).fits:
                    break
                k += 1
            device = order[k]
        device_map[block.name] = device
        held[device] = held[device] + _Held.of(s, block, device)
    devices = {d: _budget(s, empty[d], held[d]) for d in empty if held[d].blocks or d == host}
    if s.rt.stages_on_cpu and "cpu" in devices:  # attached on the CPU, then moved
        staged = sum(b.weights_bytes for d, b in devices.items() if d != "cpu")
        devices["cpu"] = _with_headroom(replace(devices["cpu"], loading_bytes=devices["cpu"].loading_bytes + staged))
    q, o = s.q, s.options
    return Plan(s.desc.name, t.name, q.bits, q.quant_type if q.bits == 4 else None, q.double_quant and q.bits == 4,
                s.strategy, s.rt.name, o.context, o.prompt_tokens, o.batch, device_map, devices,
                all(b.fits for b in devices.values()), weight_bytes=weight_bytes(s.desc, q))  # fmt: skip


def _empty_device(s: _Setting, device: str, host: str) -> DeviceBudget:
    t = s.target
    if device.startswith("cuda"):
        name, usable, reserved = t.gpus[int(device.split(":")[1])]
        budget = DeviceBudget(device, usable, label=f"{name}, memory shared with the CPU" if t.unified else name)
        if not t.unified:  # a Jetson's GPU reserve already holds the context and CUDA libraries
            budget.cuda_context_bytes = max(0, CUDA_CONTEXT_BYTES - reserved)
    else:
        budget = DeviceBudget(device, t.ram_bytes, label="RAM")
    if device == host:
        budget.baseline_bytes = baseline_bytes(s.desc, t.arch, s.rt)
        if s.strategy != "cpu" and not t.unified:
            budget.baseline_bytes += CUDA_HOST_BYTES
    return budget


def baseline_bytes(desc: ModelDescription, arch: str, rt: RuntimeMemory) -> int:
    """The process before any weight: interpreter, torch, the runtime's imports, the tokenizer."""
    return BASELINE_BYTES[(arch, rt.name)] + TOKENIZER_BYTES_PER_TOKEN * desc.vocab_size


@dataclass(frozen=True)
class _Held:
    """What the blocks on one device add up to, kept as sums so placement stays linear."""

    blocks: int = 0
    weights: int = 0
    layers: int = 0
    output: bool = False
    largest_linear: int = 0  # weights of the largest quantized linear layer
    int8_rows: int = 0  # output rows of the int8 layers (their scales in the compute dtype)
    fused: int = 0  # bytes of the largest layer's fused q/k/v + gate/up copies

    @classmethod
    def of(cls, s: _Setting, block: Block, device: str) -> _Held:
        fp32 = device == "cpu" and s.q.bits == 8 and s.strategy == "offload"
        layer = block.kind == "layer"
        return cls(
            blocks=1,
            weights=block_weight_bytes(block, s.q, fp32_linears=fp32),
            layers=int(layer),
            output=block.kind == "output",
            largest_linear=max((o * i for _, o, i in block.linears), default=0) if layer and not fp32 else 0,
            int8_rows=sum(o for _, o, _ in block.linears) if layer and not fp32 else 0,
            fused=sum(linear_weight_bytes(o, i, s.q) for n, o, i in block.linears if n.endswith(FUSED)) if layer else 0,
        )

    def __add__(self, other: _Held) -> _Held:
        return _Held(self.blocks + other.blocks, self.weights + other.weights, self.layers + other.layers,
                     self.output or other.output, max(self.largest_linear, other.largest_linear),
                     self.int8_rows + other.int8_rows, max(self.fused, other.fused))  # fmt: skip


def _budget(s: _Setting, empty: DeviceBudget, held: _Held) -> DeviceBudget:
    """One device's bytes: weights, KV cache, activations, loading copies, headroom."""
    q, o, rt = s.q, s.options, s.rt
    on_cpu = empty.device == "cpu"
    if rt is NATIVE:
        return _native_budget(s, empty, held)
    parts = activation_bytes(s.desc, rt, o.prompt_tokens, o.batch, holds_layers=held.layers > 0,
                             holds_output=held.output)  # fmt: skip
    int4 = q.bits == 4 and q.quant_type == "int4"
    if int4:  # decode steps: edgepack.runtime.engine._engine's kernel (or torch's), no dequantized copy
        workspace = 0
    elif q.bits == 4:  # the largest layer dequantized per call
        chunk = min(held.largest_linear, DEQUANT_CHUNK_WEIGHTS) if on_cpu else held.largest_linear
        workspace = DEQUANT_BYTES_PER_WEIGHT["cpu" if on_cpu else "cuda"] * chunk
    else:  # int8 on the CPU: each layer's row scales kept in the compute dtype (and float32, lean)
        workspace = (COMPUTE_BYTES + (4 if rt is LEAN else 0)) * held.int8_rows if q.bits == 8 and on_cpu else 0
    bt, d = o.batch * o.prompt_tokens, s.desc
    # 16-bit layers from WIDE_ROWS tokens, and int4 layers (kept in edgepack.runtime.engine._engine's layout)
    # for every prompt, multiply in float32 on weights converted a chunk at a time
    if rt is LEAN and on_cpu and held.layers and ((q.bits == 16 and bt >= WIDE_ROWS) or (int4 and bt > 1)):
        chunk = min(held.largest_linear, WIDE_CHUNK_WEIGHTS)
        workspace += 4 * (chunk + bt * max(d.hidden_size, d.intermediate_size) + bt * max(1, chunk // d.hidden_size))
    elif rt is LEAN and on_cpu and q.bits == 8 and held.layers and bt >= INT8_WIDE_ROWS:
        widest_input = max(d.hidden_size, d.intermediate_size)
        count = 2 if widest_input <= INT8_TWO_DIGITS_MAX_IN else 3  # int8 digits per activation
        rows = min(max(2 * d.intermediate_size, d.qkv_width), max(16, INT8_WIDE_CHUNK // (count * bt)))
        digits = count * bt * widest_input + 3 * 4 * min(bt, INT8_DIGIT_ROWS) * widest_input
        workspace += digits + 4 * (count + 1) * bt * rows  # int32 products of every digit + float32 result
    heap = rt.heap_growth_per_4bit_weight * min(held.largest_linear, DEQUANT_CHUNK_WEIGHTS) if q.bits == 4 and on_cpu and not int4 else 0
    if int4:  # fused gate/up (2 x the largest layer) repacked at load
        loading = held.fused + INT4_REPACK_BYTES_PER_WEIGHT * 2 * held.largest_linear
    else:
        loading = held.fused if rt.fused_copies_at_load and q.bits in (8, 16) else 0
    budget = replace(
        empty,
        weights_bytes=held.weights,
        kv_cache_bytes=kv_cache_bytes(s.desc, rt, held.layers, o.context, o.batch),
        activations_bytes=max(parts.get("layer", 0) + workspace, parts.get("logits", 0)),
        loading_bytes=loading,
        allocator_bytes=heap,
    )
    return _with_headroom(budget)


def _native_budget(s: _Setting, empty: DeviceBudget, held: _Held) -> DeviceBudget:
    """edgepack's C engine: the stored tensors in one map (norms widened to float32, int8 row
    scales divided in place), the KV cache, and its prompt scratch: the activations of
    NATIVE_CHUNK tokens, their transposed input, and per thread float32 weight rows and a row
    of attention scores; logits float32, this step's and the last."""
    d, o = s.desc, s.options
    chunk = min(NATIVE_CHUNK, o.batch * o.prompt_tokens)
    widest = max(d.hidden_size, d.intermediate_size, d.num_attention_heads * d.head_dim)
    per_token = 2 * d.hidden_size + d.qkv_width + d.num_attention_heads * d.head_dim + 3 * d.intermediate_size
    scratch = 4 * (chunk * per_token + widest * (chunk + 16) + NATIVE_THREADS * (NATIVE_ROWS * widest + o.context))
    norms = 2 * 2 * d.hidden_size * held.layers + (2 * d.hidden_size if held.output else 0)
    logits = 2 * 4 * d.vocab_size if held.output else 0
    budget = replace(
        empty,
        weights_bytes=held.weights,
        kv_cache_bytes=kv_cache_bytes(d, s.rt, held.layers, o.context, o.batch),
        activations_bytes=(scratch if held.layers else 0) + logits + norms,
    )
    return _with_headroom(budget)


def _with_headroom(budget: DeviceBudget) -> DeviceBudget:
    return replace(budget, headroom_bytes=max(HEADROOM_MIN_BYTES, int(HEADROOM_FRACTION * budget.peak_bytes)))


def _overflow(p: Plan) -> float:
    """How far a plan is from fitting: its worst device's need / capacity."""
    return max(b.total_bytes / b.capacity_bytes for b in p.devices.values())


# --- the decision ----------------------------------------------------------------------------


def plan(
    desc: ModelDescription,
    profile: Any,
    *,
    context: int | None = None,
    prompt_tokens: int | None = None,
    batch: int = 1,
    bits: int | None = None,
    quant_type: str = "nf4",
    double_quant: bool = False,
    dtype: str = "bfloat16",
    runtime: str = "auto",
    alternatives: Sequence[Any] = (),
) -> Plan:
    """The best-quality setting that fits ``profile`` (a DeviceProfile or its dict) with
    headroom at ``context`` tokens (default: min(2048, the model's maximum)).

    prompt_tokens: the longest prompt prefilled at once (default: the context).
    bits: 16, 8 or 4 to force; the plan then says whether it fits instead of raising.
    alternatives: profiles to suggest when nothing fits (the built-in ones, say).
    Raises PlanError when nothing fits, with the numbers and the nearest thing that would.
    """
    t = _Target.of(profile)
    o = _options(desc, context=context, prompt_tokens=prompt_tokens, batch=batch, quant_type=quant_type,
                 double_quant=double_quant, dtype=dtype, runtime=runtime)  # fmt: skip
    if bits is not None and bits not in BITS:
        raise PlanError(f"unsupported bits {bits!r}", hint="use --bits 16, 8 or 4, or leave it out")
    tried = _tried(desc, t, o, bits)
    chosen = next((p for p in tried if p.fits), None)
    if chosen is None and bits is None:
        raise _nothing_fits(desc, t, o, tried, alternatives)
    if chosen is None:  # the forced setting: report how far it is from fitting
        chosen = min(tried, key=_overflow)
    chosen.reasons = _reasons(desc, t, o, chosen, tried, bits)
    if not chosen.fits:
        chosen.instead = _nearest(desc, t, o, alternatives, bits)
    return chosen


def place(desc: ModelDescription, profile: Any, bits: int, strategy: str, **options: Any) -> Plan:
    """One setting, fitting or not: ``bits`` placed by ``strategy`` ("gpu": all on the
    GPUs, "offload": GPUs then the CPU, "cpu"); options as for ``plan``."""
    t = _Target.of(profile)
    if (bits, strategy) not in _candidates(t, bits, options.get("quant_type", "nf4")):
        why = f"{bits}-bit by {strategy!r} is not possible on {t.name}"
        if bits == 4 and options.get("quant_type") == "int4":
            why = "int4 is edgepack's CPU format; it does not run on a GPU"
        if bits == 4 and strategy == "offload":
            why = "4-bit layers cannot be offloaded to the CPU beside a GPU (bitsandbytes)"
        raise PlanError(why, hint="'gpu' and 'offload' need a GPU (and bitsandbytes' CUDA kernels below 16-bit)")
    return _place(_setting(desc, t, bits, strategy, _options(desc, **options)))


def device_budget(desc: ModelDescription, profile: Any, bits: int, strategy: str, device: str,
                  blocks: Sequence[str], **options: Any) -> DeviceBudget:  # fmt: skip
    """What ``device`` needs to hold the named blocks in that setting (for tests and tools)."""
    t = _Target.of(profile)
    s = _setting(desc, t, bits, strategy, _options(desc, **options))
    host = "cuda:0" if strategy != "cpu" and t.unified else "cpu"
    by_name = {b.name: b for b in desc.blocks}
    held = _Held()
    for name in blocks:
        held = held + _Held.of(s, by_name[name], device)
    return _budget(s, _empty_device(s, device, host), held)


def _setting(desc: ModelDescription, t: _Target, bits: int, strategy: str, o: Options) -> _Setting:
    q = Quant(bits, o.quant_type, o.double_quant, o.dtype)
    return _Setting(desc, t, q, strategy, o, _runtime_for(desc, strategy, o.runtime, t.arch, q))


def _options(desc: ModelDescription, *, context: int | None = None, prompt_tokens: int | None = None,
             batch: int = 1, quant_type: str = "nf4", double_quant: bool = False, dtype: str = "bfloat16",
             runtime: str = "auto") -> Options:  # fmt: skip
    maximum = desc.max_position_embeddings
    context = min(DEFAULT_CONTEXT, maximum) if context is None else context
    problems = []
    if not isinstance(context, int) or context < 1:
        problems.append(f"context must be a positive number of tokens, not {context!r}")
    elif context > maximum:
        problems.append(f"context {context} is longer than {desc.name} supports ({maximum} tokens)")
    prompt_tokens = context if prompt_tokens is None else prompt_tokens
    if not problems and (not isinstance(prompt_tokens, int) or not 1 <= prompt_tokens <= context):
        problems.append(f"prompt_tokens must be between 1 and the context, not {prompt_tokens!r}")
    if not isinstance(batch, int) or batch < 1:
        problems.append(f"batch must be a positive integer, not {batch!r}")
    if quant_type not in QUANT_TYPES:
        problems.append(f"4-bit quant type must be nf4, fp4 or int4, not {quant_type!r}")
    if runtime not in ("auto", "native", "lean", "transformers"):
        problems.append(f"runtime must be auto, native, lean or transformers, not {runtime!r}")
    if problems:
        raise PlanError("; ".join(problems), hint=f"the context may be 1 to {maximum} tokens; batch 1 or more")
    return Options(context, prompt_tokens, batch, quant_type, double_quant, dtype, runtime)


def _tried(desc: ModelDescription, t: _Target, o: Options, bits: int | None) -> list[Plan]:
    plans: list[Plan] = []
    for b, strategy in _candidates(t, bits, o.quant_type):
        p = _place(_setting(desc, t, b, strategy, o))
        if strategy == "offload" and "cpu" not in p.device_map.values():
            continue  # everything fit on the GPU: the same as the "gpu" plan
        plans.append(p)
    return plans


def _fits_at(desc, t, o: Options, bits: int | None) -> Plan | None:
    return next((p for p in _tried(desc, t, o, bits) if p.fits), None)


def _nearest(desc: ModelDescription, t: _Target, o: Options, alternatives: Sequence[Any], bits: int | None) -> list[str]:
    """What would fit instead: fewer bits, a shorter context, a bigger built-in device."""
    out = []
    for b in BITS:
        if bits is not None and b < bits and (p := _fits_at(desc, t, o, b)):
            out.append(f"{_setting_text(p)} would fit ({_need_text(p)}).")
            break
    shortest = replace(o, context=1, prompt_tokens=1)
    if _fits_at(desc, t, shortest, bits):
        lo, hi = 1, o.context - 1  # the longest context that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _fits_at(desc, t, replace(o, context=mid, prompt_tokens=min(o.prompt_tokens, mid)), bits):
                lo = mid
            else:
                hi = mid - 1
        p = _fits_at(desc, t, replace(o, context=lo, prompt_tokens=min(o.prompt_tokens, lo)), bits)
        out.append(f"A context of up to {lo} tokens fits at {p.bits}-bit (--context {lo}).")
    for alt in sorted((_Target.of(a) for a in alternatives), key=lambda a: a.size_bytes):
        if alt != t and _fits_at(desc, alt, o, bits):
            out.append(f"The smallest built-in profile that fits is {alt.name} ({_size_text(alt)}).")
            break
    return out


def _nothing_fits(desc, t: _Target, o: Options, tried: list[Plan], alternatives) -> PlanError:
    best = min(tried, key=_overflow)
    worst = max(best.devices.values(), key=lambda b: b.total_bytes / b.capacity_bytes)
    nearest = _nearest(desc, t, o, alternatives, None)
    message = (
        f"{desc.name} does not fit {t.name} at a context of {o.context} tokens: even {_setting_text(best)} "
        f"needs {human(worst.total_bytes)} on {worst.device} ({_parts_text(worst)}) "
        f"but {worst.device} has {human(worst.capacity_bytes)} usable"
    )
    return PlanError(message, hint=" ".join(nearest) if nearest else "use a device with more memory")


# --- reasons ------------------------------------------------------------------------------------


def human(n: int) -> str:
    """1.23 GiB / 456.7 MiB / 12 KiB."""
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def _size_text(t: _Target) -> str:
    gpus = " + ".join(f"{human(g[1])} {g[0]}" for g in t.gpus)
    if t.unified:
        return f"{human(t.ram_bytes)} usable, shared by CPU and GPU"
    return f"{human(t.ram_bytes)} RAM" + (f", {gpus}" if gpus else "") + " usable"


def _where_text(p: Plan) -> str:
    devices = list(dict.fromkeys(p.device_map.values()))
    if p.strategy == "offload":
        layers = [n for n, d in p.device_map.items() if d == "cpu"]
        return f"split between {', '.join(d for d in devices if d != 'cpu')} and the CPU ({len(layers)} blocks on the CPU)"
    return "all on " + " and ".join(devices)


def _setting_text(p: Plan) -> str:
    q = Quant(p.bits, p.quant_type or "nf4", p.double_quant)
    return f"{q.label} {_where_text(p)}"


def _need_text(p: Plan) -> str:
    return "; ".join(f"{d}: {human(b.total_bytes)} of {human(b.capacity_bytes)}" for d, b in p.devices.items())


def _parts_text(b: DeviceBudget) -> str:
    running = b.allocator_bytes + b.kv_cache_bytes + b.activations_bytes
    loading = b.loading_bytes > running
    parts = [("weights", b.weights_bytes), ("loading copies", b.loading_bytes if loading else 0),
             ("allocator", 0 if loading else b.allocator_bytes), ("KV cache", 0 if loading else b.kv_cache_bytes),
             ("activations", 0 if loading else b.activations_bytes), ("baseline", b.baseline_bytes),
             ("CUDA context", b.cuda_context_bytes), ("headroom", b.headroom_bytes)]  # fmt: skip
    return " + ".join(f"{name} {human(v)}" for name, v in parts if v)


def _reasons(desc: ModelDescription, t: _Target, o: Options, p: Plan, tried: list[Plan], bits: int | None) -> list[str]:
    r = []
    verdict = "fits" if p.fits else "does NOT fit"
    chosen_by = f"bits forced to {bits}" if bits else "the best quality that fits"
    r.append(f"{_setting_text(p)} {verdict} {t.name} ({_size_text(t)}) at a context of {o.context} tokens: "
             f"{_need_text(p)}; {chosen_by}.")
    better = tried[: tried.index(p)] if p in tried else [x for x in tried if x is not p]
    for x in better:  # every better setting that was tried and missed, best first
        worst = max(x.devices.values(), key=lambda d: d.total_bytes / d.capacity_bytes)
        r.append(f"{_setting_text(x)} would need {human(worst.total_bytes)} on {worst.device}, "
                 f"which has {human(worst.capacity_bytes)} usable.")
    if p.strategy == "gpu" and p.bits < 16:
        offloads = [x for x in tried if x.strategy == "offload" and x.bits > p.bits and x.fits]
        if offloads:
            x = offloads[0]
            r.append(f"{_setting_text(x)} would also fit, but {p.bits}-bit entirely on the GPU is preferred: "
                     "offloaded layers cross PCIe on every token, many times slower.")
    if p.strategy == "offload":
        r.append("4-bit layers cannot be offloaded to the CPU beside a GPU (bitsandbytes), so offloading is "
                 "16- or 8-bit; offloaded 8-bit layers are kept in float32 on the CPU (4 bytes per weight).")
    if p.strategy == "cpu" and t.gpus and not t.unified:
        r.append("The GPU cannot hold the model at any bit-width, even with offloading; it runs on the CPU.")
    if t.gpus and p.strategy != "cpu" and p.bits < 16 and t.bnb_cuda is None:
        r.append("bitsandbytes' CUDA kernels are unverified on this device (the profile says unknown).")
    if t.unified:
        r.append("Unified memory: CPU and GPU share one pool, counted once; the process's baseline "
                 "comes out of the GPU's share.")
    for block in desc.blocks:
        if block.tied_to:
            r.append(f"{block.name} is tied to {block.tied_to}: one tensor, both on {p.device_map[block.name]}.")
    r.extend(_memory_reasons(desc, t, o, p))
    return r


def _memory_reasons(desc: ModelDescription, t: _Target, o: Options, p: Plan) -> list[str]:
    rt = {"native": NATIVE, "lean": LEAN}.get(p.runtime, TRANSFORMERS)
    r = []
    kv = kv_cache_bytes(desc, rt, desc.num_hidden_layers, o.context, o.batch)
    growth = (f"preallocated by edgepack's {p.runtime} runtime" if rt.kv_static
              else "grown by concatenation, which briefly holds one layer's old and new tensor")  # fmt: skip
    r.append(f"KV cache: 2 x {desc.num_hidden_layers} layers x {desc.num_key_value_heads} KV heads x "
             f"{desc.head_dim} x {o.context} tokens x {o.batch} x {rt.kv_bytes} bytes = {human(kv)} "
             f"({'float32' if rt.kv_bytes == 4 else '16-bit'}, {growth}).")
    rows = f"{o.prompt_tokens} x {desc.vocab_size}" if rt.logits_all_rows else f"1 x {desc.vocab_size}"
    r.append(f"Activations: the prefill of a {o.prompt_tokens}-token prompt is the peak: residual stream, "
             f"attention projections, the MLP's {desc.intermediate_size}-wide intermediates, logits of {rows}"
             + (" and 4-bit layers dequantized one at a time" if p.bits == 4 and p.quant_type != "int4" else "") + ".")
    base = p.devices.get("cuda:0" if t.unified and p.strategy != "cpu" else "cpu")
    if base is not None:
        tokenizer = TOKENIZER_BYTES_PER_TOKEN * desc.vocab_size
        what = "without torch" if p.runtime == "native" else "with torch"
        text = (f"Baseline {human(base.baseline_bytes)}: the process {what} and edgepack's {p.runtime} "
                f"runtime ({BASELINE_SOURCE[t.arch]}) and its {desc.vocab_size}-token tokenizer (~{human(tokenizer)})")
        if p.strategy != "cpu" and not t.unified:
            text += f", plus ~{human(CUDA_HOST_BYTES)} of CUDA libraries in host RAM (estimated)"
        r.append(text + ".")
    if p.strategy != "cpu" and not t.unified:
        r.append(f"CUDA context (~{human(CUDA_CONTEXT_BYTES)} per GPU: torch 2.x, CUDA 12, cuBLAS workspace) is "
                 "inside each GPU's reserved_bytes in the profile, so it is counted only where the reserve is smaller.")
    if any(b.loading_bytes for b in p.devices.values()):
        if rt.fused_copies_at_load:
            r.append("Loading: the lean decoder copies one layer's q/k/v and gate/up into fused tensors at a time.")
        else:
            r.append("Loading: weights for the GPU are read into RAM before they move.")
    if any(b.allocator_bytes for b in p.devices.values()):
        r.append("Allocator: 4-bit layers dequantized on every call leave glibc heap behind "
                 f"(~{rt.heap_growth_per_4bit_weight} bytes per weight of the largest layer, measured).")
    r.append(f"Headroom: {HEADROOM_FRACTION:.0%} of each device's peak, at least {human(HEADROOM_MIN_BYTES)}.")
    return r
