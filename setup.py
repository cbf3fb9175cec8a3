"""The one C extension, edgepack's CPU engine (edgepack/runtime/engine/csrc/); everything else
is in pyproject.toml. It is optional: where it cannot be compiled (no C compiler), edgepack
installs without it and the runtime decodes with torch ops instead.

Every source is compiled with the same flags: the per-instruction-set kernels (csrc/arch/)
carry their own target attributes, so the build needs no AVX-512 CPU, only a compiler that
knows the instruction set, and the engine picks the kernels the CPU runs at import."""

import sys
from pathlib import Path

from setuptools import Extension, setup

CSRC = Path("edgepack/runtime/engine/csrc")
sources = sorted(p.as_posix() for p in CSRC.rglob("*.c"))
flags = (
    ["-O3", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno", "-pthread", "-fvisibility=hidden"]
    if sys.platform != "win32"
    else ["/O2"]
)

setup(
    ext_modules=[
        Extension(
            "edgepack._native",
            sources,
            depends=sorted(p.as_posix() for p in CSRC.rglob("*.h")),
            extra_compile_args=flags,
            extra_link_args=["-pthread"] if sys.platform != "win32" else [],
            optional=True,
        )
    ]
)
