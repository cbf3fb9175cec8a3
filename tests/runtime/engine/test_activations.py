"""Int8 activations, the engine's default on x86 (``_engine.activation_bits(8)``,
EDGEPACK_ACTIVATION_BITS=8, ``--activations int8``): int8 and int4 matrix-vector products of
a decode step against their input rounded to int8 per block of 32, as llama.cpp's Q8_0 does. The
kernel against float64 math over the rounded input; whole steps against the float64 Llama,
within what 8-bit activations cost, prompts unchanged (float32); the opt-out
(EDGEPACK_ACTIVATION_BITS=32, ``--activations float``) and what ``--stats`` says.

tests/conftest.py pins float32 for the whole run; the fixture here turns int8 on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import edgepack

native = pytest.importorskip("edgepack.runtime.engine._engine", reason="the C extension is not built here")
from test_native import _float64_logits, _logits  # noqa: E402  (this folder is on sys.path under pytest)
from test_tables import _exact_reference, _scales  # noqa: E402

HAS_Q8 = native.set_isa() in ("avx2", "avx512")
needs_q8 = pytest.mark.skipif(not HAS_Q8, reason="int8 activations run on AVX2 / AVX-512 only")
TEXT = "Water boils at one hundred degrees, and ice melts at zero. "


@pytest.fixture
def int8_activations(monkeypatch):
    monkeypatch.setenv("EDGEPACK_ACTIVATION_BITS", "8")  # what a bundle loaded meanwhile reads
    previous = native.activation_bits(8)
    yield
    native.activation_bits(previous)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 32 (scale max |x| / 127), in float64."""
    blocks = x.double().view(-1, 32)
    amax = blocks.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks.float() * inv.float()).double() * (amax.float() / 127).double()).reshape(-1)


@needs_q8
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


@needs_q8
@pytest.mark.parametrize("rows,cols", [(1, 32), (7, 64), (130, 576), (9, 800), (33, 2048)])
@pytest.mark.parametrize("threads", [1, 3])
def test_int8_activations_into_8bit_tables(int8_activations, rows, cols, threads):
    """8-bit tables (int8 codes, a float16 scale per block of 32) take the rounded input too:
    Q8_0 x Q8_0, whole groups of eight blocks and the blocks after them, rows off the 4-row unit."""
    gen = torch.Generator().manual_seed(rows * 11 + cols)
    codes, scales, exact_w = _scales("plain", "INT8_B32", rows, cols, gen)
    x = torch.randn(cols, generator=gen)
    y = torch.full((rows,), float("nan"))
    native.gemv((native.INT8_B32, rows, cols, codes.data_ptr(), scales.data_ptr(), None), x.data_ptr(), y.data_ptr(),
                threads)
    want = exact_w @ _rounded(x)
    bound = 1e-5 * (exact_w.abs() @ x.double().abs()) + 1e-6
    assert torch.all((y.double() - want).abs() <= bound)
    assert (y.double() - exact_w @ x.double()).abs().max() > 10 * bound.max()


@needs_q8
@pytest.mark.parametrize("rows,cols,group", [(1, 32, 32), (7, 64, 32), (5, 96, 32), (9, 160, 32), (33, 576, 32),
                                             (130, 1536, 32), (6, 192, 64), (11, 384, 128), (3, 320, 64)])
@pytest.mark.parametrize("threads", [1, 3])
def test_int4_rows_take_the_rounded_input(int8_activations, rows, cols, group, threads):
    """int4 rows against the input rounded to int8 per block of 32: W x~, the codes and the zero
    term (z - 8 s) both meeting the rounded input (the zero term through each group's sum).
    Blocks four at a time, a pair and an unpaired one after them; groups of 64 and 128 one
    block at a time; rows off the 4-row unit."""
    gen = torch.Generator().manual_seed(rows * 13 + cols + group)
    codes = torch.randint(0, 256, (rows, cols // 2), generator=gen, dtype=torch.uint8)
    pairs = (torch.randn(rows, cols // group, 2, generator=gen) / 8).to(torch.bfloat16)
    q = torch.stack((codes & 15, codes >> 4), -1).reshape(rows, cols).double()
    sz = pairs.double().repeat_interleave(group, dim=1)
    exact_w = (q - 8) * sz[..., 0] + sz[..., 1]
    x = torch.randn(cols, generator=gen)
    x[5] = 0.0
    y = torch.full((rows,), float("nan"))
    native.gemv((native.INT4, rows, cols, codes.data_ptr(), pairs.data_ptr(), None, group), x.data_ptr(), y.data_ptr(),
                threads)
    want = exact_w @ _rounded(x)
    bound = 1e-5 * ((q * sz[..., 0]).abs() @ x.double().abs() + ((sz[..., 1] - 8 * sz[..., 0]).abs() @ x.double().abs())) + 1e-6
    assert torch.all((y.double() - want).abs() <= bound)
    assert ((y.double() - exact_w @ x.double()).abs() > bound).any()  # the rounding shows: not the float kernel


def _engine_setting(env: str | None) -> list[str]:
    """(activation_bits(), int8_activations()) of a fresh process whose EDGEPACK_ACTIVATION_BITS is env."""
    environ = {k: v for k, v in os.environ.items() if k != "EDGEPACK_ACTIVATION_BITS"}
    if env is not None:
        environ["EDGEPACK_ACTIVATION_BITS"] = env
    code = "from edgepack.runtime.engine import _engine as e; print(e.activation_bits(), e.int8_activations())"
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_int8_is_the_default_and_32_opts_out():
    assert _engine_setting(None) == ["8", str(HAS_Q8)]  # no int8 kernels (ARM, generic): float regardless
    assert _engine_setting("32") == ["32", "False"]
    assert _engine_setting("8") == ["8", str(HAS_Q8)]
    previous = native.activation_bits()
    with pytest.raises(ValueError, match="32 .* or 8"):
        native.activation_bits(16)
    assert native.activation_bits() == previous


@needs_q8
@pytest.mark.parametrize("bits,table_bits", [(8, 16), (8, 8), (4, 16)])
def test_decode_with_int8_activations_stays_near_float64(packed, int8_activations, bits, table_bits):
    """8-bit activations miss the engine's 1e-4 bound but stay within a few percent of
    float64's logits with float64's greedy token at every step; prompts stay float32 (1e-4),
    and decode steps after a prompt are int8's again. Back at 32 bits steps are float64's.
    With 8-bit tables the output layer takes the rounded input too; int4 rows take it as
    int8 rows do."""
    bundle = packed("llama", bits, table_bits=table_bits, **({"quant_type": "int4"} if bits == 4 else {}))
    lm = edgepack.load(bundle)
    assert lm.model.activations() == "int8"
    ref = _exact_reference(bundle) if table_bits == 8 else edgepack.load(bundle, backend="torch").model
    ids = lm.tokenizer.encode(TEXT * 2)[:40]
    exact = _float64_logits(ref, ids)
    scale = exact.abs().max()
    cache = lm.model.new_cache(len(ids))
    got = torch.stack([_logits(lm.model.forward([t], cache)) for t in ids])
    rel = (got - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert rel.max() <= 0.05
    assert (got - exact).abs().max() > 1e-4 * scale  # int8 activations ran
    _same_greedy(got, exact)
    cache = lm.model.new_cache(len(ids))
    prompt = _logits(lm.model.forward(ids[:24], cache))  # the prompt pass: float32 activations
    assert (prompt - exact[23]).abs().max() <= 1e-4 * scale
    tail = torch.stack([_logits(lm.model.forward([t], cache)) for t in ids[24:]])
    tail_rel = (tail - exact[24:]).norm(dim=-1) / exact[24:].norm(dim=-1)
    assert tail_rel.max() <= 0.05 and (tail - exact[24:]).abs().max() > 1e-4 * scale
    _same_greedy(tail, exact[24:])
    native.activation_bits(32)
    assert lm.model.activations() == "float"
    cache = lm.model.new_cache(len(ids))
    again = torch.stack([_logits(lm.model.forward([t], cache)) for t in ids])
    assert (again - exact).abs().max() <= 1e-4 * scale


def _same_greedy(got: torch.Tensor, exact: torch.Tensor):
    """float64's greedy token at every step whose top two logits are further apart than twice
    the step's largest error (the tiny int4 Llama has near ties: gaps of 0.3% of its largest
    logit), and such steps are three in four at least"""
    top2 = exact.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * (got - exact).abs().max(-1).values
    assert clear.float().mean() >= 0.75
    assert torch.equal(got.argmax(-1)[clear], exact.argmax(-1)[clear])


@needs_q8
def test_float_activations_pins_32_and_restores(int8_activations):
    from edgepack.runtime.engine import float_activations

    with float_activations():
        assert native.activation_bits() == 32
    assert native.activation_bits() == 8


def test_bundles_without_int8_matrices_say_float(packed, int8_activations):
    lm = edgepack.load(packed("llama", 16))
    assert lm.backend == "native" and lm.model.activations() == "float"


def test_run_activations_flag_and_stats(capsys, packed, monkeypatch):
    """--activations sets what the engine's int8 products take; --stats names it; a bad
    EDGEPACK_ACTIVATION_BITS is refused with a hint."""
    from edgepack.cli import main

    monkeypatch.setenv("EDGEPACK_ACTIVATION_BITS", "32")  # restored after the test (--activations sets it)
    previous = native.activation_bits()
    args = ["run", str(packed("llama", 8)), "The capital", "--max-new-tokens", "3", "--temperature", "0", "--stats"]
    try:
        assert main(args + ["--activations", "int8"]) == 0
        assert f"{'int8' if HAS_Q8 else 'float'} activations)" in capsys.readouterr().err
        assert native.activation_bits() == 8
        assert main(args + ["--activations", "float"]) == 0
        assert "float activations)" in capsys.readouterr().err
        assert native.activation_bits() == 32
        assert main(args + ["--activations", "fp16"]) == 2
        assert "--activations" in capsys.readouterr().err
        monkeypatch.setenv("EDGEPACK_ACTIVATION_BITS", "16")
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: EDGEPACK_ACTIVATION_BITS='16': 8 (int8 activations) or 32") and "hint: " in err
    finally:
        native.activation_bits(previous)
