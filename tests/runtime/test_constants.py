"""edgepack.runtime.constants holds the numbers both the runtime and the planner count with;
the C engine keeps its own #defines, which must say the same."""

from __future__ import annotations

import pytest

from edgepack.runtime import constants


def test_the_c_engine_exports_the_prompt_sizes_the_planner_counts_with():
    engine = pytest.importorskip("edgepack.runtime.engine._engine", reason="the C extension is not built here")
    assert (engine.PROMPT_CHUNK, engine.PROMPT_ROWS) == (constants.PROMPT_CHUNK, constants.PROMPT_ROWS) == (96, 16)


def test_runtime_and_planner_read_the_same_objects():
    """No copies: the torch backend's and the planner's names are the constants module's."""
    from edgepack import runtime
    from edgepack.plan import planner
    from edgepack.runtime.torch import linear

    names = ("DEQUANT_CHUNK_WEIGHTS", "WIDE_ROWS", "WIDE_CHUNK_WEIGHTS", "INT8_WIDE_ROWS", "INT8_WIDE_CHUNK",
             "INT8_DIGIT_ROWS", "INT8_TWO_DIGITS_MAX_IN")
    for name in names:
        assert getattr(linear, name) == getattr(planner, name) == getattr(constants, name), name
    assert (runtime.TORCH_OVERHEAD_BYTES, runtime.NATIVE_OVERHEAD_BYTES) == (400 << 20, 96 << 20)
    assert runtime.NATIVE_OVERHEAD_BYTES is constants.NATIVE_OVERHEAD_BYTES
