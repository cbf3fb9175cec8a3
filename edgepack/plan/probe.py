"""Describe this machine as a device profile: CPU model and SIMD, RAM, its memory read
bandwidth (timed, under half a second), CUDA GPUs and whether bitsandbytes' kernels run
(checked in a child process). The only code in plan/ that reads hardware; psutil, numpy
and torch are imported lazily, inside probe().
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

from edgepack.errors import ProfileError
from edgepack.plan.profile import GIB, PROFILE_SCHEMA, DeviceProfile, is_profile_name

_X86_SIMD = ("avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "f16c", "fma")
# /proc/cpuinfo "Features" word -> our name; aarch64 says "asimd" where 32-bit ARM says "neon"
_ARM_SIMD = (("neon", "neon"), ("asimd", "asimd"), ("asimddp", "dotprod"), ("sve", "sve"),
             ("i8mm", "i8mm"), ("bf16", "bf16"))
# aarch64 /proc/cpuinfo has no "model name", only the Arm "CPU part" number
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72",
              "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1",
              "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE", "0xd49": "Neoverse-N2",
              "0xd4f": "Neoverse-V2"}
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}

# Runs in a child process: a broken bitsandbytes install can crash the interpreter
# (bad native library) or hang on CUDA init, and neither may take `edgepack profile` down.
_BNB_CHECK = r"""
import json, sys
def line(exc):
    return (f"{type(exc).__name__}: {exc}".splitlines() or ["?"])[0][:300]
try:
    import torch
    import bitsandbytes.functional as F
except Exception as exc:
    print("EDGEPACK_BNB " + json.dumps({d: line(exc) for d in sys.argv[1:]}))
    raise SystemExit(0)
result = {}
for device in sys.argv[1:]:
    try:
        x = torch.randn(64, 64, device=device, dtype=torch.float16)
        F.int8_vectorwise_quant(x)
        F.quantize_4bit(x, blocksize=64, quant_type="nf4")
        if device == "cuda":
            torch.cuda.synchronize()  # surface asynchronous kernel failures here
        result[device] = None
    except Exception as exc:
        result[device] = line(exc)
print("EDGEPACK_BNB " + json.dumps(result))
"""


# The read-bandwidth probe: a buffer well past any CPU's last-level cache (the largest here:
# 96 MiB of L3 on a Ryzen 7950X3D), one untimed pass to fault its pages in, then the best of
# a few timed passes; 256 MiB at the Pi 4's 5.5 GB/s is ~50 ms a pass.
BANDWIDTH_PROBE_BYTES = 256 << 20
BANDWIDTH_PROBE_PASSES = 2


def probe(name: str | None = None, *, check_bitsandbytes: bool = True, timeout_s: float = 120.0,
          measure_bandwidth: bool = True) -> dict:
    """Describe this machine as a profile dict (schema edgepack-profile/1).

    ram_reserved_bytes is what is in use right now (total - available), and a GPU's
    reserved_bytes is total - free from cudaMemGetInfo, which includes this process's
    CUDA context. bitsandbytes is tried in a subprocess, bounded by timeout_s.
    """
    import platform
    import shutil
    import socket
    from datetime import datetime, timezone

    import psutil

    if name is not None and not is_profile_name(name):
        raise ProfileError(f"profile name {name!r} must be lowercase letters, digits and '-'",
                           "for example: --name my-box")
    host = socket.gethostname() or "unknown"
    vm = psutil.virtual_memory()
    ram_reserved = vm.total - vm.available
    arch = platform.machine().lower()
    arch = _ARCH_ALIASES.get(arch, arch) or "unknown"
    model, simd = _cpu_model_and_simd(arch)
    torch_version, gpus, integrated = _cuda_gpus()
    unified = bool(gpus) and (Path("/etc/nv_tegra_release").exists() or integrated)
    if unified:
        # One pool: describe it as RAM-sized, and let the GPU's reserve cover whatever
        # neither the OS nor CUDA can hand out now.
        free = gpus[0]["memory_bytes"] - gpus[0]["reserved_bytes"]
        gpus = [dict(gpus[0], memory_bytes=vm.total, reserved_bytes=vm.total - min(free, vm.available))]
    bnb_cpu, bnb_cuda, bnb_error = None, None, None
    if check_bitsandbytes:
        bnb_cpu, bnb_cuda, bnb_error = _bitsandbytes_works(bool(gpus), timeout_s)
    if not gpus:
        bnb_cuda = False  # no CUDA device: the CUDA kernels certainly cannot run here
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    gpu_text = "".join(f", {g['name']}" for g in gpus)
    d = {
        "schema": PROFILE_SCHEMA,
        "name": name or _probed_name(host),
        "description": f"probed {host}: {model}, {vm.total / GIB:.1f} GiB RAM{gpu_text}",
        "source": f"probed by `edgepack profile` at {at} (psutil, /proc/cpuinfo, torch.cuda.mem_get_info)",
        "cpu": {"arch": arch, "cores": _cpu_count(), "model": model, "simd": simd},
        "ram_bytes": vm.total,
        "ram_reserved_bytes": ram_reserved,
        "reserved_note": ("in use at probe time: RAM total - available (psutil); GPU total - free "
                          "(cudaMemGetInfo), including this process's CUDA context"
                          + ("; unified memory: one pool shared by CPU and GPU" if unified else "")),
        "swap_bytes": psutil.swap_memory().total,
        "unified_memory": unified,
        "gpus": gpus,
        "disk_free_bytes": shutil.disk_usage(os.getcwd()).free,
        "bitsandbytes": {"cpu": bnb_cpu, "cuda": bnb_cuda},
        "probed": {"at": at, "host": host, "available_ram_bytes": vm.available,
                   "torch": torch_version, "bitsandbytes_error": bnb_error},
    }
    if measure_bandwidth:
        read, how = read_bandwidth()
        d["memory_bandwidth"] = {"read_bytes_per_s": read, "basis": "measured", "theoretical_bytes_per_s": None,
                                 "source": f"measured by `edgepack profile` at {at}: {how}"}
    return DeviceProfile.from_dict(d, origin=f"probe of {host}").to_dict()


def read_bandwidth(size_bytes: int = BANDWIDTH_PROBE_BYTES, passes: int = BANDWIDTH_PROBE_PASSES) -> tuple[int, str]:
    """(bytes/s, how) of a streaming read of RAM, as a decode step reads its weights: numpy
    sums, one thread per CPU this process may use, each its own slice (numpy's reductions
    release the GIL), timed by each thread's own CPU time so that time the scheduler gives
    other processes on a busy box does not read as low bandwidth (tests/bench/membw.py's
    on-CPU figure, which the engine's measured efficiency is relative to). Without numpy:
    one thread's memchr over the buffer (bytearray.find), which a multi-core box exceeds."""
    import time

    try:
        import numpy as np
    except ImportError:
        buf = bytearray(size_bytes)  # zeros: find() scans it all for a byte that is not there
        buf.find(b"\x01")
        best = min(_timed(lambda: buf.find(b"\x01")) for _ in range(passes))
        return int(size_bytes / best), (f"one thread's memchr over {size_bytes >> 20} MiB, best of {passes} "
                                        "passes, on its own CPU time (numpy absent: a multi-core box reads more)")
    import threading

    threads = _cpu_count()
    n = size_bytes // 8 // threads
    parts: list = [None] * threads
    cpu_s = [0.0] * threads

    def read(i: int) -> None:
        if parts[i] is None:  # each thread writes its own slice: the page faults run in parallel
            parts[i] = np.ones(n, dtype=np.int64)
        start = time.thread_time()
        np.add.reduce(parts[i])
        cpu_s[i] = time.thread_time() - start

    best = float("inf")
    for p in range(passes + 1):
        workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if p:  # the first pass only faults the pages in
            best = min(best, max(cpu_s))  # a pass lasts as long as its slowest thread
    total = 8 * n * threads
    return int(total / best), (f"numpy int64 sums over {total >> 20} MiB, {threads} threads, best of "
                                      f"{passes} passes, on each thread's own CPU time")


def _timed(f) -> float:
    import time

    start = time.thread_time()
    f()
    return max(time.thread_time() - start, 1e-9)


def _probed_name(host: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", host.lower()).strip("-")
    return f"probed-{slug or 'unknown'}"


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):  # a container may be pinned to fewer CPUs
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _cpu_model_and_simd(arch: str) -> tuple[str, list[str]]:
    import platform

    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    model, simd = _parse_cpuinfo(text, arch)
    return model or platform.processor() or "unknown", simd


def _parse_cpuinfo(text: str, arch: str) -> tuple[str, list[str]]:
    """(CPU model or "", SIMD features in our names) from /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    if arch in ("x86_64", "i686", "i386"):
        simd = [f for f in _X86_SIMD if f in flags]
    else:
        if "asimd" in flags:
            flags.add("neon")
        simd = [ours for word, ours in _ARM_SIMD if word in flags]
    model = fields.get("model name") or _ARM_PARTS.get(fields.get("cpu part", "").lower(), "")
    board = fields.get("model")  # Raspberry Pi: "Raspberry Pi 5 Model B Rev 1.0"
    if board and not board.isdigit():  # on x86 "model" is a number
        model = f"{model} ({board})" if model else board
    return model, simd


def _cuda_gpus() -> tuple[str | None, list[dict], bool]:
    """(torch version or None, GPU dicts, whether any GPU is integrated)."""
    try:
        import torch
    except ImportError:
        return None, [], False
    gpus, integrated = [], False
    try:
        if not torch.cuda.is_available():
            return torch.__version__, [], False
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            integrated = integrated or bool(getattr(props, "is_integrated", False))
            gpus.append({"name": props.name, "memory_bytes": int(total),
                         "reserved_bytes": int(total - free),
                         "compute_capability": f"{props.major}.{props.minor}",
                         "bf16": props.major >= 8})  # native bf16 from Ampere on
    except RuntimeError:  # driver/runtime mismatch: for edgepack this box has no usable GPU
        return torch.__version__, [], False
    return torch.__version__, gpus, integrated


def _bitsandbytes_works(with_cuda: bool, timeout_s: float) -> tuple[bool, bool | None, str | None]:
    """(cpu works, cuda works or None without a GPU, first error line or None)."""
    import subprocess

    devices = ["cpu", "cuda"] if with_cuda else ["cpu"]
    try:
        done = subprocess.run([sys.executable, "-c", _BNB_CHECK, *devices], capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, (False if with_cuda else None), f"bitsandbytes check timed out after {timeout_s:g} s"
    except OSError as exc:
        return False, (False if with_cuda else None), f"bitsandbytes check could not start: {exc}"
    marked = [ln for ln in done.stdout.splitlines() if ln.startswith("EDGEPACK_BNB ")]
    if not marked:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return (False, (False if with_cuda else None),
                f"bitsandbytes check exited with code {done.returncode}: {last}")
    result = json.loads(marked[-1].removeprefix("EDGEPACK_BNB "))
    errors = [f"{dev}: {err}" for dev, err in result.items() if err]
    cuda = result.get("cuda") is None if with_cuda else None
    return result.get("cpu") is None, cuda, "; ".join(errors) or None
