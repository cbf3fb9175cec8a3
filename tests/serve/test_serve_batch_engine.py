"""NativeLM.step_batch: several sequences' decode steps in one call give, for each, the
bitwise logits of a one-token forward (so greedy tokens never depend on who else is being
served), and the KV cache helpers prefix reuse relies on."""

import pytest

from edgepack.runtime.engine import c_module_unavailable

pytestmark = pytest.mark.skipif(c_module_unavailable() is not None, reason="the C engine cannot run here")

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at one", "Seven"]


@pytest.fixture(params=[32, 8], ids=["float-activations", "int8-activations"])
def activation_bits(request):
    """Both activation modes (engine.h, act_bits): with 8, int8 matrices of decode steps run
    against their input rounded to int8 per block of 32, one sequence or several alike."""
    from edgepack.runtime.engine import _engine

    previous = _engine.activation_bits(request.param)
    yield request.param
    _engine.activation_bits(previous)


def _native(packed, kind, bits, **options):
    from edgepack.runtime import load

    lm = load(packed(kind, bits, **options), backend="native")
    assert lm.backend == "native"
    return lm


@pytest.mark.parametrize("kind, bits, options", [("llama", 8, {}), ("llama-untied", 4, {"quant_type": "int4"}),
                                                 ("llama", 16, {})])
def test_step_batch_is_bitwise_forward(packed, kind, bits, options, activation_bits):
    """Five sequences: one pass of four and one of one in the batched kernels."""
    lm = _native(packed, kind, bits, **options)
    m = lm.model
    prompts = [lm.encode_prompt(p) for p in PROMPTS]
    alone, together = [], []
    for ids in prompts:  # one at a time: forward([token]) per step
        cache, logits, seen = m.new_cache(64), None, []
        logits = m.forward(ids, cache)
        for _ in range(12):
            token = m.sample(logits, 0.0)
            seen.append((token, bytes(logits)))
            logits = m.forward([token], cache)
        alone.append(seen)
    caches = [m.new_cache(64 + 8 * i) for i in range(len(prompts))]  # different cache sizes too
    logits = [m.forward(ids, c) for ids, c in zip(prompts, caches)]
    together = [[] for _ in prompts]
    for _ in range(12):
        tokens = [m.sample(lg, 0.0) for lg in logits]
        for seen, token, lg in zip(together, tokens, logits):
            seen.append((token, bytes(lg)))
        logits = m.step_batch(tokens, caches)
    assert together == alone
    assert [c.length for c in caches] == [len(ids) + 12 for ids in prompts]


def test_int8_activations_change_batched_steps(packed):
    """The bitwise test above compares two things that both changed: here the int8 path is
    seen to run in step_batch (its logits differ from float32 activations')."""
    from edgepack.runtime.engine import _engine

    if _engine.set_isa() not in ("avx2", "avx512"):
        pytest.skip("int8 activations run on AVX2 / AVX-512 only")
    m = _native(packed, "llama", 8).model
    ids = list(range(5, 20))
    got = {}
    for act in (32, 8):
        previous = _engine.activation_bits(act)
        try:
            caches = [m.new_cache(32) for _ in range(3)]
            for i, c in enumerate(caches):
                m.forward(ids[: 8 + i], c)
            got[act] = [bytes(lg) for lg in m.step_batch([7, 8, 9], caches)]
        finally:
            _engine.activation_bits(previous)
    assert all(a != b for a, b in zip(got[32], got[8]))


def test_step_batch_refuses_shared_or_full_caches(packed):
    m = _native(packed, "llama", 8).model
    cache = m.new_cache(4)
    m.forward([1, 2, 3], cache)
    with pytest.raises(ValueError):
        m.step_batch([1, 2], [cache, cache])
    m.step_batch([1], [cache])
    with pytest.raises(ValueError):
        m.step_batch([1], [cache])
    assert m.step_batch([], []) == []


def test_truncate_and_copy_prefix_continue_exactly(packed):
    m = _native(packed, "llama", 8).model
    ids = list(range(5, 40))
    whole = m.new_cache(64)
    expected = bytes(m.forward(ids, whole))
    part = m.new_cache(64)
    m.forward(ids[:20] + [7, 7, 7], part)  # a different continuation after 20 tokens
    part.truncate(20)
    assert bytes(m.forward(ids[20:], part)) == expected
    copied = m.new_cache(48)  # another size: rows are strided differently
    copied.copy_prefix(whole, 30)
    assert copied.length == 30
    assert bytes(m.forward(ids[30:], copied)) == expected
    with pytest.raises(ValueError):
        part.truncate(part.length + 1)
