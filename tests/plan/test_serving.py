"""The planner's figure for `edgepack serve`'s memory (plan/serving.py): bytes by hand."""

from __future__ import annotations

import pytest

from edgepack.plan import serving
from edgepack.plan.serving import ServingShape, fit_parallel, predict_server_memory

MIB = 1 << 20
# SmolLM2-135M's numbers (the default 8-bit bundle's manifest)
SMOL = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192}


def test_shape_from_a_manifests_architecture():
    shape = ServingShape.from_architecture(SMOL)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.vocab, shape.max_positions) == (30, 3, 64, 49152, 8192)
    no_kv = ServingShape.from_architecture({**SMOL, "num_key_value_heads": None, "head_dim": None})
    assert (no_kv.kv_heads, no_kv.head_dim) == (9, 64)  # all heads; hidden / heads


def test_parts_by_hand():
    shape = ServingShape.from_architecture(SMOL)
    m = predict_server_memory(shape, weights_bytes=163_483_776, parallel=4, context=2048, cache_bytes=100 * MIB,
                              max_body_bytes=8 * MIB)
    # K and V x 30 layers x 3 heads x 64 x 2 bytes = 23,040 bytes a position; 180 rows of pages, each
    # row's last page partly used
    assert m.parts["kv_caches"] == 4 * (23_040 * 2048 + 180 * 4096)
    assert m.parts["prefix_caches"] == 100 * MIB
    assert m.parts["tokenizers"] == 2 * 323 * 49152
    assert m.parts["weights"] == 163_483_776
    assert m.parts["request_bodies"] == 4 * 2 * 8 * MIB and m.parts["body_parsing"] == 15 * 8 * MIB
    assert m.parts["baseline"] == serving.SERVER_BASELINE_BYTES
    assert m.peak_bytes == sum(m.parts.values())
    assert m.serving_bytes == m.peak_bytes - m.parts["request_bodies"] - m.parts["body_parsing"]
    assert 4 * MIB < m.parts["engine_scratch"] < 8 * MIB  # a prompt chunk's activations dominate (~2.8 MiB)


def test_context_and_held_caches_are_bounded():
    shape = ServingShape.from_architecture(SMOL)
    one = predict_server_memory(shape, weights_bytes=0, parallel=1)
    assert one.context == 8192  # the model's
    longer = predict_server_memory(shape, weights_bytes=0, parallel=1, context=100_000)
    assert longer.context == 8192 and longer.parts["kv_caches"] == one.parts["kv_caches"]
    held = predict_server_memory(shape, weights_bytes=0, parallel=1, context=1024, cache_bytes=1 << 40, max_held=2)
    assert held.parts["prefix_caches"] == 2 * held.parts["kv_caches"]  # two caches of the context at most


def test_sliding_window_layers_hold_their_window():
    shape = ServingShape.from_architecture(SMOL, sliding_layers=20, sliding_window=512)
    m = predict_server_memory(shape, weights_bytes=0, parallel=1, context=4096)
    positions = 10 * 4096 + 20 * 512
    assert m.parts["kv_caches"] == 2 * 3 * 64 * 2 * positions + 180 * 4096


def test_fit_parallel_takes_what_fits():
    shape = ServingShape.from_architecture(SMOL)
    kwargs = {"weights_bytes": 163_483_776, "context": 8192, "cache_bytes": 0, "max_body_bytes": 8 * MIB}
    peaks = {n: predict_server_memory(shape, parallel=n, **kwargs).peak_bytes for n in range(1, 5)}
    assert fit_parallel(1 << 40, shape, **kwargs) == 4  # the default most
    assert fit_parallel(1 << 40, shape, most=8, **kwargs) == 8
    room = peaks[3] + serving.headroom_bytes(peaks[3])
    assert fit_parallel(room, shape, **kwargs) == 3
    assert fit_parallel(room - 1, shape, **kwargs) == 2
    assert fit_parallel(1, shape, **kwargs) == 1  # never less than one slot


def test_bad_numbers_are_refused():
    shape = ServingShape.from_architecture(SMOL)
    with pytest.raises(ValueError):
        predict_server_memory(shape, weights_bytes=0, parallel=0)
    with pytest.raises(ValueError):
        predict_server_memory(shape, weights_bytes=0, parallel=1, cache_bytes=-1)


def test_no_torch_and_no_serve_stack(tmp_path):
    import subprocess
    import sys

    code = ("import sys, edgepack.plan.serving; bad = [m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', "
            "'edgepack.serve') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
