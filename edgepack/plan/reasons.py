"""The plan in words: why this setting, what each better one would have needed, and where
each figure comes from (every number the reasons quote is the one placement used)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgepack.plan.model import ModelDescription
from edgepack.plan.sizing import (
    BASELINE_SOURCE,
    CUDA_CONTEXT_BYTES,
    CUDA_HOST_BYTES,
    HEADROOM_FRACTION,
    HEADROOM_MIN_BYTES,
    LEAN,
    NATIVE,
    TOKENIZER_BYTES_PER_TOKEN,
    TRANSFORMERS,
    DeviceBudget,
    Quant,
    human,
    kv_cache_bytes,
)

if TYPE_CHECKING:  # the planner imports this module; these are only annotations
    from edgepack.plan.planner import Options, Plan, _Target


def size_text(t: _Target) -> str:
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


def setting_text(p: Plan) -> str:
    q = Quant(p.bits, p.quant_type or "nf4", p.double_quant)
    return f"{q.label} {_where_text(p)}"


def need_text(p: Plan) -> str:
    return "; ".join(f"{d}: {human(b.total_bytes)} of {human(b.capacity_bytes)}" for d, b in p.devices.items())


def parts_text(b: DeviceBudget) -> str:
    running = b.allocator_bytes + b.kv_cache_bytes + b.activations_bytes
    loading = b.loading_bytes > running
    parts = [("weights", b.weights_bytes), ("loading copies", b.loading_bytes if loading else 0),
             ("allocator", 0 if loading else b.allocator_bytes), ("KV cache", 0 if loading else b.kv_cache_bytes),
             ("activations", 0 if loading else b.activations_bytes), ("baseline", b.baseline_bytes),
             ("CUDA context", b.cuda_context_bytes), ("headroom", b.headroom_bytes)]
    return " + ".join(f"{name} {human(v)}" for name, v in parts if v)


def explain(desc: ModelDescription, t: _Target, o: Options, p: Plan, tried: list[Plan], bits: int | None,
            chosen_by: str | None = None) -> list[str]:
    r = []
    verdict = "fits" if p.fits else "does NOT fit"
    chosen_by = chosen_by or (f"bits forced to {bits}" if bits else "the best quality that fits")
    r.append(f"{setting_text(p)} {verdict} {t.name} ({size_text(t)}) at a context of {o.context} tokens: "
             f"{need_text(p)}; {chosen_by}.")
    if p.source.quantized:
        r.append(f"The source is already {p.source.bits}-bit ({p.source.label}: {p.source.detail}); "
                 f"more bits than {p.source.cap_bits(o.quant_type)} would add bytes and no quality.")
    if p.speed:
        r.append(speed_text(p))
    better = tried[: tried.index(p)] if p in tried else [x for x in tried if x is not p]
    for x in better:  # every better-quality setting, best first: why it was not taken
        if x.fits:
            r.append(f"{setting_text(x)} also fits{_speed_note(x)}; not chosen: {_passed_over(x, p, o)}.")
            continue
        worst = max(x.devices.values(), key=lambda d: d.total_bytes / d.capacity_bytes)
        r.append(f"{setting_text(x)} would need {human(worst.total_bytes)} on {worst.device}, "
                 f"which has {human(worst.capacity_bytes)} usable.")
    if p.strategy == "gpu" and p.bits < 16:
        offloads = [x for x in tried if x.strategy == "offload" and x.bits > p.bits and x.fits]
        if offloads:
            x = offloads[0]
            r.append(f"{setting_text(x)} would also fit, but {p.bits}-bit entirely on the GPU is preferred: "
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


def speed_text(p: Plan) -> str:
    """The predicted decode speed and the terms it comes from."""
    sp = p.speed
    terms = "; ".join(f"{d}: {human(v['weight_bytes'] + v['kv_bytes'])} / {v['read_bytes_per_s'] / 1e9:.1f} GB/s x "
                      f"{v['efficiency']:.0%}" + (f" + {v['launch_s'] * 1e3:.1f} ms of kernel launches" if v["launch_s"] else "")
                      for d, v in sp.devices.items())
    return (f"Decode: ~{sp.tokens_per_s_empty:.0f} tokens/s predicted on an empty cache, ~{sp.tokens_per_s:.0f} at "
            f"{sp.context} tokens of context ({human(sp.bytes_per_token)} of weights + {human(sp.kv_bytes_per_token)} "
            f"of KV cache read a token; {terms}: bytes / read bandwidth x the engine's measured share of it).")


def _speed_note(x: Plan) -> str:
    return f" (~{x.speed.tokens_per_s:.0f} tokens/s)" if x.speed else ""


def _passed_over(x: Plan, p: Plan, o: Options) -> str:
    cap = x.source.cap_bits(o.quant_type)
    if x.bits > cap:
        faster = " (though predicted faster)" if x.speed and p.speed and x.speed.tokens_per_s > p.speed.tokens_per_s else ""
        return (f"the source is {x.source.bits}-bit, so {x.bits} bits would add bytes and no quality{faster}; "
                f"--bits {x.bits} forces it")
    if x.prefer == "speed" and x.speed and p.speed:
        return f"slower than {p.bits}-bit's ~{p.speed.tokens_per_s:.0f} tokens/s"
    if x.prefer == "balanced":
        return f"{p.bits} bits are within the quality budget and {x.bits} are more bytes to read"
    return f"{'GPU' if p.strategy == 'gpu' else 'this placement'} preferred"


def _memory_reasons(desc: ModelDescription, t: _Target, o: Options, p: Plan) -> list[str]:
    rt = {"native": NATIVE, "lean": LEAN}.get(p.runtime, TRANSFORMERS)
    r = []
    kv = kv_cache_bytes(desc, rt, desc.num_hidden_layers, o.context, o.batch)
    growth = (f"preallocated by edgepack's {p.runtime} runtime" if rt.kv_static
              else "grown by concatenation, which briefly holds one layer's old and new tensor")
    ring = ""
    if rt is NATIVE and desc.sliding_layers:  # kv_cache_bytes: their caches are rings of the window
        ring = f", the {desc.sliding_layers} sliding-window layers' {min(desc.sliding_window, o.context)} tokens only,"
    r.append(f"KV cache: 2 x {desc.num_hidden_layers} layers x {desc.num_key_value_heads} KV heads x "
             f"{desc.head_dim} x {o.context} tokens{ring} x {o.batch} x {rt.kv_bytes} bytes = {human(kv)} "
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
