"""`edgepack run --stats` names the kernel set the C engine runs (neon-dotprod on a Pi 5,
neon on a Pi 4, avx512 / avx2 on x86), and the torch backend names none."""

from __future__ import annotations

import pytest

from edgepack.cli import main

native = pytest.importorskip("edgepack.runtime.engine._engine", reason="the C extension is not built here")


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_stats_name_the_kernel_set(capsys, packed, backend):
    code = main(["run", str(packed("llama", 8)), "The capital", "--max-new-tokens", "3", "--min-new-tokens", "3",
                 "--temperature", "0", "--stats", "--backend", backend])
    err = capsys.readouterr().err
    assert code == 0 and f"{backend} backend" in err
    assert (f"engine {native.set_isa()}, " in err) == (backend == "native"), err
