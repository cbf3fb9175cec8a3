"""Is a decode product bound by memory or by arithmetic on this CPU? The engine's own kernels,
timed on a matrix that sits in L2 (arithmetic alone) and on one far beyond the caches
(arithmetic and memory together), beside the box's read bandwidth (membw.py).

    .venv/bin/python tests/bench/kernel_ceiling.py [--cols 576,2048]

Rows: int8 rows with int8 activations (the default decode product, Q8_0 x Q8_0), the same
with float32 activations, and an 8-bit table (int8 + a float16 scale per 32: the output
layer) both ways. Each figure is GB/s of weights read by one thread, over that thread's own
CPU time (so other programs on a shared box do not count), the best of five timings of
many calls through `_engine.gemv`, less what a call of 4 rows costs. Where the L2 figure is near or below membw's 1-thread
figure, the kernel's arithmetic, not memory, is the limit: a step cannot reach the
bandwidth bound on this CPU with those kernels, whatever the prefetching or threading.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import membw  # noqa: E402

from edgepack.runtime.engine import _engine as native  # noqa: E402

L2_BYTES = 256 << 10  # half of Zen 1's L2: stays there between calls
DRAM_BYTES = 512 << 20


def matrix(kind: str, rows: int, cols: int) -> tuple:
    gen = torch.Generator().manual_seed(rows + cols)
    codes = torch.randint(-127, 128, (rows, cols), generator=gen, dtype=torch.int8)
    if kind == "int8":
        scales = torch.rand(rows, generator=gen) / 64 + 1e-3
    else:
        scales = (torch.rand(rows, cols // 32, generator=gen) / 64 + 1e-3).to(torch.float16)
    return codes, scales, (native.INT8 if kind == "int8" else native.INT8_B32, rows, cols, codes.data_ptr(),
                           scales.data_ptr(), None)


def seconds_a_call(kind: str, rows: int, cols: int, act_bits: int) -> float:
    codes, scales, desc = matrix(kind, rows, cols)
    x, y = torch.randn(cols), torch.empty(rows)
    previous = native.activation_bits(act_bits)
    try:
        calls = max(3, min(20000, int(64e6 // (rows * cols))))  # ~64 MB of weights a timing
        best = float("inf")
        for _ in range(5):
            t0 = time.thread_time()
            for _ in range(calls):
                native.gemv(desc, x.data_ptr(), y.data_ptr(), 1)
            best = min(best, (time.thread_time() - t0) / calls)
    finally:
        native.activation_bits(previous)
    return best


def gb_s(kind: str, nbytes: int, cols: int, act_bits: int) -> float:
    """less the cost of a call of 4 rows (Python, the input's rounding): ~µs, which is a
    tenth of a call on an L2-sized matrix"""
    rows = max(8, nbytes // cols // 4 * 4)
    call = seconds_a_call(kind, 4, cols, act_bits)
    return (rows - 4) * cols / (seconds_a_call(kind, rows, cols, act_bits) - call) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cols", default="576,2048")
    a = ap.parse_args()
    bw = membw.measure(gib=0.5, passes=3)
    print(f"kernel set {native.set_isa()}; load average {os.getloadavg()[0]:.1f}; read bandwidth (membw.py): "
          f"1 thread {bw['threads_1']['on_cpu']:.1f} GB/s, {bw['cpus']} threads {bw['threads_all']['on_cpu']:.1f} GB/s")
    cases = [("int8 rows, int8 activations", "int8", 8), ("int8 rows, float32 activations", "int8", 32),
             ("8-bit table, int8 activations", "b32", 8), ("8-bit table, float32 activations", "b32", 32)]
    head = f"{'kernel (1 thread)':<34}{'cols':>6}{'in L2 GB/s':>12}{'from DRAM GB/s':>16}{'DRAM / L2':>11}"
    print(head + "\n" + "-" * len(head))
    for label, kind, act in cases:
        for cols in map(int, a.cols.split(",")):
            l2, dram = gb_s(kind, L2_BYTES, cols, act), gb_s(kind, DRAM_BYTES, cols, act)
            print(f"{label:<34}{cols:>6}{l2:>12.1f}{dram:>16.1f}{dram / l2:>11.0%}", flush=True)


if __name__ == "__main__":
    main()
