"""How the C kernels run: how many threads (the CPUs this process may run on, or what
EDGEPACK_THREADS / OMP_NUM_THREADS asks for), and the activations into int8 products
(EDGEPACK_ACTIVATION_BITS: 8, the default, or 32)."""

from __future__ import annotations

import os

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

THREADS_ENV = "EDGEPACK_THREADS"
ACTIVATIONS_ENV = "EDGEPACK_ACTIVATION_BITS"
# the words of `--activations` and the bits each sets
ACTIVATIONS = {"int8": 8, "float": 32}


def asked_threads() -> int | None:
    """The thread count EDGEPACK_THREADS (else OMP_NUM_THREADS) asks for, if any."""
    for env in (THREADS_ENV, "OMP_NUM_THREADS"):
        wanted = os.environ.get(env, "").strip()
        if wanted.isdigit() and int(wanted) > 0:
            return int(wanted)
    return None


def threads() -> int:
    """Most threads for the C kernels: the CPUs this process may run on, at most one per
    physical core (two on one core only take turns), or the count asked for (asked_threads).
    Unless asked, each decode step runs on the count measured fastest up to this (pool.c):
    on a box where other programs keep cores busy, fewer threads than cores decode faster."""
    cpus = CPUS
    try:
        import psutil

        cpus = min(cpus, psutil.cpu_count(logical=False) or cpus)
    except ImportError:
        pass
    wanted = asked_threads()
    return max(1, min(cpus, wanted)) if wanted else cpus


def asked_activation_bits() -> int | None:
    """The activation bits EDGEPACK_ACTIVATION_BITS asks for (8 or 32), if it is set."""
    wanted = os.environ.get(ACTIVATIONS_ENV, "").strip()
    if not wanted:
        return None
    if wanted not in ("8", "32"):
        from edgepack.errors import UsageError

        raise UsageError(f"{ACTIVATIONS_ENV}={wanted!r}: 8 (int8 activations) or 32 (float32) expected",
                         hint=f"set {ACTIVATIONS_ENV}=32 for float32 activations, or unset it for the default (8)")
    return int(wanted)
