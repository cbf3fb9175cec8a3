"""edgepack._native: the C decode step. Its kernels against float64 math for every weight
type, instruction set and thread count; whole decode steps against a float64 Llama written
out here and against the torch path; fallbacks and errors."""

from __future__ import annotations

import math

import pytest
import torch

import edgepack
from edgepack import lean

native = pytest.importorskip("edgepack._native", reason="the C extension is not built here")

BEST_ISA = native.set_isa()


def _available_isas() -> list[str]:
    out = []
    for isa in ("generic", "avx2", "avx512"):
        try:
            native.set_isa(isa)
            out.append(isa)
        except ValueError:
            pass
    native.set_isa(BEST_ISA)
    return out


ISAS = _available_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv(lean.NATIVE_ENV, "1")  # the portable kernels too
    previous = native.set_isa(request.param)
    yield request.param
    native.set_isa(previous)


def _weights(kind: str, rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(stored weight, float32 row scales / int4 (scale, zero) pairs / None, the float64
    matrix they mean)"""
    if kind == "INT4":
        codes = torch.randint(0, 256, (rows, cols // 2), generator=gen, dtype=torch.uint8)
        pairs = (torch.randn(rows, cols // 32, 2, generator=gen) / 8).to(torch.bfloat16)
        q = torch.stack((codes & 15, codes >> 4), -1).reshape(rows, cols).double()
        sz = pairs.double().repeat_interleave(32, dim=1)  # [rows, cols, 2]
        return codes, pairs, (q - 8) * sz[..., 0] + sz[..., 1]
    if kind == "INT8":
        w = torch.randint(-127, 128, (rows, cols), generator=gen, dtype=torch.int8)
        scale = torch.rand(rows, generator=gen) / 64 + 1e-3
        return w, scale, w.double() * scale.double()[:, None]
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[kind]
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    return w, None, w.double()


SHAPES = [(1, 16), (7, 37), (64, 64), (33, 200), (130, 576)]
INT4_SHAPES = [(1, 32), (7, 64), (33, 576), (130, 1536)]  # 18 / 48 groups: over the 16 converted at once


@pytest.mark.parametrize("kind,rows,cols", [(k, r, c) for k in ("INT8", "BF16", "F16", "F32") for r, c in SHAPES]
                         + [("INT4", r, c) for r, c in INT4_SHAPES])  # fmt: skip
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemv_matches_float64(isa, kind, rows, cols, threads):
    """Every weight type on every instruction set, shapes off the kernels' 4-row / 8- and
    16-column units (the tails), rows split over threads: y = W x (* scale) + bias."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    w, scale, exact = _weights(kind, rows, cols, gen)
    bias = torch.randn(rows, generator=gen)
    x = torch.randn(cols, generator=gen)
    y = torch.full((rows,), float("nan"))
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    matrix = (getattr(native, kind), rows, cols, w.data_ptr(), ptr(scale), bias.data_ptr()) + ((32,) if kind == "INT4" else ())
    native.gemv(matrix, x.data_ptr(), y.data_ptr(), threads)
    want = exact @ x.double() + bias.double()
    bound = 1e-5 * (exact.abs() @ x.double().abs() + bias.double().abs()) + 1e-6  # float32 accumulation
    assert torch.all((y.double() - want).abs() <= bound), (y, want)


def test_float16_subnormals_and_infinities_convert_exactly(isa):
    bits = torch.tensor([0x0001, 0x03FF, 0x0400, 0x7BFF, 0x8001, 0xFBFF, 0x3C00, 0x0000], dtype=torch.int32)
    w = bits.to(torch.int16).view(torch.float16).reshape(1, -1)  # one row of special values
    for i in range(w.shape[1]):
        x = torch.zeros(w.shape[1])
        x[i] = 1.0
        y = torch.empty(1)
        native.gemv((native.F16, 1, w.shape[1], w.contiguous().data_ptr(), None, None), x.data_ptr(), y.data_ptr(), 1)
        assert y.item() == w[0, i].float().item()


def test_int4_dequantization_is_the_stored_formula():
    gen = torch.Generator().manual_seed(7)
    codes, pairs, exact = _weights("INT4", 20, 96, gen)
    out = torch.empty(20, 96)
    native.dequant_int4(codes.data_ptr(), pairs.data_ptr(), 20, 96, 32, out.data_ptr(), 2)
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=1e-6)


def test_bad_matrix_is_refused():
    x, y = torch.zeros(4), torch.zeros(4)
    w = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="bad matrix"):  # int8 without its scales
        native.gemv((native.INT8, 4, 4, w.data_ptr(), None, None), x.data_ptr(), y.data_ptr(), 1)
    with pytest.raises(ValueError, match="bad matrix"):  # int4 groups must be multiples of 32
        native.gemv((native.INT4, 4, 64, w.data_ptr(), w.data_ptr(), None, 16), x.data_ptr(), y.data_ptr(), 1)
    with pytest.raises(ValueError, match="not available|instruction set"):
        native.set_isa("sse9")


# --- whole decode steps -----------------------------------------------------------------------


def _float64_logits(model: lean.LeanLM, ids: list[int]) -> torch.Tensor:
    """Logits at every position of ``ids``, a Llama forward in float64 from the model's own
    tensors (int8 rows times their scales), keys and values rounded to bfloat16 as the KV
    cache stores them."""
    cfg = model.cfg

    def w(module):
        if isinstance(module, edgepack.qlinear.Int8Linear):
            return module.weight.double() * (module.SCB.double() / 127.0)[:, None]
        if isinstance(module, edgepack.qlinear.Int4Linear):
            return module.dequantized_weight().double()
        return module.weight.double()

    def norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.eps) * weight.double()

    n, d, heads, kvh = len(ids), cfg.head_dim, cfg.heads, cfg.kv_heads
    pos = torch.arange(n, dtype=torch.float64)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.cat([torch.outer(pos, inv)] * 2, -1)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rope(t):
        return t * cos + torch.cat((-t[..., d // 2 :], t[..., : d // 2]), -1) * sin

    x = model.embed.double()[ids]
    for b in model.blocks:
        qkv = norm(x, b.input_norm) @ w(b.qkv_proj).T
        q = rope(qkv[:, : heads * d].view(n, heads, d))
        k = rope(qkv[:, heads * d : (heads + kvh) * d].view(n, kvh, d)).to(torch.bfloat16).double()
        v = qkv[:, (heads + kvh) * d :].view(n, kvh, d).to(torch.bfloat16).double()
        k, v = k.repeat_interleave(heads // kvh, 1), v.repeat_interleave(heads // kvh, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        att = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(n, heads * d)
        x = x + att @ w(b.o_proj).T
        gu = norm(x, b.post_norm) @ w(b.gate_up_proj).T
        x = x + (torch.nn.functional.silu(gu[:, : b.inter]) * gu[:, b.inter :]) @ w(b.down_proj).T
    return norm(x, model.norm) @ w(model.lm_head).T


@pytest.mark.parametrize("kind,bits", [("llama", 8), ("llama", 16), ("llama-untied", 8), ("llama-untied", 16), ("llama", 4)])
def test_decode_steps_match_float64_llama(packed, isa, kind, bits, monkeypatch):
    """Token by token from an empty cache: the C step's logits are float64's to float32
    rounding, closer than the torch path's (bfloat16 activations into its kernels)."""
    lm = edgepack.load(packed(kind, bits, **({"quant_type": "int4"} if bits == 4 else {})))
    model = lm.model
    assert model.native_off is None
    ids = lm.tokenizer.encode("Water boils at one hundred degrees")
    exact = _float64_logits(model, ids)
    ours, theirs = [], []
    native_cache, torch_cache = model.new_cache(32), model.new_cache(32)
    for t in ids:
        ours.append(model.native_step(t, native_cache))
        theirs.append(model._head(model._hidden(torch.tensor([[t]]), torch_cache)[-1:])[0].float())
    ours, theirs = torch.stack(ours).double(), torch.stack(theirs).double()
    scale = exact.abs().max()
    assert (ours - exact).abs().max() <= 1e-4 * scale
    assert (ours - exact).abs().max() < (theirs - exact).abs().max()
    assert native_cache.length == torch_cache.length == len(ids)
    # the same cache layout: what one path writes, the other reads
    assert (native_cache.k.float() - torch_cache.k.float()).abs().max() <= 0.05 * torch_cache.k.float().abs().max()


def test_decode_continues_a_prompt_run_by_torch(packed):
    """A prompt run by torch ops, then C steps on the same cache: the logits of a full
    recompute (the kernels read what torch wrote, at the right positions)."""
    lm = edgepack.load(packed("llama", 8))
    ids = lm.tokenizer.encode("The capital of France is Paris and")
    exact = _float64_logits(lm.model, ids)
    cache = lm.model.new_cache(64)
    lm.model.logits_last(torch.tensor([ids[:5]]), cache)
    steps = torch.stack([lm.model.logits_last(torch.tensor([[t]]), cache) for t in ids[5:]]).double()
    assert (steps - exact[5:]).abs().max() <= 2e-2 * exact.abs().max()  # the prompt's bf16 activations
    assert [int(s.argmax()) for s in steps] == [int(e.argmax()) for e in exact[5:]]


def test_threads_do_not_change_the_result(packed):
    lm = edgepack.load(packed("llama", 8))
    ids = lm.tokenizer.encode("Small boxes run small models")
    runs = []
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        try:
            cache = lm.model.new_cache(32)
            runs.append(torch.stack([lm.model.native_step(t, cache) for t in ids]))
        finally:
            torch.set_num_threads(2)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])  # rows split, sums not


def test_generate_uses_the_c_step_and_agrees_with_torch(packed, monkeypatch):
    bundle = packed("llama", 16)
    lm = edgepack.load(bundle)
    calls = []
    real = lm.model.native_step
    monkeypatch.setattr(lm.model, "native_step", lambda *a: calls.append(1) or real(*a))
    text = lm.generate("The capital", max_new_tokens=6, min_new_tokens=6, temperature=0)
    assert len(calls) == 5  # the prompt by torch, then one C step per further token
    monkeypatch.setenv(lean.NATIVE_ENV, "0")
    plain = edgepack.load(bundle)
    assert plain.model.native_off == f"{lean.NATIVE_ENV}=0"
    assert plain.generate("The capital", max_new_tokens=6, min_new_tokens=6, temperature=0) == text


def test_int4_prompt_path_and_torch_fallback_agree(packed, monkeypatch):
    """int4 layers kept for the C step run prompts through its dequantization and a float32
    GEMM; with the C step off they are repacked for torch's int4 kernel: same logits."""
    bundle = packed("llama", 4, quant_type="int4")
    ids = torch.tensor([edgepack.load(bundle).tokenizer.encode("The capital of France is Paris")])
    ours = edgepack.load(bundle).model
    assert ours.native_off is None and ours.blocks[0].qkv_proj._kernel_weight is None
    monkeypatch.setenv(lean.NATIVE_ENV, "0")
    plain = edgepack.load(bundle).model
    assert plain.blocks[0].qkv_proj._kernel_weight is not None and plain.blocks[0].qkv_proj._row_pairs is None
    a, b = ours(ids).logits.float(), plain(ids).logits.float()
    assert torch.allclose(a, b, atol=3e-2 * b.abs().max()) and torch.equal(a.argmax(-1), b.argmax(-1))


def test_layers_the_c_step_cannot_run_fall_back_to_torch(packed):
    lm = edgepack.load(packed("llama", 4, quant_type="nf4"))
    assert "Linear4bit" in lm.model.native_off
    cache = lm.model.new_cache(16)
    ids = lm.tokenizer.encode("The capital")
    lm.model.logits_last(torch.tensor([ids]), cache)
    assert lm.model.logits_last(torch.tensor([[ids[0]]]), cache).shape[-1] == lm.model.config["vocab_size"]


def test_portable_kernels_only_when_asked(packed, monkeypatch):
    previous = native.set_isa("generic")
    try:
        monkeypatch.delenv(lean.NATIVE_ENV, raising=False)
        assert "no AVX2 or AVX-512" in edgepack.load(packed("llama", 8)).model.native_off
        monkeypatch.setenv(lean.NATIVE_ENV, "1")
        assert edgepack.load(packed("llama", 8)).model.native_off is None
    finally:
        native.set_isa(previous)


def test_argmax_is_torchs():
    for values in (torch.randn(49152), torch.tensor([1.0, 3.0, 3.0, 2.0]), torch.tensor([5.0, float("nan"), 7.0]),
                   torch.full((3,), float("-inf")), torch.tensor([2.0])):  # fmt: skip
        assert lean.argmax(values) == int(torch.argmax(values))


def test_step_errors(packed):
    lm = edgepack.load(packed("llama", 8))
    cache = lm.model.new_cache(2)
    lm.model.native_step(3, cache)
    lm.model.native_step(4, cache)
    with pytest.raises(ValueError, match="KV cache holds 2 tokens"):
        lm.model.native_step(5, cache)
    with pytest.raises(ValueError, match="outside the model"):
        lm.model.native_step(10**6, lm.model.new_cache(2))


def test_a_forked_child_decodes(packed):
    """The thread pool does not survive fork(); the child starts its own (pthread_atfork)."""
    import multiprocessing

    lm = edgepack.load(packed("llama", 8))
    ids = lm.tokenizer.encode("The capital")
    cache = lm.model.new_cache(16)
    want = torch.stack([lm.model.native_step(t, cache) for t in ids])  # the pool is running now
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_steps_in_child, args=(lm.model, ids, send))  # fork: nothing pickled
    child.start()
    assert receive.poll(60), "the forked child did not answer"
    got = torch.tensor(receive.recv())
    child.join(10)
    assert child.exitcode == 0 and torch.equal(got, want)


def _steps_in_child(model, ids, send):
    cache = model.new_cache(16)
    send.send(torch.stack([model.native_step(t, cache) for t in ids]).tolist())  # plain floats: no shared memory
