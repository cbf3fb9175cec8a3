"""How fast a setting decodes, predicted from bytes: a decode step reads every weight once.

    seconds per step = sum over devices of bytes read there / (bandwidth x efficiency)
                       (+ kernel launches per layer on a GPU)
    (int4's weights at a lower efficiency than its KV cache: unpacking nibbles costs time)
    tokens/s = batch / seconds per step

Bytes read per step: every stored tensor at its stored type (the bundle's bytes, as
sizing.block_weight_bytes counts them, so a quantized or 16-bit output layer counts as
stored), except an untied embedding table, of which a step reads one row; a tied table is
the output layer and counts once. Plus the KV cache of the context so far: 16-bit K and V
of every cached position, each layer.

Bandwidth is the profile's (``memory_bandwidth.read_bytes_per_s``, per GPU for the GPU's
layers). Efficiency is the share of that bound the engine reaches, measured where it
could be (below, with sources). Pure: numbers in, numbers out; no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgepack.plan.model import ModelDescription
from edgepack.plan.sizing import Quant, block_weight_bytes

# --- the engine's efficiency: measured decode speed / (bandwidth / bytes per token) ---------
#
# edgepack's C engine (native runtime) on this project's 2-vCPU AMD EPYC (Zen 1, AVX2) box,
# quiet, 2026-12-07 23:13-23:18, each against the read bandwidth `edgepack profile`'s probe
# measured in the same minutes, 8-bit bundles with 8-bit tables (the default), greedy,
# engine as shipped: SmolLM2-135M (134.5M parameters, 136.9 MB read a token) decoded 128.0
# tokens/s against 23.6 GB/s (tests/bench/plan_accuracy.py --speed), 74% of the bound; a
# Llama-3.2-1B-shaped model (1.236B parameters, 1.254 GB) 16.2 tokens/s against 23.2 GB/s
# (decode_bench.py's worker), 88%. A small step loses more to what does not scale with its
# bytes (waking the threads, the attention, norms and sampling, the call from Python), so
# efficiency grows with the model: interpolated in log(parameters) between the two points,
# held flat outside them.
NATIVE_EFFICIENCY_POINTS = ((134_515_008, 128.0 * 136_941_696 / 23.6e9),
                            (1_235_814_400, 16.23 * 1_253_806_080 / 23.2e9))
NATIVE_EFFICIENCY_SOURCE = ("measured on a 2-vCPU Zen 1 EPYC, 8-bit, against the probe's read bandwidth: 74% of the "
                            "bound at 135M parameters (128.0 tokens/s at 23.6 GB/s), 88% at 1.2B (16.2 at 23.2), "
                            "interpolated in log(parameters)")
# int4 in the C engine multiplies its codes by int8 activations (x86: maddubs, as the 8-bit
# kernels), but a block's two scales, its zero term and the unpacking cost more per byte than
# 8-bit rows: in the same plan_accuracy runs (three, 13 repeats in all) int4 decoded a median
# 133.4 tokens/s reading 96.5 MB a token, 8-bit 122.5 reading 136.9 MB, so int4 reaches
# 0.767 of 8-bit's share of the bound at this size.
NATIVE_INT4_FACTOR = (133.4 * 96_506_496) / (122.5 * 136_941_696)
# torch on a CPU (nf4/fp4 bundles, and architectures the C engine does not run), from the
# README's cpu_bench table on a 2-core AVX-512 EPYC VM of ~33 GB/s read (issue 22's box):
# transformers + bitsandbytes 8-bit decoded the default model at 13.5 tokens/s (163.5 MB a
# token: 6.7% of the bound); nf4 at ~3 tokens/s (4-bit layers dequantized every call;
# 116.4 MB a token: 1.1%).
TORCH_CPU_EFFICIENCY = {16: 13.5 * 163_483_776 / 33e9, 8: 13.5 * 163_483_776 / 33e9, 4: 3 * 116_443_386 / 33e9}
TORCH_CPU_SOURCE = "the README's cpu_bench figures for transformers + bitsandbytes on a 2-core EPYC (~33 GB/s)"
# A GPU (transformers + bitsandbytes): not measured here (no GPU on the project's boxes), so
# assumed. 16-bit: half the VRAM bound, a round figure for batch-1 decoding in eager torch.
# bitsandbytes' LLM.int8 splits outliers into a 16-bit matmul every call: 2.4x the time of
# bfloat16 at 13B in a user's measurement (26.2 s vs 10.9 s, huggingface.co
# Open-Orca/OpenOrcaxOpenChat-Preview2-13B discussion 8), so 0.5 x (half the bytes) / 2.4.
# nf4: bitsandbytes' batch-1 4-bit kernel dequantizes as it reads; assumed as fast as
# 16-bit, not faster ("somewhere in between" int8 and 16-bit in the same thread): 0.5 x 0.27.
GPU_EFFICIENCY = {16: 0.5, 8: 0.5 * 0.5 / 2.4, 4: 0.5 * 0.27}
# ...plus what eager torch spends launching kernels, which no bandwidth hides on a small
# model: ~15 kernels a Llama decoder layer (norms, projections, rotary, attention, the MLP's
# activation and product, residual adds) at ~10 us of host time each. Assumed, not measured.
GPU_LAUNCH_S_PER_LAYER = 15 * 10e-6
GPU_SOURCE = "assumed, not measured (no GPU here): 16-bit 50% of the VRAM bound, bitsandbytes int8 and nf4 slower"
KV_BYTES = 2  # every runtime keeps a 16-bit K and V cache (sizing.RuntimeMemory.kv_bytes)


@dataclass(frozen=True)
class Speed:
    """A setting's predicted decode speed, with the terms it came from."""

    tokens_per_s: float  # at ``context`` tokens of cache
    tokens_per_s_empty: float  # the first tokens (an empty cache)
    context: int
    bytes_per_token: int  # weights read a step, all devices
    kv_bytes_per_token: int  # the cache read a step at ``context``
    devices: dict[str, dict[str, Any]]  # per device: bytes, bandwidth, efficiency, basis

    def to_dict(self) -> dict[str, Any]:
        return {"tokens_per_s": round(self.tokens_per_s, 2), "tokens_per_s_empty": round(self.tokens_per_s_empty, 2),
                "context": self.context, "bytes_per_token": self.bytes_per_token,
                "kv_bytes_per_token": self.kv_bytes_per_token, "devices": self.devices}


def native_efficiency(num_parameters: int) -> float:
    """The C engine's share of the bandwidth bound at 8 bits for a model of that size."""
    (b0, e0), (b1, e1) = NATIVE_EFFICIENCY_POINTS
    x = min(max(num_parameters, b0), b1)
    return e0 + (e1 - e0) * (math.log(x) - math.log(b0)) / (math.log(b1) - math.log(b0))


def efficiency(runtime: str, device: str, q: Quant, num_parameters: int) -> tuple[float, float, str]:
    """(share of the bound reading weights, reading the KV cache, where the figures come
    from) for one device of a setting. int4's unpacking slows its weights, not its cache."""
    if device.startswith("cuda"):
        return GPU_EFFICIENCY[q.bits], GPU_EFFICIENCY[16], GPU_SOURCE
    if runtime == "native":
        base = native_efficiency(num_parameters)
        if q.bits == 4:
            return (base * NATIVE_INT4_FACTOR, base,
                    NATIVE_EFFICIENCY_SOURCE + f"; int4 weights x {NATIVE_INT4_FACTOR:.3f} (133.4 vs 122.5 tokens/s)")
        return base, base, NATIVE_EFFICIENCY_SOURCE
    return TORCH_CPU_EFFICIENCY[q.bits], TORCH_CPU_EFFICIENCY[16], TORCH_CPU_SOURCE


def read_bytes(desc: ModelDescription, q: Quant, device_map: dict[str, str], strategy: str) -> dict[str, int]:
    """Weight bytes one decode step reads on each device."""
    tied_tables = {b.tied_to for b in desc.blocks if b.tied_to}
    out: dict[str, int] = {}
    for block in desc.blocks:
        device = device_map.get(block.name, "cpu")
        if block.kind == "embedding" and block.name not in tied_tables:
            continue  # an untied table: one row a step
        # 8-bit layers offloaded beside a GPU run in float32 on the CPU (sizing's fp32_linears)
        fp32 = device == "cpu" and q.bits == 8 and strategy == "offload"
        out[device] = out.get(device, 0) + block_weight_bytes(block, q, fp32_linears=fp32)
    return out


def kv_read_bytes(desc: ModelDescription, layers: int, context: int, runtime: str) -> int:
    """K and V of ``context`` cached positions in ``layers`` layers; the C engine's
    sliding-window layers keep (and read) their window only."""
    per_position = 2 * desc.num_key_value_heads * desc.head_dim * KV_BYTES
    sliding = min(desc.sliding_layers, layers) if runtime == "native" else 0
    positions = (layers - sliding) * context + sliding * min(desc.sliding_window or context, context)
    return per_position * positions


def predict(desc: ModelDescription, q: Quant, device_map: dict[str, str], strategy: str, runtime: str,
            bandwidth: dict[str, int | None], context: int, batch: int = 1) -> Speed | None:
    """The decode speed of a placed setting; None when a device it uses has no bandwidth
    figure (a profile written before profiles carried one)."""
    weights = read_bytes(desc, q, device_map, strategy)
    total = sum(weights.values())
    layers = {}
    for block in desc.blocks:
        if block.kind == "layer":
            device = device_map.get(block.name, "cpu")
            layers[device] = layers.get(device, 0) + 1
    devices: dict[str, dict[str, Any]] = {}
    seconds, seconds_empty, kv_total = 0.0, 0.0, 0
    for device in dict.fromkeys([*weights, *layers]):
        bw = bandwidth.get("cuda" if device.startswith("cuda") else "cpu")
        if not bw:
            return None
        eff, kv_eff, source = efficiency(runtime, device, q, desc.num_parameters)
        kv = batch * kv_read_bytes(desc, layers.get(device, 0), context, runtime)
        w = weights.get(device, 0)
        launch = GPU_LAUNCH_S_PER_LAYER * layers.get(device, 0) if device.startswith("cuda") else 0.0
        seconds += w / (bw * eff) + kv / (bw * kv_eff) + launch
        seconds_empty += w / (bw * eff) + launch
        kv_total += kv
        devices[device] = {"weight_bytes": w, "kv_bytes": kv, "read_bytes_per_s": bw, "efficiency": round(eff, 4),
                           "kv_efficiency": round(kv_eff, 4), "efficiency_source": source, "launch_s": launch}
    return Speed(batch / seconds, batch / seconds_empty, context, total, kv_total, devices)


def profile_bandwidth(profile: Any) -> dict[str, int | None]:
    """{"cpu": bytes/s, "cuda": bytes/s} from a DeviceProfile (the first GPU's, as placement
    treats GPUs alike); None where the profile has no figure. On unified memory the GPU's
    pool is the same RAM: its figure is the GPU's own read rate of it."""
    cpu = profile.memory_bandwidth.read_bytes_per_s if profile.memory_bandwidth else None
    gpu = profile.gpus[0].memory_bandwidth if profile.gpus else None
    return {"cpu": cpu, "cuda": gpu.read_bytes_per_s if gpu else None}
