"""Int8 activations (``_engine.activation_bits(8)``, EDGEPACK_ACTIVATION_BITS=8): int8 matrix-
vector products of a decode step against their input rounded to int8 per block of 32, as
llama.cpp's Q8_0 does. The kernel against float64 math over the rounded input; whole steps
against the float64 Llama, within what 8-bit activations cost; float32 stays the default."""

from __future__ import annotations

import pytest
import torch

import edgepack

native = pytest.importorskip("edgepack.runtime.engine._engine", reason="the C extension is not built here")
from test_native import _float64_logits, _logits  # noqa: E402  (this folder is on sys.path under pytest)

HAS_Q8 = native.set_isa() in ("avx2", "avx512")


@pytest.fixture
def int8_activations():
    previous = native.activation_bits(8)
    yield
    native.activation_bits(previous)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 32 (scale max |x| / 127), in float64."""
    blocks = x.double().view(-1, 32)
    amax = blocks.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks.float() * inv.float()).double() * (amax.float() / 127).double()).reshape(-1)


@pytest.mark.skipif(not HAS_Q8, reason="int8 activations run on AVX2 / AVX-512 only")
@pytest.mark.parametrize("rows,cols", [(1, 32), (7, 64), (130, 576), (33, 1536), (5, 48)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_int8_activation_kernel_is_the_rounded_input_product(int8_activations, rows, cols, threads):
    gen = torch.Generator().manual_seed(rows * 7 + cols)
    w = torch.randint(-127, 128, (rows, cols), generator=gen, dtype=torch.int8)
    scale = torch.rand(rows, generator=gen) / 64 + 1e-3
    x = torch.randn(cols, generator=gen)
    x[3] = 0.0
    y = torch.full((rows,), float("nan"))
    native.gemv((native.INT8, rows, cols, w.data_ptr(), scale.data_ptr(), None), x.data_ptr(), y.data_ptr(), threads)
    exact_w = w.double() * scale.double()[:, None]
    # inputs not in whole blocks of 32 take the float kernel
    want = exact_w @ (_rounded(x) if cols % 32 == 0 else x.double())
    bound = 1e-5 * (exact_w.abs() @ x.double().abs()) + 1e-6
    assert torch.all((y.double() - want).abs() <= bound)
    if cols % 32 == 0:  # and the rounding shows: this is not the float kernel
        assert (y.double() - exact_w @ x.double()).abs().max() > 10 * bound.max()


def test_activation_bits_are_checked_and_float32_by_default():
    assert native.activation_bits() == 32
    with pytest.raises(ValueError, match="32 .* or 8"):
        native.activation_bits(16)
    assert native.activation_bits() == 32


@pytest.mark.skipif(not HAS_Q8, reason="int8 activations run on AVX2 / AVX-512 only")
def test_decode_with_int8_activations_stays_near_float64(packed, int8_activations):
    """8-bit activations miss the engine's 1e-4 bound (that is why they are not the default)
    but stay within a few percent of float64's logits, with the same greedy tokens; back at
    32 bits the steps are float64's again."""
    bundle = packed("llama", 8, table_bits=16)  # the reference holds 16-bit tables as stored
    lm = edgepack.load(bundle)
    ref = edgepack.load(bundle, backend="torch").model
    ids = lm.tokenizer.encode("Water boils at one hundred degrees, and ice melts at zero. ")[:24]
    exact = _float64_logits(ref, ids)
    cache = lm.model.new_cache(len(ids))
    got = torch.stack([_logits(lm.model.forward([t], cache)) for t in ids])
    rel = (got - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert rel.max() <= 0.05
    assert (got - exact).abs().max() > 1e-4 * exact.abs().max()  # int8 activations ran
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
    native.activation_bits(32)
    cache = lm.model.new_cache(len(ids))
    again = torch.stack([_logits(lm.model.forward([t], cache)) for t in ids])
    assert (again - exact).abs().max() <= 1e-4 * exact.abs().max()
