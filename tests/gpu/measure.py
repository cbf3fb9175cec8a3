"""Measurements for the GPU check: logits distance, decode speed, GPU memory.

GPU memory is read two ways: torch's allocator peak (``torch.cuda.max_memory_allocated``:
tensors only) and the whole process as the driver sees it (NVML: CUDA context, cuBLAS
workspace, kernel images, the allocator's cached blocks), which is what runs out on a
small card. NVML comes from pynvml when installed, else from libnvidia-ml through ctypes
(every CUDA driver ships it), else from ``nvidia-smi``; the source is reported.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time

MIB = 1 << 20


def rel_l2(got, want) -> float:
    """||got - want|| / ||want|| over every position's logits, in float32."""
    import torch

    got, want = got.float().cpu(), want.float().cpu()
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


def top1(got, want) -> float:
    return float((got.float().cpu().argmax(-1) == want.float().cpu().argmax(-1)).float().mean())


def decode_speed(model, prompt: list[int], new_tokens: int, sync) -> dict:
    """Greedy decoding through edgepack's token loop (torch_model.generate_tokens, the same
    loop for an edgepack load and for the seed recipe's model): seconds to the first token
    (the prompt pass) and tokens/s over the rest. ``sync``: waits for the device."""
    from edgepack.runtime.torch.model import generate_tokens

    tokens = generate_tokens(model, prompt, set(), 0.0, 1.0, 0, None, new_tokens, new_tokens)
    t0 = time.perf_counter()
    next(tokens)
    sync()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        next(tokens)  # each step ends in argmax(...).item(): the device is synchronized
    sync()
    t2 = time.perf_counter()
    tokens.close()
    return {"prompt_s": t1 - t0, "tok_s": (new_tokens - 1) / (t2 - t1)}


def gpu_memory(device: int = 0) -> dict:
    """What this process holds on the GPU now: torch's peak and NVML's total (or None)."""
    import torch

    process, source = nvml_process_bytes(device)
    if process is None:  # e.g. a container whose pids NVML does not see: the whole GPU's use
        free, total = torch.cuda.mem_get_info(device)
        process, source = total - free, f"whole GPU (cudaMemGetInfo; {source})"
    return {
        "max_allocated": torch.cuda.max_memory_allocated(device),
        "max_reserved": torch.cuda.max_memory_reserved(device),
        "process": process,
        "process_source": source,
    }


def nvml_process_bytes(device: int = 0) -> tuple[int | None, str]:
    """(bytes this process holds on ``device``, how it was read), or (None, why not)."""
    pid = os.getpid()
    readers = (("pynvml", _pynvml_bytes), ("libnvidia-ml", _ctypes_nvml_bytes), ("nvidia-smi", _smi_bytes))
    errors = []
    for name, reader in readers:
        try:
            value = reader(device, pid)
        except Exception as exc:  # each reader is optional; the next one is tried
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        if value is not None:
            return value, name
        errors.append(f"{name}: pid {pid} not listed")
    return None, "; ".join(errors)


def _pynvml_bytes(device: int, pid: int) -> int | None:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid:
                return int(proc.usedGpuMemory)
    finally:
        pynvml.nvmlShutdown()
    return None


class _ProcessInfo(ctypes.Structure):  # nvmlProcessInfo_v1_t: what the unversioned call fills
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


def _ctypes_nvml_bytes(device: int, pid: int) -> int | None:
    nvml = ctypes.CDLL("libnvidia-ml.so.1")
    if nvml.nvmlInit_v2() != 0:
        raise OSError("nvmlInit_v2 failed")
    try:
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(device), ctypes.byref(handle)) != 0:
            raise OSError("nvmlDeviceGetHandleByIndex_v2 failed")
        count = ctypes.c_uint(64)
        infos = (_ProcessInfo * 64)()
        if nvml.nvmlDeviceGetComputeRunningProcesses(handle, ctypes.byref(count), infos) != 0:
            raise OSError("nvmlDeviceGetComputeRunningProcesses failed")
        for info in infos[: count.value]:
            if info.pid == pid:
                return int(info.usedGpuMemory)
    finally:
        nvml.nvmlShutdown()
    return None


def _smi_bytes(device: int, pid: int) -> int | None:
    out = subprocess.run(["nvidia-smi", "-i", str(device), "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    for line in out.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return int(fields[1]) * MIB
    return None


def within(measured: int | None, predicted: int, fraction: float) -> bool | None:
    """Whether ``measured`` is within ``fraction`` of ``predicted``; None when not measured."""
    if measured is None:
        return None
    return abs(measured - predicted) <= fraction * predicted


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.0f}"
