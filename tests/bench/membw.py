"""The box's streaming read bandwidth: what bounds a decode step that reads every weight once.

    python tests/bench/membw.py [--gib 1] [--passes 5]

A C loop (gcc -O3 -march=native, compiled once into tests/bench/.work/) sums 64-bit words
over a buffer (1 GiB by default, far beyond any cache), each thread its own contiguous
slice, as a decode step reads its rows; the best of `passes` timed passes after one
untimed pass that faults the pages in. Printed for 1 thread and for every CPU this
process may run on. GB/s are 1e9 bytes a second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

WORK = Path(__file__).resolve().parent / ".work"

SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t *buf;
static size_t words;
static int nth;
static pthread_barrier_t bar;
static volatile uint64_t sink;
static double cpu_s[256];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* eight independent sums so the loop is bound by loads, not by one add chain */
static uint64_t sum(const uint64_t *p, size_t n) {
    uint64_t s[8] = {0};
    for (size_t i = 0; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += p[i + j];
    return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

static double thread_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *run(void *arg) {
    const int t = (int)(intptr_t)arg;
    const size_t per = words / nth;
    pthread_barrier_wait(&bar);
    const double c0 = thread_cpu();
    sink += sum(buf + per * t, per);
    cpu_s[t] = thread_cpu() - c0;
    pthread_barrier_wait(&bar);
    return NULL;
}

int main(int argc, char **argv) {
    const size_t bytes = (size_t)(atof(argv[1]) * (1 << 30));
    nth = atoi(argv[2]);
    const int passes = atoi(argv[3]);
    words = bytes / 8;
    buf = aligned_alloc(4096, bytes);
    memset(buf, 1, bytes);
    double best = 1e30, best_cpu = 1e30;
    for (int p = 0; p <= passes; p++) {
        pthread_t th[256];
        pthread_barrier_init(&bar, NULL, nth + 1);
        for (int t = 0; t < nth; t++) pthread_create(&th[t], NULL, run, (void *)(intptr_t)t);
        pthread_barrier_wait(&bar);
        const double t0 = now();
        pthread_barrier_wait(&bar);
        const double dt = now() - t0;
        for (int t = 0; t < nth; t++) pthread_join(th[t], NULL);
        pthread_barrier_destroy(&bar);
        double slowest_cpu = 0; /* the pass takes as long as its slowest thread */
        for (int t = 0; t < nth; t++) slowest_cpu = cpu_s[t] > slowest_cpu ? cpu_s[t] : slowest_cpu;
        if (p > 0 && dt < best) best = dt; /* pass 0 only warms caches and TLBs */
        if (p > 0 && slowest_cpu < best_cpu) best_cpu = slowest_cpu;
    }
    const double read = (double)(words / nth * nth * 8);
    printf("%.3f %.3f\n", read / best / 1e9, read / best_cpu / 1e9);
    return 0;
}
"""


def binary() -> Path:
    WORK.mkdir(exist_ok=True)
    src, exe = WORK / "membw.c", WORK / "membw"
    stale = not exe.exists() or not src.exists() or src.read_text() != SOURCE
    if stale:
        src.write_text(SOURCE)
        subprocess.run(["gcc", "-O3", "-march=native", "-pthread", str(src), "-o", str(exe)], check=True)
    return exe


def read_gb_s(threads: int, gib: float = 1.0, passes: int = 5) -> tuple[float, float]:
    """(GB/s over wall time, GB/s over the slowest thread's own CPU time), best passes."""
    out = subprocess.run([str(binary()), str(gib), str(threads), str(passes)], capture_output=True, text=True, check=True)
    wall, on_cpu = out.stdout.split()
    return float(wall), float(on_cpu)


def measure(gib: float = 1.0, passes: int = 5) -> dict:
    """Read GB/s at 1 thread and at every CPU: `wall` is what a run saw on this machine as it
    is now; `on_cpu` divides by the slowest thread's own CPU time, so time the scheduler gave
    to other processes on a shared box does not count (the bandwidth of a quiet box, as long
    as the memory bus itself is not the contended part)."""
    cpus = len(os.sched_getaffinity(0))
    one, every = read_gb_s(1, gib, passes), read_gb_s(cpus, gib, passes)
    return {"cpus": cpus, "threads_1": {"wall": one[0], "on_cpu": one[1]}, "threads_all": {"wall": every[0], "on_cpu": every[1]}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--passes", type=int, default=5)
    a = ap.parse_args()
    print(json.dumps(measure(a.gib, a.passes)))
