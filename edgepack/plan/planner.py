"""Pick bits and a device_map for a target device, from sizes alone.

    from edgepack.plan.planner import plan
    from edgepack.plan.profile import load_profile
    p = plan(description, load_profile("rpi5-4gb"), context=2048)
    p.bits, p.device_map, p.devices["cpu"].total_bytes, p.reasons

Pure code: it never imports torch and never reads hardware. ``description`` is a
``ModelDescription`` (per-block tensor sizes and config numbers; ``edgepack.plan.model.
describe_model`` builds one from a config) and the profile says what the box has. The
plan holds the chosen bits, an explicit device_map over the model's blocks (the units
``edgepack.plan.model.module_blocks`` lists), and the bytes each device needs:

    peak = baseline + weights + cuda_context + max(loading, allocator + kv_cache + activations)
    total = peak + headroom

Every figure is bytes; sizing.py computes them, reasons.py explains the choice in words.
This module places whole blocks on devices, in forward order, and picks the setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from edgepack.errors import PlanError
from edgepack.plan.model import Block, ModelDescription
from edgepack.plan import speed as speed_model
from edgepack.plan.reasons import explain, need_text, parts_text, setting_text, size_text
from edgepack.plan.source import KL_BUDGET, UNKNOWN, SourcePrecision, expected_kl
from edgepack.plan.sizing import (
    BITS,
    CUDA_CONTEXT_BYTES,
    COMPUTE_BYTES,
    CUDA_HOST_BYTES,
    DEFAULT_CONTEXT,
    DEQUANT_BYTES_PER_WEIGHT,
    FUSED,
    HEADROOM_FRACTION,
    HEADROOM_MIN_BYTES,
    INT4_REPACK_BYTES_PER_WEIGHT,
    LEAN,
    NATIVE,
    NATIVE_THREADS,
    QUANT_TYPES,
    TRANSFORMERS,
    DeviceBudget,
    Quant,
    RuntimeMemory,
    activation_bytes,
    baseline_bytes,
    block_weight_bytes,
    human,
    kv_cache_bytes,
    linear_weight_bytes,
    resolved,
    weight_bytes,
)
from edgepack.runtime.constants import (
    DEQUANT_CHUNK_WEIGHTS,
    INT8_DIGIT_ROWS,
    INT8_TWO_DIGITS_MAX_IN,
    INT8_WIDE_CHUNK,
    INT8_WIDE_ROWS,
    PROMPT_CHUNK,
    PROMPT_ROWS,
    WIDE_CHUNK_WEIGHTS,
    WIDE_ROWS,
)


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
    speed: speed_model.Speed | None = None  # predicted decode speed; None without bandwidth figures
    prefer: str = "quality"  # quality | balanced | speed: how the setting was chosen
    source: SourcePrecision = UNKNOWN  # the source's own precision
    settings: list[dict[str, Any]] = field(default_factory=list)  # every setting weighed, best quality first
    int8_activations: bool = False  # the C engine on an x86 CPU with AVX2: its default int8 activations

    @property
    def expected_kl(self) -> float | None:
        return expected_kl(self.bits, self.quant_type, self.source, self.int8_activations)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "profile": self.profile, "bits": self.bits, "quant_type": self.quant_type,
            "double_quant": self.double_quant, "strategy": self.strategy, "runtime": self.runtime,
            "context": self.context, "prompt_tokens": self.prompt_tokens, "batch": self.batch,
            "fits": self.fits, "weight_bytes": self.weight_bytes, "device_map": dict(self.device_map),
            "devices": {k: v.to_dict() for k, v in self.devices.items()}, "reasons": list(self.reasons),
            "instead": list(self.instead), "prefer": self.prefer, "source": self.source.to_dict(),
            "speed": self.speed.to_dict() if self.speed else None, "expected_kl": self.expected_kl,
            "int8_activations": self.int8_activations, "settings": list(self.settings),
        }


@dataclass(frozen=True)
class _Target:
    """The profile reduced to what placement needs."""

    name: str
    arch: str
    ram_bytes: int  # usable
    gpus: tuple[tuple[str, int, int], ...]  # (name, usable bytes, reserved bytes)
    unified: bool
    bnb_cuda: bool | None
    bandwidth: tuple[tuple[str, int | None], ...] = ()  # ("cpu", bytes/s), ("cuda", bytes/s)
    avx2: bool = False  # the C engine's int8 activations run here

    @classmethod
    def of(cls, profile: Any) -> _Target:
        if isinstance(profile, dict):
            from edgepack.plan.profile import DeviceProfile  # stdlib-only module: no torch

            profile = DeviceProfile.from_dict(profile)
        gpus = tuple((g.name, g.usable_bytes, g.reserved_bytes) for g in profile.gpus)
        arch = "aarch64" if profile.cpu.arch in ("aarch64", "arm64") else "x86_64"  # others: as x86-64
        return cls(profile.name, arch, profile.ram_usable_bytes, gpus, profile.unified_memory,
                   profile.bitsandbytes.cuda, tuple(speed_model.profile_bandwidth(profile).items()),
                   arch == "x86_64" and "avx2" in profile.cpu.simd)

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
    if strategy != "cpu" or not (desc.lean or desc.engine):
        return TRANSFORMERS  # the runtime's own rule
    # edgepack's C engine: int8, int4 and 16-bit layers, on by default where its kernels are
    # tuned (x86-64 with AVX2, aarch64 with NEON); nf4/fp4 the lean decoder on torch
    native_format = q is None or q.bits in (8, 16) or q.quant_type == "int4"
    if arch in ("x86_64", "aarch64") and native_format:
        return NATIVE
    return LEAN if desc.lean else TRANSFORMERS


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
                all(b.fits for b in devices.values()), weight_bytes=weight_bytes(s.desc, q))


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
            weights=block_weight_bytes(block, s.q, fp32_linears=fp32, tables_as_stored=s.rt is NATIVE),
            layers=int(layer),
            output=block.kind == "output",
            largest_linear=max((o * i for _, o, i in block.linears), default=0) if layer and not fp32 else 0,
            int8_rows=sum(o for _, o, _ in block.linears) if layer and not fp32 else 0,
            fused=sum(linear_weight_bytes(o, i, s.q) for n, o, i in block.linears if n.endswith(FUSED)) if layer else 0,
        )

    def __add__(self, other: _Held) -> _Held:
        return _Held(self.blocks + other.blocks, self.weights + other.weights, self.layers + other.layers,
                     self.output or other.output, max(self.largest_linear, other.largest_linear),
                     self.int8_rows + other.int8_rows, max(self.fused, other.fused))


def _budget(s: _Setting, empty: DeviceBudget, held: _Held) -> DeviceBudget:
    """One device's bytes: weights, KV cache, activations, loading copies, headroom."""
    q, o, rt = s.q, s.options, s.rt
    on_cpu = empty.device == "cpu"
    if rt is NATIVE:
        return _native_budget(s, empty, held)
    parts = activation_bytes(s.desc, rt, o.prompt_tokens, o.batch, holds_layers=held.layers > 0,
                             holds_output=held.output)
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
    PROMPT_CHUNK tokens, their transposed input, and per thread float32 weight rows and a row
    of attention scores; logits float32, this step's and the last."""
    d, o = s.desc, s.options
    chunk = min(PROMPT_CHUNK, o.batch * o.prompt_tokens)
    widest = max(d.hidden_size, d.intermediate_size, d.num_attention_heads * d.head_dim)
    per_token = 2 * d.hidden_size + d.qkv_width + d.num_attention_heads * d.head_dim + 3 * d.intermediate_size
    scratch = 4 * (chunk * per_token + widest * (chunk + 16) + NATIVE_THREADS * (PROMPT_ROWS * widest + o.context))
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


PREFER = ("quality", "balanced", "speed")


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
    prefer: str = "quality",
    source: SourcePrecision = UNKNOWN,
) -> Plan:
    """The setting that fits ``profile`` (a DeviceProfile or its dict) with headroom at
    ``context`` tokens (default: min(2048, the model's maximum)), chosen by ``prefer``:

    quality: the most bits that fit; balanced: the fewest bits whose measured quality loss
    (source.KL_BUDGET) is within budget, unless more bits within it are predicted faster;
    speed: the fastest predicted decode (speed.py).
    Never more bits than ``source`` (the source's own precision) holds. The default here is
    quality, as before the preference existed; `edgepack plan` and `pack --profile` default
    to balanced.

    prompt_tokens: the longest prompt prefilled at once (default: the context).
    bits: 16, 8 or 4 to force; the plan then says whether it fits instead of raising.
    alternatives: profiles to suggest when nothing fits (the built-in ones, say).
    Raises PlanError when nothing fits, with the numbers and the nearest thing that would.
    """
    t = _Target.of(profile)
    o = _options(desc, context=context, prompt_tokens=prompt_tokens, batch=batch, quant_type=quant_type,
                 double_quant=double_quant, dtype=dtype, runtime=runtime)
    if bits is not None and bits not in BITS:
        raise PlanError(f"unsupported bits {bits!r}", hint="use --bits 16, 8 or 4, or leave it out")
    if prefer not in PREFER:
        raise PlanError(f"unknown preference {prefer!r}", hint="use --prefer quality, balanced or speed")
    tried = _tried(desc, t, o, bits)
    for p in tried:
        p.prefer, p.source, p.speed = prefer, source, _speed(desc, t, o, p)
        p.int8_activations = t.avx2 and p.runtime == NATIVE.name and p.strategy == "cpu"
    chosen, chosen_by = _choose(tried, prefer, source, o.quant_type) if bits is None else (
        next((p for p in tried if p.fits), None), f"bits forced to {bits}")
    if chosen is None and bits is None:
        raise _nothing_fits(desc, t, o, tried, alternatives)
    if chosen is None:  # the forced setting: report how far it is from fitting
        chosen = min(tried, key=_overflow)
    chosen.reasons = explain(desc, t, o, chosen, tried, bits, chosen_by)
    chosen.settings = [_setting_summary(p, source, o.quant_type) for p in tried]
    if not chosen.fits:
        chosen.instead = _nearest(desc, t, o, alternatives, bits)
    return chosen


def _speed(desc: ModelDescription, t: _Target, o: Options, p: Plan) -> speed_model.Speed | None:
    q = resolved(Quant(p.bits, o.quant_type, o.double_quant, o.dtype), desc, native=p.runtime == NATIVE.name)
    return speed_model.predict(desc, q, p.device_map, p.strategy, p.runtime, dict(t.bandwidth), o.context, o.batch)


def _choose(tried: list[Plan], prefer: str, source: SourcePrecision, quant_type: str) -> tuple[Plan | None, str]:
    """The plan ``prefer`` picks among those that fit, and the words for why."""
    fitting = [p for p in tried if p.fits]
    cap = source.cap_bits(quant_type)
    allowed = [p for p in fitting if p.bits <= cap]
    if not allowed:
        return (fitting[0] if fitting else None), "the best quality that fits"
    capped = f"; the source is already {source.bits}-bit ({source.label}), so no more than {cap} bits" if cap < 16 else ""
    # a model that fits the GPU stays there whatever the preference: the CPU figures leave out
    # per-step costs that dominate a tiny model, and the GPU is what the box is for
    allowed = [p for p in allowed if p.strategy == "gpu"] or allowed
    if prefer == "speed":
        if any(p.speed is None for p in allowed):
            return allowed[0], "the best quality that fits (no bandwidth figure in the profile to predict speed)" + capped
        best = max(allowed, key=lambda p: p.speed.tokens_per_s)
        return best, f"the fastest predicted decode that fits ({best.speed.tokens_per_s:.0f} tokens/s){capped}"
    if prefer == "balanced":
        within = [p for p in allowed if (kl := p.expected_kl) is not None and kl <= KL_BUDGET]
        if not within:
            return allowed[0], f"the best quality that fits (none that fits has a measured loss within budget){capped}"
        fewest = min(p.bits for p in within)
        best = next(p for p in within if p.bits == fewest)
        # fewer bits are worth it for speed and size; where more bits are predicted faster too
        # (bitsandbytes' int8 on a GPU), fewer buy nothing
        if all(p.speed for p in within):
            best = max(within, key=lambda p: (round(p.speed.tokens_per_s, 6), -p.bits))
        kl = best.expected_kl
        why = ("the fewest bits" if best.bits == fewest else f"more bits than {fewest}, predicted faster,")
        acts = " with the engine's int8 activations" if best.int8_activations else ""
        return best, (f"{why} whose measured quality loss is within budget (mean KL {kl:.5f}{acts} <= {KL_BUDGET}, "
                      f"llama.cpp Q8_0's on the default model){capped}")
    return allowed[0], "the best quality that fits" + capped


def _setting_summary(p: Plan, source: SourcePrecision, quant_type: str) -> dict[str, Any]:
    cap = source.cap_bits(quant_type)
    return {"bits": p.bits, "quant_type": p.quant_type, "strategy": p.strategy, "runtime": p.runtime, "fits": p.fits,
            "weight_bytes": p.weight_bytes, "within_source_bits": p.bits <= cap,
            "expected_kl": p.expected_kl, "int8_activations": p.int8_activations,
            "speed": p.speed.to_dict() if p.speed else None}


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
                  blocks: Sequence[str], **options: Any) -> DeviceBudget:
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
    rt = _runtime_for(desc, strategy, o.runtime, t.arch, q)
    return _Setting(desc, t, resolved(q, desc, native=rt is NATIVE), strategy, o, rt)


def _options(desc: ModelDescription, *, context: int | None = None, prompt_tokens: int | None = None,
             batch: int = 1, quant_type: str = "nf4", double_quant: bool = False, dtype: str = "bfloat16",
             runtime: str = "auto") -> Options:
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
            out.append(f"{setting_text(p)} would fit ({need_text(p)}).")
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
            out.append(f"The smallest built-in profile that fits is {alt.name} ({size_text(alt)}).")
            break
    return out


def _nothing_fits(desc, t: _Target, o: Options, tried: list[Plan], alternatives) -> PlanError:
    best = min(tried, key=_overflow)
    worst = max(best.devices.values(), key=lambda b: b.total_bytes / b.capacity_bytes)
    nearest = _nearest(desc, t, o, alternatives, None)
    message = (
        f"{desc.name} does not fit {t.name} at a context of {o.context} tokens: even {setting_text(best)} "
        f"needs {human(worst.total_bytes)} on {worst.device} ({parts_text(worst)}) "
        f"but {worst.device} has {human(worst.capacity_bytes)} usable"
    )
    return PlanError(message, hint=" ".join(nearest) if nearest else "use a device with more memory")
