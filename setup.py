"""The one C extension, edgepack._native (the CPU decode step); everything else is in
pyproject.toml. It is optional: where it cannot be compiled (no C compiler), edgepack
installs without it and the runtime decodes with torch ops instead."""

import sys

from setuptools import Extension, setup

flags = ["-O3", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno", "-pthread"] if sys.platform != "win32" else ["/O2"]

setup(
    ext_modules=[
        Extension(
            "edgepack._native",
            ["edgepack/_native.c"],
            extra_compile_args=flags,
            extra_link_args=["-pthread"] if sys.platform != "win32" else [],
            optional=True,
        )
    ]
)
